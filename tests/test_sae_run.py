"""--sae in a run (issue 14), on a tiny real model with a real PEFT adapter from disk: the cache
holds PEFT's own activations, the reported quality is what the saved SAE gives on them, a saved
SAE reads the same, and bad options are one line before the pass. Every split of a run trains
the identical SAE: tests/test_scale.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from backend.adapter_cache import CacheReader
from backend.contract import iter_directions
from backend.generate_activations_data import estimate_tokens, main
from backend.pipeline import tokenize
from backend.sae import initial_sae, load_sae
from tests.runs import reference, run_cli, sae_results

SAE = ["--sae", "--sae-latents", "20", "--sae-k", "3", "--sae-lr", "0.01", "--sae-batch", "64"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, qwen2_base, rank1_adapter, text_file):
    tmp = tmp_path_factory.mktemp("sae")
    doc = run_cli(tmp, qwen2_base, rank1_adapter, text_file, *SAE, "--keep-cache")
    return tmp, doc


def brute_features(sae, x: torch.Tensor) -> torch.Tensor:
    """f [N, F] by the file's formula, from its tensors alone."""
    pre = (x / sae.scale - sae.b_dec) @ sae.W_enc + sae.b_enc
    return torch.where(pre > sae.threshold, pre, 0.0).clamp(min=0)


def test_the_cache_holds_peft_activations_and_the_quality_is_the_saved_sae_s(
    trained, qwen2_base, rank1_adapter, text_file
):
    tmp, doc = trained
    sae_doc = doc["sae"]
    reader = CacheReader(tmp / "sae-cache")
    tokens = next(reader.batches(reader.num_tokens))  # all of them, in key order
    assert len(tokens) == sae_doc["num_tokens"] == doc["metadata"]["num_tokens"]
    # The cached vector of every token is PEFT's lora_A output there.
    values, seqs, _ = reference(qwen2_base, rank1_adapter, text_file)
    sae = load_sae(tmp / "out.json.sae.safetensors")
    labels = sae.labels  # the directions in cache order, as the file names them
    named = [(d.layer, d.module, d.direction["component"]) for d in iter_directions(doc)]
    assert sorted((lab["layer"], lab["module"], lab["component"]) for lab in labels) == sorted(
        named
    )
    position_of = {s.example_index: i for i, s in enumerate(seqs)}
    rows = [position_of[int(e)] for e in tokens.example]
    expected = np.array(
        [
            [values[lab["layer"], lab["module"], lab["component"]][r][int(p)] for lab in labels]
            for r, p in zip(rows, tokens.position, strict=True)
        ]
    )
    # Another forward pass, so equal up to rounding: 1e-5 of each direction's largest |value|.
    tolerance = 1e-5 * np.abs(expected).max(0) + 1e-6  # [D]
    assert (np.abs(tokens.x.numpy() - expected) <= tolerance).all()
    # The reported figures are the saved SAE's on those tokens, computed by hand.
    assert (sae_doc["num_latents"], sae_doc["k"]) == (20, 3)
    assert sae_doc["threshold"] == pytest.approx(float(sae.threshold), rel=1e-7)
    x = tokens.x.double()
    f = brute_features(sae, tokens.x)
    firing = (f > 0).sum(0)
    assert sae_doc["l0"] == pytest.approx(float(firing.sum()) / len(x), rel=1e-12)
    assert sae_doc["dead"] == (firing == 0).nonzero().flatten().tolist()
    assert sae_doc["dead_fraction"] == pytest.approx(float((firing == 0).double().mean()))
    scaled = x / sae.scale.double()
    error = scaled - (f.double() @ sae.W_dec.double() + sae.b_dec.double())
    variance = (scaled - scaled.mean(0)).square().sum()
    assert sae_doc["fvu"] == pytest.approx(float(error.square().sum() / variance), rel=1e-5)
    held = tokens.key >= (2**62 - 2**62 // 20)
    variance = (scaled[held] - scaled[held].mean(0)).square().sum()
    fvu_heldout = float(error[held].square().sum() / variance)
    assert sae_doc["fvu_heldout"] == pytest.approx(fvu_heldout, rel=1e-5)
    shares = {}
    for label, e in zip(labels, error.square().sum(0).tolist(), strict=True):
        shares[label["module"]] = shares.get(label["module"], 0.0) + e
    total = sum(shares.values())
    assert sae_doc["error_share"] == pytest.approx({m: s / total for m, s in shares.items()})
    assert 0 < sae_doc["fvu"] < 1.5 and math.isfinite(sae_doc["fvu_heldout"])
    assert sae_doc["training"]["steps"] == math.ceil(int((~held).sum()) / 64)  # one epoch
    # Its features, read from the cache (backend.sae_features: tested there against the brute
    # force in full): each live latent once, its frequency and largest activation the saved
    # SAE's on the cached tokens.
    features = sae_doc["features"]
    assert [f["index"] for f in features] == (firing > 0).nonzero().flatten().tolist()
    for feature in features:
        column = f[:, feature["index"]]
        assert feature["frequency"] == pytest.approx(float((column > 0).double().mean()))
        top = feature["top_positive"][0]
        assert top["activation"] == pytest.approx(float(column.max()), rel=1e-6)
        assert len(feature["composition"]) == min(16, len(labels))
        assert feature["logit_effects"]["top"]  # the rank-1 down_proj writes the residual


def test_a_saved_sae_reads_the_same(trained, tmp_path, qwen2_base, rank1_adapter, text_file):
    tmp, doc = trained
    again = run_cli(
        tmp_path, qwen2_base, rank1_adapter, text_file, "--sae",
        "--sae-from", str(tmp / "out.json.sae.safetensors"),
    )  # fmt: skip
    assert sae_results(again) == sae_results(doc)
    assert not (tmp_path / "out.json.sae.safetensors").exists()  # read, not written again
    assert not (tmp_path / "sae-cache").exists()  # the cache is removed once read


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (["--sae-latents", "8", "--sae-k", "8"], "--sae-k 8 must be below the number of latents"),
        (["--sae-from", "{other}"], "an SAE of 5 directions; this adapter has 9"),
        (["--sae-from", "{missing}"], "no such file"),
    ],
)
def test_bad_sae_options_are_one_line_before_the_pass(
    tmp_path, capsys, qwen2_base, rank1_adapter, text_file, extra, says
):
    other, missing = tmp_path / "other.sae.safetensors", tmp_path / "missing.safetensors"
    initial_sae(5, 10, torch.zeros(5), torch.ones(5), 0, []).save(other)
    extra = [e.format(other=other, missing=missing) for e in extra]
    out = tmp_path / "out.json"
    argv = ["--base-model", str(qwen2_base), "--lora-path", str(rank1_adapter), "--data-file",
            str(text_file), "--output", str(out), "--quiet", "--sae", *extra]  # fmt: skip
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and says in err[0]
    assert not out.exists() and not (tmp_path / "sae-cache").exists()


def test_the_disk_check_estimates_the_run_s_tokens(qwen2_base, rank1_adapter, text_file):
    from backend.config import RunConfig
    from backend.data import read_rows
    from tests.runs import load

    _, tokenizer = load(qwen2_base, rank1_adapter)
    rows = list(read_rows(text_file))
    config = RunConfig(lora_path=str(rank1_adapter), data_file=text_file)
    actual = sum(len(s.input_ids) for s in tokenize(rows, tokenizer, config))
    estimate = estimate_tokens(rows, tokenizer, config)
    # 24 rows, one of them empty: the mean of the 23 others times 24
    assert estimate == round(actual / 23 * 24)
