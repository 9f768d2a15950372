"""Brute force: every direction's activation at every token, read from PEFT's own lora_A.

One example at a time, full forward, a hook on each lora_A module (or each down_proj, for the
baseline neurons): nothing shared with the code under test but the model loading path.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from peft.tuners.lora import LoraLayer

from backend.contexts import token_keys
from backend.contract import iter_examples
from backend.sampling import RESERVOIR_PER_CONTEXT


def lora_a_activations(model, sequences) -> dict[tuple[int, str, int], list[np.ndarray]]:
    """{(layer, module, component): [activations of example i, one per token]} in input order."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            found[(layer_of(name), name.rsplit(".", 1)[1])] = module.lora_A["default"]
    values: dict[tuple[int, str, int], list[np.ndarray]] = {}
    for captured in hooked(model, sequences, found, inputs=False):
        for (layer, module), out in captured.items():
            for c in range(out.shape[-1]):
                values.setdefault((layer, module, c), []).append(out[0, :, c].numpy())
    return values


def down_proj_inputs(
    model, sequences, neurons: dict[int, list[int]]
) -> dict[tuple[int, int], list[np.ndarray]]:
    """{(layer, neuron): [its coordinate of the down_proj input, one per token, of example i]}
    for the neurons of each layer, read at the MLP's down_proj of the model as given."""
    found = {
        layer_of(name): module
        for name, module in model.named_modules()
        if name.endswith(".mlp.down_proj") and layer_of(name) in neurons
    }
    values: dict[tuple[int, int], list[np.ndarray]] = {}
    for captured in hooked(model, sequences, found, inputs=True):
        for layer, x in captured.items():
            for neuron in neurons[layer]:
                values.setdefault((layer, neuron), []).append(x[0, :, neuron].numpy())
    return values


def layer_of(name: str) -> int:
    return int(name.split(".layers.")[1].split(".")[0])


def hooked(model, sequences, modules: dict, inputs: bool) -> Iterator[dict]:
    """For each sequence, one at a time through the full forward: {key: what each module of
    `modules` (key -> module) took in (inputs) or gave out}."""
    captured = {}

    def keep(key):
        if inputs:
            return lambda module, args: captured.__setitem__(key, args[0])
        return lambda module, args, out: captured.__setitem__(key, out)

    handles = [
        module.register_forward_pre_hook(keep(key))
        if inputs
        else module.register_forward_hook(keep(key))
        for key, module in modules.items()
    ]
    try:
        with torch.no_grad():
            for ids in sequences:
                model(input_ids=torch.tensor([ids]))
                yield captured
    finally:
        for h in handles:
            h.remove()


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


NEAR_TIES = 8  # windows beyond the k-th that another forward pass may rank among the k


def in_order_up_to_rounding(
    windows: list[dict], shown: list[tuple[int, int]], k: int, rel: float = 1e-5
) -> list[dict]:
    """`windows` (top_windows' of k + NEAR_TIES) in the order of `shown`, the occurrences a run
    listed: each must be one of the strongest windows not listed before it, up to `rel` of its
    value (activations from another forward pass differ in their last bits, and so may order
    near-equal windows either way); fails where the lists differ otherwise."""
    assert len(shown) == min(k, len(windows))
    left, ordered = list(windows), []
    for place in shown:
        strongest = abs(left[0]["value"])
        near = [w for w in left if abs(w["value"]) >= strongest * (1 - rel)]
        match = [w for w in near if w["shown"] == place]
        assert match, f"{place} is not among the strongest windows left: {near}"
        ordered.append(match[0])
        left.remove(match[0])
    return ordered


def below_median_sample(
    per_example: list[np.ndarray], seqs, window: int, n: int, sign: int, top: float, inclusive: bool
) -> list[tuple[int, int]] | None:
    """The lowest range's reservoir sample by definition: of every token grouped by its window,
    each window's token of smallest key; the RESERVOIR_PER_CONTEXT * n windows of smallest such
    key; in key order, the first n whose token has the sign and |activation| below `top` (at
    most `top` if `inclusive`), as (example index, token index). None where a kept token's
    activation lies within rounding of 0 or of `top`: another forward pass may place it either
    side."""
    best: dict[tuple, tuple[int, int, int]] = {}  # window -> (key, position in seqs, token)
    for e, s in enumerate(seqs):
        tokens = torch.arange(len(s.input_ids))
        keys = token_keys(torch.full_like(tokens, s.example_index), tokens).tolist()
        for t, key in enumerate(keys):
            w = window_of(s.input_ids, t, window)
            best[w] = min(best.get(w, (key, e, t)), (key, e, t))
    chosen = []
    for _, e, t in sorted(best.values())[: RESERVOIR_PER_CONTEXT * n]:
        x = float(per_example[e][t])
        if abs(x) < 1e-6 or abs(abs(x) - top) <= 1e-5 * top:
            return None
        if (x < 0) == (sign < 0) and (abs(x) < top or inclusive):
            chosen.append((seqs[e].example_index, t))
    return chosen[:n]


