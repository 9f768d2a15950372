"""Pinned directions: greedy continuations with one direction's activation clamped.

Clamping direction c of a module to v replaces its activation A[c] · x by v at every position,
prompt and generated tokens alike: the module then writes the constant scaling * B[:, c] * v in
place of what that direction would have written, and every other direction is left on. Comparing
the continuations at the direction's observed minimum, 0, its maximum and as is shows what the
direction does to the model's output. All the pinned samples of one prompt (every clamp of every
pinned direction) are rows of one batch, one generate call, each row clamped only where it pins.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator, Sequence
from types import EllipsisType
from typing import Any

import torch
from torch import nn
from transformers import GenerationConfig

from backend.data import row_content, tokenize_row
from backend.directions import LoraModule
from backend.loading import input_device

PROMPT_TOKENS = 64  # a row that is not a chat: its first tokens are the prompt

EosIds = int | list[int] | None | EllipsisType  # ...: the model's generation_config's
Pin = tuple[LoraModule, int, float | None]  # (module, component, value); value None: as is


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
    pins = [(module, component, value)]
    return pinned_generations(model, pins, prompt, max_new_tokens, eos_token_id, adapter)[0]


def pinned_generations(
    model: nn.Module,
    pins: Sequence[Pin],
    prompt: list[int],
    max_new_tokens: int = 48,
    eos_token_id: EosIds = ...,
    adapter: str = "default",
    max_rows: int | None = None,
) -> list[list[int]]:
    """clamped_generate for each pin (module, component, value), all in one generate call (or
    one per max_rows rows): e.g. every clamp of every pinned direction on one prompt, "none" once.

    Every row of the batch is the same prompt, so no row needs padding; each pinned module's
    hook clamps only the rows that pin it, so each row's continuation is what clamped_generate
    gives for its pin alone. A row that reaches EOS first is cut there (generate pads it while
    the others go on). max_rows: at most that many rows a generate call (the pins split into
    several calls, in order), to bound the memory of a big model; None: all in one."""
    if not prompt or not pins:
        raise ValueError("pinned generation needs a prompt and at least one pin")
    if max_rows is not None and max_rows < 1:
        raise ValueError(f"max_rows must be at least 1, not {max_rows}")
    for module, component, _ in pins:
        if not 0 <= component < module.rank:
            raise ValueError(f"{module.name} has rank {module.rank}: no component {component}")
        if model.get_submodule(module.name).merged:  # a merged adapter never calls lora_A
            raise ValueError(f"{module.name}: the adapter is merged into the weights; unmerge it")
    inner = model.get_base_model()  # the transformers model whose generate runs
    eos = eos_ids(inner.generation_config.eos_token_id if eos_token_id is ... else eos_token_id)
    config = GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos or None,
        pad_token_id=eos[0] if eos else 0,  # only fills rows that have ended
    )
    step = max_rows or len(pins)
    continuations = []
    for start in range(0, len(pins), step):
        batch = pins[start : start + step]
        input_ids = torch.tensor([prompt] * len(batch), device=input_device(model))  # [R, T]
        with _pinned(model, batch, adapter), neutral_generation_config(inner):
            output = model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                generation_config=config,
            )
        continuations += [through_eos(row, eos) for row in output[:, len(prompt) :].tolist()]
    return continuations


@contextlib.contextmanager
def _pinned(model: nn.Module, pins: Sequence[Pin], adapter: str) -> Iterator[None]:
    """Batch row i's pinned activation set to its value in every forward while the context is
    open, and never after, however it ends: one hook on each pinned module's lora_A, which
    touches only the rows that pin one of its components (a None value pins nothing)."""
    rows = len(pins)
    masks: dict[str, torch.Tensor] = {}  # module name -> [R, r]: which (row, component) pinned
    targets: dict[str, torch.Tensor] = {}  # module name -> [R, r]: the value there
    for i, (module, component, value) in enumerate(pins):
        if value is None:
            continue
        if module.name not in masks:
            masks[module.name] = torch.zeros(rows, module.rank, dtype=torch.bool)
            targets[module.name] = torch.zeros(rows, module.rank)
        masks[module.name][i, component] = True
        targets[module.name][i, component] = value

    def clamp(mask: torch.Tensor, target: torch.Tensor) -> Callable[..., torch.Tensor]:
        def hook(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> torch.Tensor:
            # output [R, T, r]: with the KV cache, T is the prompt first, then one new token a step
            where = mask.to(output.device)[:, None]  # [R, 1, r]
            return torch.where(where, target.to(output.device, output.dtype)[:, None], output)

        return hook

    handles = []
    try:
        for name, mask in masks.items():
            lora_a = model.get_submodule(name).lora_A[adapter]
            handles.append(lora_a.register_forward_hook(clamp(mask, targets[name])))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def neutral_generation_config(inner: nn.Module) -> Iterator[None]:
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


def eos_ids(eos_token_id: int | list[int] | None) -> list[int]:
    if eos_token_id is None:
        return []
    return [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)


def through_eos(tokens: list[int], eos: list[int]) -> list[int]:
    """The tokens up to and including the first EOS (all of them if none)."""
    end = next((i + 1 for i, t in enumerate(tokens) if t in eos), len(tokens))
    return tokens[:end]
