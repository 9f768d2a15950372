"""The feature sweep (backend.sae_features) against a brute force over the float32 cache."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

import generate_html_dashboard as dashboard
from backend.adapter_cache import CacheReader, CacheWriter
from backend.contract import writes_residual
from backend.directions import LoraModule
from backend.profiles import POSITION_BUCKETS
from backend.sae import SAE, evaluate, initial_sae, load_sae
from backend.sae_features import Writes, residual_writes, sweep_features
from tests.reference import assert_histogram, top_windows, window_of
from tests.test_adapter_cache import Data, batch_of

MODULES = ("gate_proj", "up_proj", "down_proj", "o_proj")
LAYERS, HIDDEN, VOCAB, LATENTS, DEAD = 2, 6, 7, 24, (3, 17)
D = LAYERS * len(MODULES)
TOP_K, WINDOW, BINS, MIN_COUNT, LOGITS = 4, 1, 12, 2, 3
TOKENS = {i: f"t{i}" for i in range(VOCAB)}


def small_vocabulary_data(num_examples: int, seed: int = 0) -> Data:
    """Sequences over a vocabulary of VOCAB ids, so that windows repeat; D activations each."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 25, (num_examples,), generator=g).tolist()
    n = sum(lengths)
    example = torch.repeat_interleave(torch.arange(num_examples), torch.tensor(lengths))
    position = torch.cat([torch.arange(m) for m in lengths])
    x = torch.randn(n, D, generator=g) * torch.logspace(-2, 2, D)
    return Data(x, example, position, torch.randint(0, VOCAB, (n,), generator=g), lengths)


def modules(seed: int = 1) -> list[LoraModule]:
    """Rank-1 modules of every kind in MODULES per layer, in document order."""
    g = torch.Generator().manual_seed(seed)
    return [
        LoraModule(
            name=f"model.layers.{layer}.x.{module}",
            layer=layer,
            module=module,
            A=torch.randn(1, 4, generator=g),
            B=torch.randn(HIDDEN if writes_residual(module) else 5, 1, generator=g),
            scaling=float(torch.rand(1, generator=g)) + 0.5,
        )
        for layer in range(LAYERS)
        for module in MODULES
    ]


def write_cache(folder: Path, data: Data, writers: list[list[list[int]]]) -> CacheReader:
    """One writer per list of batches (each a list of examples), fed as the pass does."""
    for w, batches in enumerate(writers):
        writer = CacheWriter(folder, f"w{w}", D, seed=7)
        for examples in batches:
            writer.update(batch_of(data, examples))
        writer.finish()
    return CacheReader(folder)


def saved_sae(folder: Path, data: Data) -> SAE:
    """A random SAE (firing on about a third of the tokens, latents DEAD never), saved and
    loaded back as a run would use it."""
    labels = [{"layer": m.layer, "module": m.module, "component": 0} for m in modules()]
    x = data.x.double()
    sae = initial_sae(
        D, LATENTS, x.mean(0).float(), x.square().mean(0).sqrt().float(), seed=5, labels=labels
    )
    sae.b_enc[list(DEAD)] = -100.0
    sae.threshold = torch.tensor(0.4)
    sae.save(folder / "run.sae.safetensors")
    return load_sae(folder / "run.sae.safetensors", D)


def brute_features(sae: SAE, data: Data) -> np.ndarray:
    """[N, F] float64: the saved SAE applied to every token's exact activations."""
    t = {n: v.double() for n, v in sae.tensors().items()}
    pre = (data.x.double() / t["scale"] - t["b_dec"]) @ t["W_enc"] + t["b_enc"]
    return torch.where(pre > t["threshold"], pre.clamp(min=0), 0.0).numpy()


