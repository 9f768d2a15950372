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


def window_of(ids: list[int], token: int, window: int) -> tuple[tuple[int, ...], int]:
    """The context window of token `token`: its ids clipped to the sequence, and its place."""
    first = max(0, token - window)
    return tuple(ids[first : token + window + 1]), token - first


def top_windows(
    per_example: list[np.ndarray], ids: list[list[int]], k: int, window: int, negative: bool
) -> list[dict]:
    """The k distinct windows with the strongest activations of one sign, strongest first,
    from every token grouped by its window: each with its extreme `value`, the `shown`
    occurrence (example position in the list, token index: the earliest of those within 1e-5
    relative of the extreme), that occurrence's `activation`, and `occurrences` (tokens with
    that window, of any sign)."""
    groups: dict[tuple, list[tuple[float, int, int]]] = {}
    for e, acts in enumerate(per_example):
        for t, v in enumerate(acts):
            groups.setdefault(window_of(ids[e], t, window), []).append((float(v), e, t))
    found = []
    for members in groups.values():
        signed = [(-v if negative else v, e, t) for v, e, t in members]
        extreme = max(s for s, _, _ in signed)
        if extreme <= 0:
            continue
        near = [(e, t) for s, e, t in signed if s >= extreme - 1e-5 * abs(extreme)]
        e, t = min(near)
        found.append(
            {
                "value": -extreme if negative else extreme,
                "shown": (e, t),
                "activation": float(per_example[e][t]),
                "occurrences": len(members),
            }
        )
    found.sort(key=lambda w: (-abs(w["value"]), w["shown"]))
    return found[:k]


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


def log_probs(model, ids: torch.Tensor) -> torch.Tensor:
    """[n-1, V] float64 log-probabilities of the plain full forward at positions 0..n-2."""
    return torch.log_softmax(model(input_ids=ids[None]).logits[0, :-1].double(), -1)


def kl_and_dloss(full: torch.Tensor, other: torch.Tensor, ids: torch.Tensor) -> tuple[float, float]:
    """Summed over the positions: KL(full || other) and CE_other - CE_full."""
    kl = (full.exp() * (full - other)).sum()
    target = ids[1:, None]
    dloss = (full.gather(1, target) - other.gather(1, target)).sum()
    return float(kl), float(dloss)


@torch.no_grad()
def ablated(model, modules, drop: dict[str, list[int]], ids: torch.Tensor) -> torch.Tensor:
    """log_probs with those lora_B columns (module name -> components) zeroed in the weights,
    restored after."""
    saved = {}
    for m in modules:
        if m.name in drop:
            weight = model.get_submodule(m.name).lora_B["default"].weight
            saved[m.name] = weight.clone()
            weight[:, drop[m.name]] = 0
    try:
        return log_probs(model, ids)
    finally:
        for m in modules:
            if m.name in saved:
                model.get_submodule(m.name).lora_B["default"].weight.copy_(saved[m.name])


def brute_attribution(model, modules, first, ids: torch.Tensor) -> np.ndarray:
    """[D, n], row first[m.name] + c: -dL/ds at s = 1 for a scale s multiplying each lora_A
    output at each position, which is -a * dL/da (L: the summed next-token CE)."""
    n = ids.numel()
    scales = {m.name: torch.ones(1, n, m.rank, requires_grad=True) for m in modules}
    handles = [
        model.get_submodule(m.name)
        .lora_A["default"]
        .register_forward_hook(lambda mod, args, out, s=scales[m.name]: out * s)
        for m in modules
    ]
    try:
        log_p = log_probs(model, ids)
        (-log_p.gather(1, ids[1:, None]).sum()).backward()
    finally:
        for h in handles:
            h.remove()
    attr = np.zeros((sum(m.rank for m in modules), n))
    for m in modules:
        attr[first[m.name] : first[m.name] + m.rank] = -scales[m.name].grad[0].T.numpy()
    return attr
