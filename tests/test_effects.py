"""backend.effects against brute force through PEFT itself: zeroed lora_B columns and a plain
full forward per ablation, float64 KL and CE; attribution from autograd on per-position scales
of each lora_A output; activations from hooks on lora_A."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from backend import effects
from backend.directions import find_lora_modules
from backend.effects import Effects, RowEffects
from tests.reference import (
    ablated,
    brute_attribution,
    kl_and_dloss,
    log_probs,
    lora_a_activations,
)
from tests.runs import load
from tests.tiny import random_texts, save_adapter

RTOL = 2e-3
ALL_MODULES = ("gate_proj", "up_proj", "down_proj", "q_proj", "k_proj", "v_proj", "o_proj")


def reversed_first(modules) -> dict[str, int]:
    """Direction indices in reverse module order: the rows must follow `first`, not the list."""
    first, start = {}, 0
    for m in reversed(modules):
        first[m.name], start = start, start + m.rank
    return first


def rows(tokenizer, count: int, seed: int = 0) -> list[torch.Tensor]:
    texts = random_texts(count, seed=seed, max_words=30)
    found = [torch.tensor(tokenizer(t)["input_ids"]) for t in texts]
    return [ids for ids in found if ids.numel() >= 2]


def close(ours: torch.Tensor, brute, what: str) -> None:
    """To RTOL relative; a value near 0 (a sign change, a direction with almost no effect)
    gets an absolute floor of 1e-6 of the largest value compared."""
    brute = np.asarray(brute, dtype=np.float64)
    floor = 1e-6 * np.abs(brute).max(initial=0.0)
    np.testing.assert_allclose(ours.double().numpy(), brute, rtol=RTOL, atol=floor, err_msg=what)


def check_row(model, modules, first, found: Effects, result: RowEffects, ids: torch.Tensor):
    n, d = ids.numel(), sum(m.rank for m in modules)
    with torch.no_grad():
        full = log_probs(model, ids)
        with model.disable_adapter():
            base = log_probs(model, ids)
    token_kl = (full.exp() * (full - base)).sum(-1)
    close(result.kl_tokens, token_kl, "kl_tokens")
    assert result.kl_tokens.shape == (n - 1,) and result.kl_tokens.dtype == torch.float64

    per_direction = np.zeros((d, 2))
    for m in modules:
        for c in range(m.rank):
            per_direction[first[m.name] + c] = kl_and_dloss(
                full, ablated(model, modules, {m.name: [c]}, ids), ids
            )
    if n > 2:  # (at 2 tokens, position 0 attends to itself alone: k_proj cannot matter)
        assert (per_direction[:, 0] > 0).all()  # every direction changes the prediction
    close(result.ablation_kl, per_direction[:, 0], "ablation_kl")
    close(result.ablation_dloss, per_direction[:, 1], "ablation_dloss")

    for names, kl, dloss, key in (
        (found.layers, result.layer_kl, result.layer_dloss, lambda m: m.layer),
        (found.modules, result.module_kl, result.module_dloss, lambda m: m.module),
    ):
        groups = [
            kl_and_dloss(
                full,
                ablated(
                    model,
                    modules,
                    {m.name: list(range(m.rank)) for m in modules if key(m) == g},
                    ids,
                ),
                ids,
            )
            for g in names
        ]
        close(kl, [kl for kl, _ in groups], f"group kl {names}")
        close(dloss, [dl for _, dl in groups], f"group dloss {names}")

    acts = lora_a_activations(model, [ids.tolist()])
    expected = np.zeros((d, n))
    for m in modules:
        for c in range(m.rank):
            expected[first[m.name] + c] = acts[(m.layer, m.module, c)][0]
    np.testing.assert_allclose(result.activations.numpy(), expected, rtol=1e-5, atol=1e-6)
    assert result.activations.dtype == torch.float32

    attr = brute_attribution(model, modules, first, ids)
    close(result.attribution, attr, "attribution")
    assert (result.attribution[:, -1] == 0).all()  # the last token reaches no loss
    assert np.abs(attr).max() > 0


def run_case(base, adapter, max_batch_tokens: int = 10**6, two_tokens: bool = False) -> Effects:
    model, tokenizer = load(base, adapter)
    modules = find_lora_modules(model)
    first = reversed_first(modules)
    found = Effects(model, modules, first, max_batch_tokens)
    assert found.layers == sorted({m.layer for m in modules})
    samples = rows(tokenizer, 2)
    if two_tokens:
        samples.append(samples[0][:2])
    for ids in samples:
        check_row(model, modules, first, found, found.row(ids), ids)
    return found


def test_rank1_mlp_qwen2(qwen2_base, rank1_adapter):
    run_case(qwen2_base, rank1_adapter, two_tokens=True)


def test_rank2_attention_llama_later_layers(llama_base, tmp_path):
    """Rank 2, q/k/v/o only, layers 1 and 2: groups start past layer 0; several components."""
    adapter = save_adapter(
        llama_base,
        tmp_path / "a",
        rank=2,
        targets=("q_proj", "k_proj", "v_proj", "o_proj"),
        layers=[1, 2],
    )
    run_case(llama_base, adapter, max_batch_tokens=40)


def test_all_seven_modules_llama(llama_base, tmp_path):
    """The embedded model's architecture with every module adapted, as the demo could be."""
    adapter = save_adapter(llama_base, tmp_path / "a", targets=ALL_MODULES, seed=3)
    assert run_case(llama_base, adapter, two_tokens=True).modules == list(ALL_MODULES)


def test_batched_equals_one_by_one(qwen2_base, tmp_path, monkeypatch):
    """One ablation per forward and one position per logit chunk, or all at once: the same."""
    adapter = save_adapter(qwen2_base, tmp_path / "a", rank=2, targets=ALL_MODULES, seed=5)
    model, tokenizer = load(qwen2_base, adapter)
    modules = find_lora_modules(model)
    first = reversed_first(modules)
    ids = rows(tokenizer, 1, seed=4)[0]
    batched = Effects(model, modules, first, 10**6).row(ids)
    monkeypatch.setattr(effects, "LOGIT_ELEMENTS", 1)
    single = Effects(model, modules, first, 1).row(ids)
    assert len(Effects(model, modules, first, 10**6).ablations) == 42 + 3 + 7
    for name in RowEffects.__dataclass_fields__:
        a, b = getattr(batched, name), getattr(single, name)
        assert a.dtype == b.dtype and a.shape == b.shape, name
        # fp32 matmuls of other shapes round otherwise: a CE sum moves by ~1e-6 of its scale
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()), msg=name)


def test_row_of_one_token_is_refused(qwen2_base, rank1_adapter):
    model, _ = load(qwen2_base, rank1_adapter)
    modules = find_lora_modules(model)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        Effects(model, modules, reversed_first(modules), 1000).row(torch.tensor([3]))