def sweep(sae: SAE, reader: CacheReader, budget: int = 2**30):
    b, scaling = residual_writes(modules(), sae.labels)
    g = torch.Generator().manual_seed(9)
    unembed, gain = torch.randn(VOCAB, HIDDEN, generator=g), torch.rand(HIDDEN, generator=g) + 0.5
    writes = Writes(b, scaling, unembed, gain, LOGITS)
    found = sweep_features(
        sae, reader, TOKENS, VOCAB, TOP_K, WINDOW, BINS, MIN_COUNT, writes, budget
    )
    return found, unembed, gain


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("features")
    data = small_vocabulary_data(150)
    batches = [list(range(s, min(150, s + 9))) for s in range(0, 150, 9)]
    reader = write_cache(folder / "cache", data, [batches])
    sae = saved_sae(folder, data)
    return data, reader, sae, brute_features(sae, data), *sweep(sae, reader)


def test_features_equal_a_brute_force(run):
    data, reader, sae, f, found, _, _ = run
    n = len(data.x)
    firing = (f > 0).sum(0)
    assert found.dead == [j for j in range(LATENTS) if firing[j] == 0]
    assert set(DEAD) <= set(found.dead) and len(found.dead) < LATENTS // 2
    assert [e["index"] for e in found.features] == [j for j in range(LATENTS) if firing[j]]
    assert found.num_tokens == n
    # Frequencies exactly, and the L0 they add up to, as the quality sweep measures it.
    assert [e["frequency"] for e in found.features] == [
        firing[e["index"]] / n for e in found.features
    ]
    l0 = sum(e["frequency"] for e in found.features)
    assert l0 == pytest.approx((f > 0).sum(1).mean(), rel=1e-12)
    assert l0 == pytest.approx(evaluate(sae, reader).l0, rel=1e-12)
    ids = [data.ids[data.rows(e)].tolist() for e in range(len(data.lengths))]
    for entry in found.features:
        values = f[:, entry["index"]]
        per_example = [values[data.rows(e)] for e in range(len(data.lengths))]
        check_feature(entry, values, per_example, ids)
    # Windows repeat in this data: distinctness is what the top lists are tested on.
    assert any(e["occurrences"] > 1 for entry in found.features for e in entry["top_positive"])


def check_feature(entry: dict, values: np.ndarray, per_example: list, ids: list) -> None:
    stats = entry["stats"]
    assert stats["count"] == len(values) and stats["nonfinite"] == 0
    assert stats["min"] == 0.0
    assert stats["max"] == pytest.approx(values.max(), rel=1e-5)
    assert stats["mean"] == pytest.approx(values.mean(), rel=1e-5)
    assert stats["std"] == pytest.approx(values.std(), rel=1e-4)
    assert_histogram(entry["histogram"], values)
    # The page's histogram: the tokens where the feature fires, those at 0 counted apart.
    firing, zeros = dashboard._firing_histogram(entry)
    assert zeros == int((values == 0).sum()) > 0
    assert_histogram(firing, values[values > 0])
    # Top-k: one slot per distinct window, the brute force's occurrence shown.
    expected = top_windows(per_example, ids, TOP_K, WINDOW, negative=False)
    got = entry["top_positive"]
    assert [(e["example_index"], e["token_index"]) for e in got] == [w["shown"] for w in expected]
    assert [e["activation"] for e in got] == pytest.approx(
        [w["activation"] for w in expected], rel=1e-5
    )
    assert [e["occurrences"] for e in got] == [w["occurrences"] for w in expected]
    for e in got:
        window, target = window_of(ids[e["example_index"]], e["token_index"], WINDOW)
        assert e["tokens"] == [TOKENS[i] for i in window] and e["target"] == target
        lo = e["token_index"] - target
        acts = per_example[e["example_index"]][lo : lo + len(window)]
        assert e["activations"] == pytest.approx(acts.tolist(), rel=1e-5, abs=1e-6)
        assert "sibling_activations" not in e
    # Quantile samples: each shown token's own activation, and its window counted.
    for r in entry["quantile_samples"]:
        for e in r["examples"]:
            value = per_example[e["example_index"]][e["token_index"]]
            assert e["activation"] == pytest.approx(value, rel=1e-5, abs=1e-6)
            lo, hi = r["value_range"]
            assert lo - 1e-6 <= e["activation"] <= hi + 1e-6
            assert e["occurrences"] >= 1
    check_profiles(entry, per_example, ids)


