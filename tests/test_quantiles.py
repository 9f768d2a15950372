"""Quantile samples against brute force: ranges that resolve (the rule of issue 11), exact
quantiles, the seeded sample of distinct windows, and the same result however the data is split.

The rule: a sign with at least 1,000 tokens where no single value holds more than 5% of them
gets boundaries near the cuts 0.5 and 0.9 (within 0.05) and 0.99 and 0.999 (a fraction above
within a factor of 2 of 1 - q). A cut is checked where some split between distinct values meets
it: where a repeated value holds the top 0.3% (a first token shared by many rows), no exact
range can end near 0.999.
"""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from backend.contexts import token_keys
from backend.contract import iter_directions
from backend.sampling import SAMPLES
from backend.tracking import Tracker
from tests.runs import reference, run_cli
from tests.tiny import random_texts, save_adapter

W = 2  # context tokens each side
CUTS = (0.5, 0.9, 0.99, 0.999)


def near(q: float, fraction: float) -> bool:
    """Whether a boundary with `fraction` of the tokens below it meets the cut q."""
    if q < 0.95:
        return abs(fraction - q) <= 0.05
    return 0.5 <= (1 - fraction) / (1 - q) <= 2


def reachable(magnitude: np.ndarray, q: float) -> bool:
    """Whether a split between distinct values of |x| meets the cut q."""
    _, counts = np.unique(magnitude, return_counts=True)
    below = np.cumsum(counts)[:-1] / len(magnitude)
    return any(near(q, f) for f in below)


def windows(example: np.ndarray, position: np.ndarray, sequences, width: int = W) -> list:
    """Each token's window as brute force sees it: the ids of positions p-W .. p+W clipped to
    its sequence (sequences[example]: its ids), and p's place in it."""
    out = []
    for e, p in zip(example.tolist(), position.tolist(), strict=True):
        seq = sequences[e]
        lo, hi = max(0, p - width), min(len(seq), p + width + 1)
        out.append((tuple(seq[lo:hi]), p - lo))
    return out


def check_direction(ranges, acts, example, position, window, rules=(None, None), cuts=CUTS):
    """One direction's exported ranges (dicts whose examples have example_index, token_index)
    against its tokens: acts [N] float32, example [N], position [N], window [N] (hashable).
    rules: per sign (positive first), whether the resolution rule must apply (None: decide
    from the data); cuts: those of the rule to check."""
    keys = token_keys(torch.tensor(example), torch.tensor(position)).numpy()
    assert len(set(keys.tolist())) == len(keys)  # distinct tokens never tie
    negative, magnitude = np.signbit(acts), np.abs(acts)
    for side, rule in zip((False, True), rules, strict=True):
        entries = [r for r in ranges if (r["value_range"][0] < 0 or r["value_range"][1] < 0 or
                   np.signbit(r["value_range"][1])) == side]  # fmt: skip
        mine = negative == side
        if not mine.any():
            assert not entries and rule is None
            continue
        bounds = [r["quantile_range"] for r in entries]
        assert bounds[0][0] == 0.0 and bounds[-1][1] == 1.0
        assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))  # contiguous
        bottoms = [min(abs(v) for v in r["value_range"]) for r in entries]
        tops = [*bottoms[1:], np.inf]
        m = magnitude[mine]
        for r, bottom, top in zip(entries, bottoms, tops, strict=True):
            assert r["quantile_range"][0] == np.mean(m < bottom)  # exact
            inside = mine & (magnitude >= bottom) & (magnitude < top)
            assert inside.any()
            best: dict = {}  # window -> its token of smallest key
            for i in np.flatnonzero(inside):
                if window[i] not in best or keys[i] < keys[best[window[i]]]:
                    best[window[i]] = i
            expected = sorted(best.values(), key=lambda i: keys[i])[:SAMPLES]
            got = [(e["example_index"], e["token_index"]) for e in r["examples"]]
            assert got == [(int(example[i]), int(position[i])) for i in expected]
            assert len({window[i] for i in expected}) == len(expected)  # distinct windows
        _, counts = np.unique(m, return_counts=True)
        applies = len(m) >= 1000 and counts.max() <= 0.05 * len(m)
        assert rule is None or applies == rule
        if applies:
            edges = [b[0] for b in bounds[1:]]
            for q in cuts:
                assert any(near(q, f) for f in edges) or not reachable(m, q), (q, bounds)


# ---------------------------------------------------------------- the tracker on its own


def distributions(n: int, generator: torch.Generator) -> torch.Tensor:
    """[6, n] float32 directions of every kind the rule must cover, and two it does not."""
    normal = torch.randn(n, generator=generator)
    uniform = torch.rand(n, generator=generator)
    return torch.stack(
        [
            normal,  # both signs
            1.0 + 1e-4 * normal,  # narrow: all in one octave, one sign
            torch.tan((uniform - 0.5) * 3.14159),  # Cauchy: heavy tails
            torch.exp(3 * normal) * 1e-3,  # log-normal, wide: far below its largest
            torch.where(uniform < 0.3, 0.0, normal),  # a value holding 30%: rule does not apply
            torch.randint(0, 4, (n,), generator=generator).float(),  # four values only
        ]
    ).float()