def check_below_median(direction, per_example, seqs, window: int, n: int) -> int:
    """Each sign's lowest quantile range against `below_median_sample`, where the reservoir's
    sample is the one shown (more than the range's own 2 samples); how many signs compared."""
    compared = 0
    for entry in direction["quantile_samples"]:
        if entry["cut"] != 0:
            continue
        sign = entry["sign"]
        top = max(abs(v) for v in entry["value_range"])
        extreme = direction["stats"]["max"] if sign > 0 else -direction["stats"]["min"]
        expected = below_median_sample(
            per_example, seqs, window, n, sign, top, inclusive=top == extreme
        )
        got = [(e["example_index"], e["token_index"]) for e in entry["examples"]]
        assert len(got) <= n and len(set(got)) == len(got)
        if expected is not None and len(expected) > 2:
            assert got == expected
            compared += 1
    return compared


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


def check_summaries(direction, per_example, seqs, tokenizer, k: int, window: int) -> None:
    """A direction's (or a baseline neuron's) stats, histogram, top lists and every Example's
    occurrences against its brute-force activations `per_example` (one array per sequence of
    `seqs`, in order)."""
    everything = np.concatenate(per_example).astype(np.float64)
    stats = direction["stats"]
    assert stats["count"] == everything.size
    assert stats["min"] == pytest.approx(everything.min(), rel=1e-5, abs=1e-6)
    assert stats["max"] == pytest.approx(everything.max(), rel=1e-5, abs=1e-6)
    assert stats["mean"] == pytest.approx(everything.mean(), rel=1e-4, abs=1e-6)
    assert stats["std"] == pytest.approx(everything.std(), rel=1e-4, abs=1e-6)
    hist = direction["histogram"]
    assert len(hist["counts"]) == len(hist["edges"]) - 1
    assert hist["edges"][0] <= stats["min"] and stats["max"] < hist["edges"][-1]
    assert_histogram(hist, everything)
    position_of = {s.example_index: i for i, s in enumerate(seqs)}
    ids = [s.input_ids for s in seqs]
    for negative, field in ((False, "top_positive"), (True, "top_negative")):
        got = direction[field]
        # One slot per distinct window, each showing the brute force's occurrence (the
        # earliest of those equal to its extreme up to rounding), in the brute force's order
        # but for windows whose values are within rounding of each other.
        shown = [(position_of[e["example_index"]], e["token_index"]) for e in got]
        expected = in_order_up_to_rounding(
            top_windows(per_example, ids, k + NEAR_TIES, window, negative), shown, k
        )
        assert [e["activation"] for e in got] == pytest.approx(
            [w["activation"] for w in expected], rel=1e-5, abs=1e-6
        )
        windows = [
            window_of(ids[position_of[e["example_index"]]], e["token_index"], window) for e in got
        ]
        assert len(set(windows)) == len(got)
        assert [e["occurrences"] for e in got] == [w["occurrences"] for w in expected]
        for example in got:  # each shown with its context, as the brute force read it
            position, token = position_of[example["example_index"]], example["token_index"]
            acts = per_example[position]
            assert example["activation"] == pytest.approx(acts[token], rel=1e-5, abs=1e-6)
            lo, hi = max(0, token - window), min(len(ids[position]), token + window + 1)
            assert example["tokens"] == [tokenizer.decode([i]) for i in ids[position][lo:hi]]
            assert example["activations"] == pytest.approx(acts[lo:hi].tolist(), rel=1e-5, abs=1e-6)
            assert example["target"] == token - lo
    # every Example (quantile samples too) counts its window's tokens in the whole data
    occurrences = Counter(window_of(s, t, window) for s in ids for t in range(len(s)))
    for example in iter_examples(direction):
        shown = window_of(
            ids[position_of[example["example_index"]]], example["token_index"], window
        )
        assert example["occurrences"] == occurrences[shown]


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
