"""Pinned directions: greedy continuations with one direction's activation clamped.

Clamping direction c of a module to v replaces its activation A[c] · x by v at every position,
prompt and generated tokens alike: the module then writes the constant scaling * B[:, c] * v in
place of what that direction would have written, and every other direction is left on. Comparing
the continuations at the direction's observed minimum, 0, its maximum and as is shows what the
direction does to the model's output.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator, Sequence
from types import EllipsisType
from typing import Any

import torch
from torch import nn
from transformers import GenerationConfig

from backend.data import row_content, tokenize_row
from backend.directions import LoraModule
from backend.loading import input_device

CLAMPS = ("min", "zero", "max", "none")
PROMPT_TOKENS = 64  # a row that is not a chat: its first tokens are the prompt

EosIds = int | list[int] | None | EllipsisType  # ...: the model's generation_config's


def steering_prompt(
    row: dict[str, Any], tokenizer: Any, text_field: str | None, max_length: int | None
) -> list[int]:
    """The prompt of a row: for a chat row (backend.data.row_content returns a list of messages,
    including s1K rows), every message before the first assistant turn rendered with the chat
    template and add_generation_prompt=True, i.e. everything up to and including the assistant
    turn's header (not cut to max_length: the header is the point); otherwise the first
    PROMPT_TOKENS tokens of the row as the main pass tokenizes it (cut to max_length first)."""
    content = row_content(row, text_field)
    if isinstance(content, list):
        before = list(itertools.takewhile(lambda m: m["role"] != "assistant", content))
        text = tokenizer.apply_chat_template(before, add_generation_prompt=True, tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenize_row(row, tokenizer, text_field)[:max_length][:PROMPT_TOKENS]


def clamped_generate(
    model: nn.Module,
    module: LoraModule,
    component: int,
    value: float | None,
    prompt: list[int],
    max_new_tokens: int = 48,
    eos_token_id: EosIds = ...,
    adapter: str = "default",
) -> list[int]:
    """Greedy continuation (the new token ids only, stopping after EOS or max_new_tokens) with
    direction (module, component)'s activation lora_A·x clamped to `value` at every position,
    prompt and generated tokens alike; value None: left as is (plain greedy generation).

    eos_token_id: the token id(s) that end a continuation (the EOS is kept as its last token);
    ... (the default) takes the model's generation_config's, None never stops before
    max_new_tokens."""
    return clamped_generations(
        model, module, component, [value], prompt, max_new_tokens, eos_token_id, adapter
    )[0]


def clamped_generations(
    model: nn.Module,
    module: LoraModule,
    component: int,
    values: Sequence[float | None],
    prompt: list[int],
    max_new_tokens: int = 48,
    eos_token_id: EosIds = ...,
    adapter: str = "default",
) -> list[list[int]]:
    """clamped_generate for each value (e.g. the four clamps of CLAMPS), in one generate call.

    Every row of the batch is the same prompt, so no row needs padding and each row's
    continuation is what clamped_generate gives for its value alone; a row that reaches EOS
    first is cut there (generate pads it while the others go on)."""
    if not 0 <= component < module.rank:
        raise ValueError(f"{module.name} has rank {module.rank}: no component {component}")
    if not prompt or not values:
        raise ValueError("clamped generation needs a prompt and at least one value")
    layer = model.get_submodule(module.name)
    if layer.merged:  # a merged adapter never calls lora_A: there would be nothing to clamp
        raise ValueError(f"{module.name}: the adapter is merged into the weights; unmerge it")
    inner = model.get_base_model()  # the transformers model whose generate runs
    eos = _eos_ids(inner.generation_config.eos_token_id if eos_token_id is ... else eos_token_id)
    config = GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos or None,
        pad_token_id=eos[0] if eos else 0,  # only fills rows that have ended
    )
    input_ids = torch.tensor([prompt] * len(values), device=input_device(model))  # [V, T]
    with _clamped(layer.lora_A[adapter], component, values), _neutral_generation_config(inner):
        output = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            generation_config=config,
        )
    return [_through_eos(row, eos) for row in output[:, len(prompt) :].tolist()]


@contextlib.contextmanager
def _clamped(lora_a: nn.Module, component: int, values: Sequence[float | None]) -> Iterator[None]:
    """Batch row i's activation of `component` set to values[i] (None: left as is) in every
    forward of lora_a while the context is open, and never after, however it ends."""
    pinned = torch.tensor([v is not None for v in values])  # [V]
    target = torch.tensor([0.0 if v is None else v for v in values])  # [V]

    def clamp(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        # output [V, T, r]: with the KV cache, T is the prompt first, then one new token a step.
        clamped = output.clone()
        where = pinned.to(output.device)[:, None]  # [V, 1]
        pins = target.to(output.device, output.dtype)[:, None]  # [V, 1]
        clamped[..., component] = torch.where(where, pins, output[..., component])
        return clamped

    handle = lora_a.register_forward_hook(clamp)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def _neutral_generation_config(inner: nn.Module) -> Iterator[None]:
    """generate fills every setting the passed config leaves unset from the model's own
    generation_config (a repetition penalty, suppressed or forced tokens, a minimum length...),
    which would change greedy decoding; a fresh config stands in for it during the call. (PEFT's
    generate copies the PEFT model's generation_config, which is this one, onto `inner`.)"""
    saved = inner.generation_config
    inner.generation_config = GenerationConfig()
    try:
        yield
    finally:
        inner.generation_config = saved


def _eos_ids(eos_token_id: int | list[int] | None) -> list[int]:
    if eos_token_id is None:
        return []
    return [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)


def _through_eos(tokens: list[int], eos: list[int]) -> list[int]:
    """The tokens up to and including the first EOS (all of them if none)."""
    end = next((i + 1 for i, t in enumerate(tokens) if t in eos), len(tokens))
    return tokens[:end]