def feed(tracker: Tracker, acts, ids, lengths, first: int) -> None:
    """Rows [B, L] of tokens (right padding) with activations [D, B, L]."""
    b, length = ids.shape
    real = (torch.arange(length)[None] < lengths[:, None]).flatten().nonzero().squeeze(1)
    tracker.update(acts.flatten(1), real, ids, lengths, torch.arange(first, first + b))


def dataset(seed: int, rows: int = 96, length: int = 80):
    """Rows of tokens in which every third row repeats an earlier one behind one shared prefix
    (repeated windows), with activations of `distributions`."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 6, (rows, length), generator=generator)
    ids[:, :10] = 7  # a shared prefix
    ids[2::3] = ids[0:-2:3]  # repeated rows
    lengths = torch.randint(length // 2, length + 1, (rows,), generator=generator)
    lengths[2::3] = lengths[0:-2:3]
    acts = distributions(rows * length, generator).view(-1, rows, length)
    return acts, ids, lengths


def tracker_for(d: int) -> Tracker:
    return Tracker(d, 3, W, 20, torch.device("cpu"), vocab_size=8)


def export(tracker: Tracker, d: int) -> list[dict]:
    return [
        {**r, "examples": [vars(e) for e in r["examples"]]} for r in tracker.samples.export(d, [-1])
    ]


def test_every_kind_of_distribution_against_brute_force():
    acts, ids, lengths = dataset(seed=3)
    d = acts.shape[0]
    tracker = tracker_for(d)
    for first in range(0, ids.shape[0], 5):  # batches of 5 rows
        rows = slice(first, first + 5)
        feed(tracker, acts[:, rows], ids[rows], lengths[rows], first)
    inside = torch.arange(ids.shape[1])[None] < lengths[:, None]  # [B, L]
    example, position = inside.nonzero(as_tuple=True)
    sequences = [ids[i, : lengths[i]].tolist() for i in range(ids.shape[0])]
    window = windows(example.numpy(), position.numpy(), sequences)
    # per direction, whether the rule applies to each sign (None: a sign without tokens)
    rules = [(True, True), (True, None), (True, True), (True, None), (False, True), (False, None)]
    for j in range(d):
        check_direction(
            export(tracker, j), acts[j][inside].numpy(), example.numpy(), position.numpy(),
            window, rules[j],
        )  # fmt: skip
    assert len(set(window)) < len(window) * 0.8  # the data repeats windows: the rule was tested


def test_any_split_gives_the_same_ranges_and_samples():
    acts, ids, lengths = dataset(seed=4)
    d, rows = acts.shape[0], ids.shape[0]

    def run(batches: list[range]) -> Tracker:
        tracker = tracker_for(d)
        for b in batches:
            feed(tracker, acts[:, b.start : b.stop], ids[b.start : b.stop],
                 lengths[b.start : b.stop], b.start)  # fmt: skip
        return tracker

    one = run([range(0, rows)])
    small = run([range(i, min(i + 3, rows)) for i in range(0, rows, 3)])
    # shards of reversed order, merged through a saved state
    parts = [run([range(i, min(i + 7, rows))]) for i in range(0, rows, 7)][::-1]
    merged = parts[0]
    for part in parts[1:]:
        merged.merge(Tracker.from_state_dict(part.state_dict(), torch.device("cpu")))
    for j in range(d):
        expected = export(one, j)
        assert export(small, j) == expected
        assert export(merged, j) == expected


# ---------------------------------------------------------------- tiny real models


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_the_rule_holds_on_tiny_random_models(tmp_path, arch, qwen2_base, llama_base):
    """Real PEFT adapters saved to disk, every direction against PEFT's own lora_A outputs, on
    rows that repeat behind a shared prefix.

    The cuts 0.5 and 0.999 are left out here (README: the limits of the rule): a tiny model's
    30-word vocabulary piles |x| into spikes, and a spike of 10% of the tokens within one bucket
    at the median (1/8 octave) misses it by more than 0.05; its largest few values, repeated,
    can lie within one tail bucket (1/64 octave)."""
    base = qwen2_base if arch == "qwen2" else llama_base
    adapter = save_adapter(base, tmp_path / "adapter", seed=3)
    data = tmp_path / "texts.jsonl"
    texts = random_texts(200, seed=11)
    texts = [f"let me think {t}" for t in texts + texts[:60]]  # repeated rows, shared prefix
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    doc = run_cli(
        tmp_path, base, adapter, data, "--num-examples", "all", "--max-batch-tokens", "512"
    )
    values, seqs, _ = reference(base, adapter, data)
    sequences = {s.example_index: list(s.input_ids) for s in seqs}
    width = doc["metadata"]["context_window"]
    example = np.concatenate([[s.example_index] * len(s.input_ids) for s in seqs])
    position = np.concatenate([np.arange(len(s.input_ids)) for s in seqs])
    window = windows(example, position, sequences, width)
    applied = 0
    for ref in iter_directions(doc):
        acts = np.concatenate(values[(ref.layer, ref.module, ref.component)])
        ranges = ref.direction["quantile_samples"]
        check_direction(ranges, acts, example, position, window, cuts=(0.9, 0.99))
        applied += sum(int((np.signbit(acts) == side).sum() >= 1000) for side in (False, True))
        if (ref.layer, ref.module) == (1, "down_proj"):  # the case: one range a sign
            assert len(ranges) >= 8  # four or more per sign
    assert applied >= 12  # most signs of the 9 directions have the tokens the rule needs