def check_profiles(entry: dict, per_example: list, ids: list) -> None:
    positions = np.concatenate([np.arange(len(a)) for a in per_example])
    values = np.concatenate(per_example)
    bucket = np.where(positions == 0, 0, np.floor(np.log2(np.maximum(positions, 1))) + 1)
    profile = entry["position_profile"]
    used = int(bucket.max()) + 1
    assert used <= POSITION_BUCKETS and profile["count"] == np.bincount(bucket.astype(int)).tolist()
    means = [values[bucket == b].mean() for b in range(used)]
    assert profile["mean"] == pytest.approx(means, rel=1e-5, abs=1e-7)
    flat_ids = np.concatenate(ids)
    rows = [
        (float(values[flat_ids == i].mean()), i)
        for i in range(VOCAB)
        if (flat_ids == i).sum() >= MIN_COUNT
    ]
    rows.sort(key=lambda r: -r[0])
    got = entry["top_tokens"]
    assert [t["token"] for t in got] == [TOKENS[i] for _, i in rows[: len(got)]]
    assert [t["mean"] for t in got] == pytest.approx([m for m, _ in rows[: len(got)]], rel=1e-5)
    assert set(entry) >= {"index", "frequency", "composition", "logit_effects"}
    assert "top_negative" not in entry and "bottom_tokens" not in entry


def test_composition_and_logit_effects_equal_a_brute_force(run):
    _, _, sae, _, found, unembed, gain = run
    labels = [(m.layer, m.module, 0) for m in modules()]
    w_dec = sae.W_dec.double()
    for entry in found.features:
        row = w_dec[entry["index"]]
        order = np.argsort(-row.abs().numpy(), kind="stable")[:16]
        assert [(c["layer"], c["module"], c["component"]) for c in entry["composition"]] == [
            labels[d] for d in order
        ]
        assert [c["weight"] for c in entry["composition"]] == pytest.approx(row[order].tolist())
        write = torch.zeros(HIDDEN, dtype=torch.float64)
        for d, m in enumerate(modules()):
            if writes_residual(m.module):
                write += row[d] * sae.scale[d].double() * m.scaling * m.B[:, 0].double()
        logits = unembed.double() @ (write * gain.double())
        top = logits.argsort(descending=True)[:LOGITS].tolist()
        bottom = logits.argsort()[:LOGITS].tolist()
        effects = entry["logit_effects"]
        assert [e["token"] for e in effects["top"]] == [TOKENS[i] for i in top]
        assert [e["token"] for e in effects["bottom"]] == [TOKENS[i] for i in bottom]
        assert [e["value"] for e in effects["top"]] == pytest.approx(
            logits[top].tolist(), rel=1e-4, abs=1e-5
        )


def assert_close(a, b, path: str = "") -> None:
    """Equal, floats up to the rounding of sums in another order (the moments sum each batch
    in float32)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            assert_close(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_close(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and not (a is None or math.isnan(a)):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-9), path
    else:
        assert a == b, path


def test_features_do_not_depend_on_writers_batches_or_chunks(run, tmp_path):
    data, _, sae, _, found, _, _ = run
    odd, even = list(range(1, 150, 2))[::-1], list(range(0, 150, 2))
    writers = [
        [odd[s : s + 4] for s in range(0, len(odd), 4)],
        [even[s : s + 13] for s in range(0, len(even), 13)],
    ]
    reader = write_cache(tmp_path, data, writers)
    small = sweep(sae, reader, budget=250_000)[0]  # a few latents per replay
    assert small.chunk < LATENTS // 2
    assert small.dead == found.dead
    assert_close(small.features, found.features)
    assert small.memory <= 250_000 < found.memory
