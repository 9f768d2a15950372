"""Runs of the CLI on tiny models, and comparisons of whole runs: what several test files share."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from backend.data import iter_sequences, read_rows
from backend.generate_activations_data import main
from backend.loading import BaseModel, load_model
from tests.reference import lora_a_activations

K, W = 5, 3
ROOT = Path(__file__).resolve().parent.parent
SCRIPT = str(ROOT / "backend" / "generate_activations_data.py")


def subprocess_env() -> dict[str, str]:
    # The same intra-op threads as this process: CPU kernels' rounding depends on the count.
    return {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "PYTHONPATH": str(ROOT)}


PREFIX = "system: you are a careful assistant; think step by step before you answer. user:"


def tie_heavy_rows(texts: list[str]) -> list[dict]:
    """Every text three times, far apart, behind one shared prefix: the same windows recur
    (with activations equal up to float rounding), in other batches, shards and processes."""
    return [{"text": f"{PREFIX} {t}"} for t in texts] * 3


def load(base, adapter):
    return load_model(BaseModel(str(base), str(base)), str(adapter), torch.float32, "cpu", None)


def run_cli(tmp_path, base, adapter, data, *extra: str) -> dict:
    out = tmp_path / "out.json"
    argv = ["--base-model", str(base), "--lora-path", str(adapter), "--data-file", str(data)]
    argv += ["--top-k", str(K), "--context-window", str(W), "--output", str(out), "--quiet"]
    assert main([*argv, *extra]) == 0
    return json.loads(out.read_text())


def reference(base, adapter, data, text_field=None):
    """Brute-force activations, and the (example_index, ids) each list entry belongs to."""
    model, tokenizer = load(base, adapter)
    seqs = list(
        iter_sequences(
            read_rows(data), tokenizer, text_field=text_field, max_length=None, num_examples=None
        )
    )
    values = lora_a_activations(model, [s.input_ids for s in seqs])
    return values, seqs, tokenizer


def results(doc: dict) -> dict:
    """What a run found, without when it ran or how many processes it used."""
    meta = {k: v for k, v in doc["metadata"].items() if k not in ("created_at", "num_processes")}
    found = {"metadata": meta, "layers": doc["layers"], "cosine": doc["cross_layer_cosine"]}
    return found | {"neurons": doc.get("baseline_neurons"), "sae": sae_results(doc)}


def sae_results(doc: dict) -> dict | None:
    """What the SAE (--sae) found, without its file's name and how long it trained."""
    if "sae" not in doc:
        return None
    sae = {k: v for k, v in doc["sae"].items() if k != "path"}
    sae["training"] = {k: v for k, v in sae["training"].items() if k != "seconds"}
    return sae


def sae_tensors(output: Path) -> dict[str, torch.Tensor]:
    """The tensors of the SAE a run saved beside its output."""
    from safetensors.torch import load_file

    return load_file(output.with_name(output.name + ".sae.safetensors"))


def assert_same_sae(a: Path, b: Path) -> None:
    """Two runs' saved SAEs hold identical tensors."""
    ta, tb = sae_tensors(a), sae_tensors(b)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def shown(examples: list[dict]) -> list[tuple[int, int, int]]:
    """The kept windows of a list of Examples: their shown positions and occurrences."""
    return [(e["example_index"], e["token_index"], e["occurrences"]) for e in examples]


def assert_same(a: dict, b: dict, exact: bool, rel: float = 1e-12) -> None:
    """Equal results: exactly, or up to float rounding (relative `rel`) of means, std and
    activations, with the same kept windows and shown positions in every list and sample."""
    if exact:
        assert results(a) == results(b)
        return
    assert results(a)["metadata"] == results(b)["metadata"]
    assert results(a)["cosine"] == results(b)["cosine"]
    assert_same_sae_section(results(a)["sae"], results(b)["sae"], rel)
    for la, lb in zip(a["layers"], b["layers"], strict=True):
        assert la["cosine_similarities"] == lb["cosine_similarities"]
        for name, pa in la["projections"].items():
            for da, db in zip(pa["directions"], lb["projections"][name]["directions"], strict=True):
                assert_same_summaries(da, db, rel)
    assert ("baseline_neurons" in a) == ("baseline_neurons" in b)
    for na, nb in zip(a.get("baseline_neurons", []), b.get("baseline_neurons", []), strict=True):
        assert (na["layer"], na["neuron"]) == (nb["layer"], nb["neuron"])
        assert_same_summaries(na, nb, rel)


def assert_same_sae_section(sa: dict | None, sb: dict | None, rel: float) -> None:
    """The same SAE (trained in key order on the same tokens: its figures exactly) with the same
    features, whose summaries were fed the cache's batches as each split wrote them (their
    float sums up to rounding, as a direction's)."""
    assert (sa is None) == (sb is None)
    if sa is None:
        return
    fa, fb = sa["features"], sb["features"]
    assert {k: v for k, v in sa.items() if k != "features"} == {
        k: v for k, v in sb.items() if k != "features"
    }
    assert [f["index"] for f in fa] == [f["index"] for f in fb]
    for a, b in zip(fa, fb, strict=True):
        exact = ("frequency", "composition", "logit_effects", "explanations")
        assert {k: a.get(k) for k in exact} == {k: b.get(k) for k in exact}
        assert_same_summaries(a, b, rel)


def assert_same_summaries(da: dict, db: dict, rel: float) -> None:
    """Two directions' (or neurons') summaries equal up to float rounding (see assert_same)."""
    assert da["histogram"] == db["histogram"]
    sa, sb = da["stats"], db["stats"]
    assert (sa["count"], sa["min"], sa["max"]) == (sb["count"], sb["min"], sb["max"])
    assert sa["mean"] == pytest.approx(sb["mean"], rel=rel, abs=1e-15)
    assert sa["std"] == pytest.approx(sb["std"], rel=rel)
    for side in ("top_positive", "top_negative"):  # an SAE feature has no negative side
        assert shown(da.get(side, [])) == shown(db.get(side, []))
        assert [e["activation"] for e in da.get(side, [])] == pytest.approx(
            [e["activation"] for e in db.get(side, [])], rel=rel
        )
    # a seeded sample: the same tokens, whatever the batches
    sample_a, sample_b = (
        [(r["quantile_range"], shown(r["examples"])) for r in d["quantile_samples"]]
        for d in (da, db)
    )
    assert sample_a == sample_b
    for side in ("top_tokens", "bottom_tokens"):
        ta, tb = da.get(side, []), db.get(side, [])
        assert [(t["token"], t["count"]) for t in ta] == [(t["token"], t["count"]) for t in tb]
        assert [t["mean"] for t in ta] == pytest.approx([t["mean"] for t in tb], rel=rel)
    pa, pb = da["position_profile"], db["position_profile"]
    assert (pa["edges"], pa["count"]) == (pb["edges"], pb["count"])
    assert pa["mean"] == pytest.approx(pb["mean"], rel=rel, abs=1e-15)
