"""Brute force: every direction's activation at every token, read from PEFT's own lora_A.

One example at a time, full forward, a hook on each lora_A module: nothing shared with the code
under test but the model loading path.
"""

from __future__ import annotations

import numpy as np
import torch
from peft.tuners.lora import LoraLayer


def lora_a_activations(model, sequences) -> dict[tuple[int, str, int], list[np.ndarray]]:
    """{(layer, module, component): [activations of example i, one per token]} in input order."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            layer = int(name.split(".layers.")[1].split(".")[0])
            found[(layer, name.rsplit(".", 1)[1])] = module.lora_A["default"]
    values: dict[tuple[int, str, int], list[np.ndarray]] = {}
    captured = {}
    handles = [
        lora_a.register_forward_hook(lambda m, a, out, key=key: captured.__setitem__(key, out))
        for key, lora_a in found.items()
    ]
    try:
        with torch.no_grad():
            for ids in sequences:
                model(input_ids=torch.tensor([ids]))
                for (layer, module), out in captured.items():
                    for c in range(out.shape[-1]):
                        values.setdefault((layer, module, c), []).append(out[0, :, c].numpy())
    finally:
        for h in handles:
            h.remove()
    return values


def top_k(per_example: list[np.ndarray], k: int, negative: bool) -> list[tuple[float, int, int]]:
    """(activation, example position in the list, token index) of the k strongest of one sign."""
    items = [
        (float(v), e, t)
        for e, acts in enumerate(per_example)
        for t, v in enumerate(acts)
        if (v < 0 if negative else v > 0)
    ]
    return sorted(items, key=lambda x: x[0], reverse=not negative)[:k]


def assert_histogram(hist: dict, values: np.ndarray, rel: float = 1e-5, abs: float = 1e-6) -> None:
    """`hist` counts `values` (computed by another forward pass, so equal up to float rounding).

    Bin i is [edges[i], edges[i+1]), so the counts up to edge j are the values below it. A value
    within rounding (`rel` of the largest |value|, plus `abs`) of an edge may fall on either
    side; every other value must be in its own bin, so a bin off by one is still caught.
    """
    edges, counts = np.asarray(hist["edges"]), np.asarray(hist["counts"])
    assert len(edges) == len(counts) + 1 and counts.sum() == values.size
    tol = rel * np.abs(values).max(initial=0.0) + abs
    below = np.concatenate([[0], np.cumsum(counts)])  # [bins + 1] values below each edge
    surely_below = np.searchsorted(np.sort(values), edges - tol, side="left")
    maybe_below = np.searchsorted(np.sort(values), edges + tol, side="left")
    bad = (below < surely_below) | (below > maybe_below)
    assert not bad.any(), (
        f"counts {counts.tolist()} do not fit the values at edges {edges[bad].tolist()}: "
        f"{below[bad].tolist()} below, expected {surely_below[bad].tolist()} to "
        f"{maybe_below[bad].tolist()}"
    )
