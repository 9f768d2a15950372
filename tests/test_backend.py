"""The backend against brute force, on tiny real models with real PEFT adapters from disk."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from backend import UserError
from backend.capture import ActivationCapture, read_sites
from backend.config import RunConfig
from backend.contract import iter_directions, validate
from backend.data import read_rows
from backend.directions import find_lora_modules
from backend.generate_activations_data import main
from backend.loading import BaseModel, load_model
from backend.pipeline import analyze
from backend.tracking import Tracker
from tests.reference import (
    assert_histogram,
    check_below_median,
    check_summaries,
    lora_a_activations,
)
from tests.runs import K, W, load, reference, run_cli
from tests.synthetic import assert_consistent
from tests.tiny import random_texts, save_adapter


def check_against_reference(doc, values, seqs, tokenizer):
    by_dir = {
        (layer["layer"], name, d["component"]): d
        for layer in doc["layers"]
        for name, proj in layer["projections"].items()
        for d in proj["directions"]
    }
    assert set(by_dir) == set(values)
    for key, direction in by_dir.items():
        check_summaries(direction, values[key], seqs, tokenizer, K, W)


def test_cli_matches_brute_force_qwen2_rank1(tmp_path, qwen2_base, rank1_adapter, text_file):
    below = 4  # contexts the lowest quantile ranges show, from the reservoir
    doc = run_cli(
        tmp_path, qwen2_base, rank1_adapter, text_file, "--max-batch-tokens", "64",
        "--below-median-contexts", str(below),
    )  # fmt: skip
    validate(doc)
    assert_consistent(doc)
    values, seqs, tokenizer = reference(qwen2_base, rank1_adapter, text_file)
    check_against_reference(doc, values, seqs, tokenizer)
    compared = [
        check_below_median(d.direction, values[d.layer, d.module, d.direction["component"]],
                           seqs, W, below)
        for d in iter_directions(doc)
    ]  # fmt: skip
    assert sum(compared) >= len(compared)  # about one sign per direction at least
    meta = doc["metadata"]
    assert meta["num_examples"] == len(seqs) == 23  # the empty row is skipped...
    assert 5 not in {s.example_index for s in seqs} and seqs[-1].example_index == 23  # ...in place
    assert meta["num_tokens"] == sum(len(s.input_ids) for s in seqs)
    assert meta["lora_layers"] == [0, 1, 2]
    assert meta["modules"] == ["gate_proj", "up_proj", "down_proj"]
    layer = doc["layers"][0]
    assert layer["projections"]["gate_proj"]["read_site"] == "post_attention_layernorm.output"
    assert layer["projections"]["down_proj"]["read_site"] == "down_proj.input"


def test_llama_rank2_attention_on_some_layers(tmp_path, llama_base, text_file):
    adapter = save_adapter(
        llama_base,
        tmp_path / "adapter",
        rank=2,
        targets=("q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        layers=[0, 2],
    )
    doc = run_cli(tmp_path, llama_base, adapter, text_file, "--max-batch-tokens", "100")
    values, seqs, tokenizer = reference(llama_base, adapter, text_file)
    check_against_reference(doc, values, seqs, tokenizer)
    assert doc["metadata"]["lora_layers"] == [0, 2]
    projections = doc["layers"][1]["projections"]
    assert list(projections) == ["gate_proj", "up_proj", "down_proj", "q_proj", "v_proj", "o_proj"]
    assert [len(p["directions"]) for p in projections.values()] == [2] * 6
    assert projections["q_proj"]["read_site"] == "input_layernorm.output"
    assert projections["o_proj"]["read_site"] == "o_proj.input"


def test_device_map_auto_gives_the_same_result(tmp_path, qwen2_base, rank1_adapter, text_file):
    plain = run_cli(tmp_path, qwen2_base, rank1_adapter, text_file)
    mapped = run_cli(tmp_path, qwen2_base, rank1_adapter, text_file, "--device-map", "auto")
    assert mapped["layers"] == plain["layers"]


def test_chat_rows_use_the_chat_template(tmp_path, qwen2_base, rank1_adapter):
    data = tmp_path / "s1k.jsonl"
    texts = random_texts(9, seed=3)
    rows = [
        {"question": a, "deepseek_thinking_trajectory": b, "deepseek_attempt": c}
        for a, b, c in zip(texts[::3], texts[1::3], texts[2::3], strict=True)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    doc = run_cli(tmp_path, qwen2_base, rank1_adapter, data)
    values, seqs, tokenizer = reference(qwen2_base, rank1_adapter, data)
    check_against_reference(doc, values, seqs, tokenizer)
    assert tokenizer.decode(seqs[0].input_ids).startswith(
        "<|im_start|>user\n" + rows[0]["question"]
    )
    assert "<think>" in tokenizer.decode(seqs[0].input_ids)


def test_batched_equals_one_by_one(tmp_path, qwen2_base, rank1_adapter, text_file):
    one = run_cli(tmp_path, qwen2_base, rank1_adapter, text_file, "--max-batch-tokens", "1")
    many = run_cli(tmp_path, qwen2_base, rank1_adapter, text_file, "--max-batch-tokens", "4096")
    values, _, _ = reference(qwen2_base, rank1_adapter, text_file)
    for a, b in zip(one["layers"], many["layers"], strict=True):
        for name in a["projections"]:
            da, db = (
                a["projections"][name]["directions"][0],
                b["projections"][name]["directions"][0],
            )
            # Other batches round differently in the last bits: a value at a bin edge may
            # land on either side of it, in either run.
            everything = np.concatenate(values[(a["layer"], name, 0)]).astype(np.float64)
            assert da["histogram"]["edges"] == pytest.approx(db["histogram"]["edges"], rel=1e-6)
            assert_histogram(da["histogram"], everything)
            assert_histogram(db["histogram"], everything)
            assert da["stats"]["count"] == db["stats"]["count"]
            assert da["stats"]["mean"] == pytest.approx(db["stats"]["mean"], rel=1e-5, abs=1e-7)
            for field in ("top_positive", "top_negative"):  # positions may differ among ties
                assert [e["activation"] for e in da[field]] == pytest.approx(
                    [e["activation"] for e in db[field]], rel=1e-5, abs=1e-7
                )


def test_cosine_matrices(tmp_path, qwen2_base, rank1_adapter, text_file):
    doc = run_cli(tmp_path, qwen2_base, rank1_adapter, text_file)
    model, _ = load(qwen2_base, rank1_adapter)
    lora = {(m.layer, m.module): m for m in find_lora_modules(model)}
    for layer in doc["layers"]:
        spaces = {c["space"]: c for c in layer["cosine_similarities"]}
        assert list(spaces) == ["mlp_hidden", "residual"]
        gate, up, down = (lora[(layer["layer"], n)] for n in ("gate_proj", "up_proj", "down_proj"))
        for space, vectors in (
            ("mlp_hidden", [gate.B[:, 0], up.B[:, 0], down.A[0]]),
            ("residual", [gate.A[0], up.A[0], down.B[:, 0]]),
        ):
            expected = [
                [float(torch.nn.functional.cosine_similarity(a, b, dim=0)) for b in vectors]
                for a in vectors
            ]
            np.testing.assert_allclose(spaces[space]["matrix"], expected, atol=1e-5)
        assert spaces["residual"]["labels"] == ["gate_proj.A[0]", "up_proj.A[0]", "down_proj.B[0]"]
        gate_json = layer["projections"]["gate_proj"]
        assert gate_json["scaling"] == pytest.approx(2.0)
        assert gate_json["directions"][0]["a_norm"] == pytest.approx(float(gate.A[0].norm()))


def test_capture_equals_lora_a_and_stops_early(qwen2_base, rank1_adapter):
    model, tokenizer = load(qwen2_base, rank1_adapter)
    ids = [tokenizer(t)["input_ids"] for t in random_texts(3, seed=7)]
    expected = lora_a_activations(model, ids)
    modules = find_lora_modules(model)
    capture = ActivationCapture(model, read_sites(model, modules), torch.device("cpu"))
    lm_head_calls = []
    model.get_output_embeddings().register_forward_hook(lambda *a: lm_head_calls.append(1))
    with capture.hooks():
        for i, seq in enumerate(ids):
            acts = capture.run(torch.tensor([seq]), torch.ones(1, len(seq), dtype=torch.long))
            row = 0
            for site in capture.sites:
                for m in site.modules:
                    got = acts[row].numpy()
                    want = expected[(m.layer, m.module, 0)][i]
                    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
                    row += 1
    assert lm_head_calls == []  # the pass stopped after the last adapted layer
    # gate and up share one read site per layer: 2 sites per layer, not 3
    assert len(capture.sites) == 2 * len({m.layer for m in modules})


def test_hooks_removed_after_success_and_error(qwen2_base, rank1_adapter, text_file):
    model, tokenizer = load(qwen2_base, rank1_adapter)

    def hook_count():
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())

    before = hook_count()
    rows = list(read_rows(text_file))

    def analyse(rows):
        config = RunConfig(lora_path=str(rank1_adapter), num_examples=None, max_batch_tokens=64)
        return analyze(model, tokenizer, rows, config)

    analyse(rows)
    assert hook_count() == before

    def failing():
        yield rows[0]
        assert hook_count() > before  # hooks are in place during the pass
        raise RuntimeError("data source broke")

    with pytest.raises(RuntimeError, match="data source broke"):
        analyse(failing())
    assert hook_count() == before


def feed(tracker: Tracker, acts: torch.Tensor, lengths: list[int], first_example: int = 0):
    """One batch of synthetic activations [B, L, D] (right padding) into the tracker."""
    batch, length, d = acts.shape
    real = (torch.arange(length)[None] < torch.tensor(lengths)[:, None]).flatten().nonzero()
    ids = torch.arange(batch * length).view(batch, length)  # token id = flat position
    example_index = torch.arange(first_example, first_example + batch)
    tracker.update(
        acts.reshape(-1, d).T.contiguous(), real[:, 0], ids, torch.tensor(lengths), example_index
    )


def synthetic_batches(seed: int, batches: int, d: int = 3):
    generator = torch.Generator().manual_seed(seed)
    for b in range(batches):
        length = int(torch.randint(1, 3000, (1,), generator=generator))
        lengths = torch.randint(1, length + 1, (4,), generator=generator).tolist()
        lengths[0] = length
        scale = 10.0 ** float(torch.randint(-3, 4, (1,), generator=generator))
        yield torch.randn(4, length, d, generator=generator) * scale, lengths, 4 * b


@pytest.mark.parametrize("k", [1, 4, 40])
def test_tracker_matches_brute_force(k):
    """Top-k with context (both search paths), moments and histogram against numpy."""
    w, d = 2, 3
    tracker = Tracker(d, top_k=k, context_window=w, bins=30, device=torch.device("cpu"))
    tokens = []  # (value per direction, example, position, context ids, context values)
    for acts, lengths, first in synthetic_batches(seed=k, batches=6, d=d):
        feed(tracker, acts, lengths, first)
        length = acts.shape[1]
        for row, n in enumerate(lengths):
            for pos in range(n):
                lo, hi = max(0, pos - w), min(n, pos + w + 1)
                ids = [row * length + p for p in range(lo, hi)]
                tokens.append((acts[row, pos], first + row, pos, ids, acts[row, lo:hi], pos - lo))
    values = torch.stack([t[0] for t in tokens]).double().numpy()  # [tokens, D]
    for j in range(d):
        assert int(tracker.moments.count[j]) == len(tokens)
        assert float(tracker.moments.mean[j]) == pytest.approx(
            values[:, j].mean(), rel=1e-5, abs=1e-9
        )
        assert float(tracker.moments.std()[j]) == pytest.approx(values[:, j].std(), rel=1e-5)
        assert float(tracker.moments.min[j]) == values[:, j].min()
        assert float(tracker.moments.max[j]) == values[:, j].max()
        hist = tracker.histogram.export(
            j, float(tracker.moments.min[j]), float(tracker.moments.max[j])
        )
        edges = np.array(hist["edges"])
        expected = np.bincount(
            np.searchsorted(edges, values[:, j], side="right") - 1, minlength=len(hist["counts"])
        )
        assert hist["counts"] == expected.tolist()
        for negative in (False, True):
            order = np.argsort(values[:, j] if negative else -values[:, j], kind="stable")[:k]
            got = tracker.top.top_examples(j, negative)
            assert len(got) == k  # random normals: every side has more than k tokens
            for example, i in zip(got, order, strict=True):
                value, example_index, pos, ids, context, target = tokens[i]
                assert example.activation == float(value[j])
                assert (example.example_index, example.token_index) == (example_index, pos)
                assert example.context_ids == ids and example.target == target
                assert example.context_acts == context[:, j].tolist()


def test_tracker_merge_equals_one_pass():
    def tracker() -> Tracker:
        siblings = torch.tensor([[1, 2], [0, 2], [0, 1]])  # one layer's gate, up and down
        cpu = torch.device("cpu")
        return Tracker(3, 5, 1, 20, cpu, siblings=siblings, vocab_size=4 * 3000)

    one, parts = tracker(), [tracker(), tracker()]
    for i, (acts, lengths, first) in enumerate(synthetic_batches(seed=9, batches=6)):
        feed(one, acts, lengths, first)
        feed(parts[i % 2], acts, lengths, first)
    merged = parts[0]
    merged.merge(Tracker.from_state_dict(parts[1].state_dict(), torch.device("cpu")))
    assert torch.equal(merged.moments.count, one.moments.count)
    assert torch.equal(merged.moments.min, one.moments.min) and torch.equal(
        merged.moments.max, one.moments.max
    )
    # float64 rounding only: the mean relative to the spread, M2 relative to itself
    torch.testing.assert_close(
        merged.moments.mean, one.moments.mean, rtol=0, atol=1e-12 * float(one.moments.std().max())
    )
    torch.testing.assert_close(merged.moments.m2, one.moments.m2, rtol=1e-9, atol=0)
    for j in range(3):
        lo, hi = float(one.moments.min[j]), float(one.moments.max[j])
        assert merged.histogram.export(j, lo, hi) == one.histogram.export(j, lo, hi)
        for negative in (False, True):
            assert merged.top.top_examples(j, negative) == one.top.top_examples(j, negative)
        assert merged.samples.export(j, [0]) == one.samples.export(j, [0])
    for a, b in ((merged.positions, one.positions), (merged.tokens, one.tokens)):
        assert torch.equal(a.count, b.count)
        torch.testing.assert_close(a.sum, b.sum, rtol=1e-12, atol=1e-9)
    assert torch.equal(merged.tokens.min, one.tokens.min)
    assert torch.equal(merged.tokens.max, one.tokens.max)


def test_tracker_memory_does_not_grow_with_data():
    tracker = Tracker(6, 4, 2, 10, torch.device("cpu"), vocab_size=150)

    def state_bytes():
        parts = (tracker, tracker.histogram, tracker.samples, tracker.positions, tracker.tokens)
        tensors = [v for p in parts for v in vars(p).values() if isinstance(v, torch.Tensor)]
        return sum(t.numel() * t.element_size() for t in tensors)

    generator = torch.Generator().manual_seed(0)
    feed(tracker, torch.randn(3, 50, 6, generator=generator), [50, 20, 7])
    one = state_bytes()
    for _ in range(200):
        feed(tracker, torch.randn(3, 50, 6, generator=generator) * 10, [50, 20, 7])
    assert state_bytes() == one
    assert int(tracker.moments.count[0]) == 201 * 77


def test_histogram_exact_as_range_grows():
    """Values arriving in widening ranges: counts stay exact, edges hug [min, max]."""
    tracker = Tracker(2, top_k=1, context_window=0, bins=20, device=torch.device("cpu"))
    rng = np.random.default_rng(0)
    seen = []
    for scale in (1e-3, 1e-3, 0.5, 3.0, 1e3, 1e3):
        acts = torch.tensor(rng.normal(0.2, scale, (1, 300, 2)), dtype=torch.float32)
        feed(tracker, acts, [300])
        seen.append(acts[0].double().numpy())
    values = np.concatenate(seen)
    for d in range(2):
        lo, hi = values[:, d].min(), values[:, d].max()
        hist = tracker.histogram.export(
            d, float(tracker.moments.min[d]), float(tracker.moments.max[d])
        )
        edges = np.array(hist["edges"])
        assert len(hist["counts"]) == 20
        assert edges[0] <= lo and hi < edges[-1]
        assert edges[-1] - edges[0] < (hi - lo) * 1.25  # padding bins are few and narrow
        expected = np.bincount(
            np.searchsorted(edges, values[:, d], side="right") - 1, minlength=len(hist["counts"])
        )
        assert hist["counts"] == expected.tolist()


def test_constant_activations():
    tracker = Tracker(1, top_k=2, context_window=1, bins=5, device=torch.device("cpu"))
    feed(tracker, torch.full((1, 4, 1), 3.0), [4])
    hist = tracker.histogram.export(0, 3.0, 3.0)
    assert sum(hist["counts"]) == 4 and len(hist["counts"]) == 5
    spike = hist["counts"].index(4)
    assert hist["edges"][spike] <= 3.0 < hist["edges"][spike + 1]
    assert tracker.top.top_examples(0, negative=True) == []
    assert [e.activation for e in tracker.top.top_examples(0, negative=False)] == [3.0, 3.0]
    assert math.isclose(float(tracker.moments.std()[0]), 0.0)
    zeros = Tracker(1, top_k=2, context_window=1, bins=5, device=torch.device("cpu"))
    feed(zeros, torch.zeros(1, 4, 1), [4])
    assert zeros.top.top_examples(0, negative=False) == []  # zero is neither positive nor negative
    assert sorted(zeros.histogram.export(0, 0.0, 0.0)["counts"]) == [0, 0, 0, 0, 4]


def test_max_length_cuts_and_counts(tmp_path, qwen2_base, rank1_adapter, text_file):
    doc = run_cli(tmp_path, qwen2_base, rank1_adapter, text_file, "--max-length", "8")
    meta = doc["metadata"]
    assert meta["num_truncated"] > 0
    assert (
        max(
            e["token_index"]
            for layer in doc["layers"]
            for p in layer["projections"].values()
            for d in p["directions"]
            for e in d["top_positive"] + d["top_negative"]
        )
        < 8
    )


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--data-file", "missing.jsonl"], "data file not found"),
        (["--text-field", "nope"], "text field 'nope' not in the data; fields are: id, text"),
    ],
)
def test_user_errors_are_one_line(
    tmp_path, capsys, qwen2_base, rank1_adapter, text_file, argv, message
):
    base = [
        "--base-model",
        str(qwen2_base),
        "--lora-path",
        str(rank1_adapter),
        "--data-file",
        str(text_file),
        "--output",
        str(tmp_path / "o.json"),
        "--quiet",
    ]
    if argv[0] == "--data-file":
        argv = ["--data-file", str(tmp_path / argv[1])]
    assert main(base + argv) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1
    assert not (tmp_path / "o.json").exists()


def test_not_lora_adapter_is_refused(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(UserError, match="only plain LoRA"):
        load_model(BaseModel("unused", "unused"), str(tmp_path), torch.float32, "cpu", None)
