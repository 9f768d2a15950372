"""The analyses beyond top-k (quantile samples, token and position profiles, sibling activations,
write magnitude, logit effects, cross-layer cosines, NaN handling) against brute force."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from backend.analysis import token_decoder
from backend.config import RunConfig
from backend.contract import iter_directions, iter_examples
from backend.data import iter_sequences, read_rows
from backend.directions import find_lora_modules
from backend.generate_activations_data import main
from backend.output import build_document
from backend.pipeline import analyze
from tests.runs import K, W, load, reference, run_cli
from tests.test_quantiles import check_direction, windows
from tests.tiny import save_adapter


@pytest.fixture(scope="module")
def run(tmp_path_factory, qwen2_base, rank1_adapter, text_file):
    """One CLI run in small batches, and the brute-force activations of the same data."""
    tmp_path = tmp_path_factory.mktemp("run")
    doc = run_cli(
        tmp_path, qwen2_base, rank1_adapter, text_file, "--max-batch-tokens", "64",
        "--min-token-count", "3",
    )  # fmt: skip
    values, seqs, tokenizer = reference(qwen2_base, rank1_adapter, text_file)
    return doc, values, seqs, tokenizer


def directions(doc: dict):
    """(layer, module, component) and its direction, for every direction of the document."""
    for ref in iter_directions(doc):
        yield (ref.layer, ref.module, ref.component), ref.direction


def flat(values, seqs, key):
    """Every token of a direction: activation (float32), example index, position, token id."""
    acts = np.concatenate(values[key])
    example = np.concatenate([[s.example_index] * len(s.input_ids) for s in seqs])
    position = np.concatenate([np.arange(len(s.input_ids)) for s in seqs])
    ids = np.concatenate([s.input_ids for s in seqs])
    return acts, example, position, ids


def test_quantile_samples_are_the_seeded_sample_of_their_range(run):
    """Exact quantiles per sign, the seeded sample of distinct windows, and each sample's
    activation and context (the rule's resolution: tests/test_quantiles.py)."""
    doc, values, seqs, _ = run
    sequences = {s.example_index: list(s.input_ids) for s in seqs}
    for key, direction in directions(doc):
        acts, example, position, _ = flat(values, seqs, key)
        window = windows(example, position, sequences, W)
        check_direction(direction["quantile_samples"], acts, example, position, window)
        for entry in direction["quantile_samples"]:
            lo, hi = entry["value_range"]
            for e in entry["examples"]:
                i = np.flatnonzero((example == e["example_index"]) & (position == e["token_index"]))
                assert e["activation"] == pytest.approx(float(acts[i[0]]), rel=1e-5, abs=1e-6)
                assert lo <= e["activation"] <= hi
                assert e["tokens"] and e["activations"][e["target"]] == e["activation"]


def test_sibling_activations_are_the_layers_other_directions(run):
    doc, values, seqs, _ = run
    row_of = {s.example_index: i for i, s in enumerate(seqs)}
    for (layer, name, component), direction in directions(doc):
        for e in iter_examples(direction):
            assert set(e["sibling_activations"]) == {"gate_proj", "up_proj", "down_proj"} - {name}
            start = e["token_index"] - e["target"]
            for sibling, acts in e["sibling_activations"].items():
                expected = values[(layer, sibling, component)][row_of[e["example_index"]]]
                np.testing.assert_allclose(
                    acts, expected[start : start + len(acts)], rtol=1e-5, atol=1e-6
                )


def test_top_tokens_rank_token_strings_by_mean(run):
    doc, values, seqs, tokenizer = run
    decode = token_decoder(tokenizer)
    assert doc["metadata"]["min_token_count"] == 3
    for key, direction in directions(doc):
        acts, _, _, ids = flat(values, seqs, key)
        rows = []
        for token in np.unique(ids):
            seen = acts[ids == token].astype(np.float64)
            if seen.size >= 3:
                rows.append((seen.mean(), decode(int(token)), seen.size, seen.min(), seen.max()))
        rows.sort(key=lambda r: r[0])
        sides = (
            (direction["top_tokens"], rows[::-1][:10]),
            (direction["bottom_tokens"], rows[:10]),
        )
        for got, expected in sides:
            assert [(t["token"], t["count"]) for t in got] == [(r[1], r[2]) for r in expected]
            for t, (mean, _, _, lo, hi) in zip(got, expected, strict=True):
                assert t["mean"] == pytest.approx(mean, rel=1e-5, abs=1e-7)
                assert (t["min"], t["max"]) == pytest.approx((lo, hi), rel=1e-5, abs=1e-7)


def test_position_profile_is_the_mean_per_power_of_two_bucket(run):
    doc, values, seqs, _ = run
    for key, direction in directions(doc):
        acts, _, position, _ = flat(values, seqs, key)
        bucket = np.where(position == 0, 0, np.floor(np.log2(np.maximum(position, 1))) + 1)
        profile = direction["position_profile"]
        used = int(bucket.max()) + 1
        assert profile["edges"] == [0] + [2**b for b in range(used)]
        for b in range(used):
            chosen = acts[bucket == b].astype(np.float64)
            assert profile["count"][b] == chosen.size
            assert profile["mean"][b] == pytest.approx(chosen.mean(), rel=1e-5, abs=1e-7)


def test_write_norm_logit_effects_and_cross_layer_cosine(run, qwen2_base, rank1_adapter):
    doc, _, _, tokenizer = run
    decode = token_decoder(tokenizer)
    model, _ = load(qwen2_base, rank1_adapter)
    lora = {(m.layer, m.module): m for m in find_lora_modules(model)}
    unembed = model.get_output_embeddings().weight.detach()
    gain = model.get_base_model().model.norm.weight.detach()
    vectors = []
    for (layer, name, _), direction in directions(doc):
        m = lora[(layer, name)]
        expected = m.scaling * float(m.B[:, 0].norm())
        assert direction["write_norm_scale"] == pytest.approx(expected, rel=1e-6)
        vectors += [(f"L{layer}.{name}.A[0]", m.A[0])] if name != "down_proj" else []
        if name != "down_proj":
            assert "logit_effects" not in direction  # gate/up write into the MLP, not the stream
            continue
        vectors.append((f"L{layer}.{name}.B[0]", m.B[:, 0]))
        logits = unembed @ (gain * m.B[:, 0])
        for side, largest in (("top", True), ("bottom", False)):
            found = logits.topk(10, largest=largest)
            got = direction["logit_effects"][side]
            assert [t["token"] for t in got] == [decode(i) for i in found.indices.tolist()]
            np.testing.assert_allclose([t["value"] for t in got], found.values, rtol=1e-5)
    cosine = doc["cross_layer_cosine"]
    assert cosine["labels"] == [label for label, _ in vectors]
    unit = torch.stack([v / v.norm() for _, v in vectors])
    np.testing.assert_allclose(cosine["matrix"], unit @ unit.T, atol=1e-6)
    matrix = np.array(cosine["matrix"])
    assert np.allclose(matrix, matrix.T) and np.allclose(np.diag(matrix), 1.0)


def test_nan_and_inf_are_counted_and_left_out(tmp_path, qwen2_base, text_file):
    """NaN injected into one layer's MLP input: counted per direction, kept out of everything."""
    adapter = save_adapter(qwen2_base, tmp_path / "adapter", layers=[0])  # one layer: no spread
    model, tokenizer = load(qwen2_base, adapter)
    poisoned = {}  # (example row in batch, position) -> value, for the first batch only

    def poison(module, args, output):
        if not poisoned:
            output[0, 2, :] = math.nan
            output[0, 3, :] = math.inf
            poisoned.update({(0, 2): math.nan, (0, 3): math.inf})
        return output

    norm = model.get_base_model().model.layers[0].post_attention_layernorm
    handle = norm.register_forward_hook(poison)
    try:
        seqs = list(
            iter_sequences(
                read_rows(text_file), tokenizer, text_field=None, max_length=None, num_examples=None
            )
        )
        config = RunConfig(
            lora_path=str(adapter), top_k=4, context_window=3, num_examples=None,
            max_batch_tokens=10_000,
        )  # fmt: skip
        state = analyze(model, tokenizer, list(read_rows(text_file)), config)  # read twice
    finally:
        handle.remove()
    doc = build_document(state)
    json.dumps(doc, allow_nan=False)  # valid JSON: no NaN anywhere
    total = sum(len(s.input_ids) for s in seqs)
    bad = 2  # gate and up read the poisoned norm; down_proj reads act(gate) * up, poisoned too
    assert doc["metadata"]["num_nonfinite"] == 3 * bad
    for _, direction in directions(doc):
        stats = direction["stats"]
        assert (stats["nonfinite"], stats["count"]) == (bad, total - bad)
        assert math.isfinite(stats["mean"]) and math.isfinite(stats["std"])
        assert sum(direction["histogram"]["counts"]) == total - bad
        assert sum(direction["position_profile"]["count"]) == total - bad
        contexts = [a for e in direction["top_positive"] for a in e["activations"]]
        assert all(a is None or math.isfinite(a) for a in contexts)


def test_store_sequences_keeps_every_shown_example_whole(
    tmp_path, qwen2_base, rank1_adapter, text_file
):
    doc = run_cli(tmp_path, qwen2_base, rank1_adapter, text_file, "--store-sequences")
    _, seqs, tokenizer = reference(qwen2_base, rank1_adapter, text_file)
    decode = token_decoder(tokenizer)
    shown = {e["example_index"] for _, d in directions(doc) for e in iter_examples(d)}
    by_index = {s.example_index: s for s in seqs}
    assert set(doc["examples"]) == {str(i) for i in shown}
    for index, stored in doc["examples"].items():
        assert stored["tokens"] == [decode(t) for t in by_index[int(index)].input_ids]
        assert stored["source"] == str(text_file)
    # Shards store their own examples; merged, they equal one run's.
    shards = [tmp_path / f"shard{i}.pt" for i in range(2)]
    for i, shard in enumerate(shards):
        argv = ["--base-model", str(qwen2_base), "--lora-path", str(rank1_adapter)]
        argv += ["--data-file", str(text_file), "--output", str(shard), "--quiet"]
        argv += ["--top-k", str(K), "--context-window", str(W)]
        assert main([*argv, "--shard", f"{i}/2", "--store-sequences"]) == 0
    merged = tmp_path / "merged.json"
    assert main(["merge", str(merged), *map(str, shards)]) == 0
    assert json.loads(merged.read_text())["examples"] == doc["examples"]
