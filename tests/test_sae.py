"""The BatchTopK SAE (backend.sae): its formulas against brute force, determinism, quality."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from backend import UserError
from backend.adapter_cache import HELD_OUT_FROM, CacheReader, CacheWriter, Tokens
from backend.contract import MODULE_ORDER
from backend.sae import (
    SAE,
    Training,
    aux_loss,
    batch_topk,
    check_options,
    evaluate,
    initial_sae,
    input_scale,
    load_sae,
    train_sae,
)
from backend.summaries import Shape
from backend.tracking import Moments
from tests.test_adapter_cache import batch_of, make_data

D, TRUE_LATENTS, ACTIVE = 16, 32, 3
# A recipe that learns the tiny synthetic dictionary in one short epoch: small batches and a
# larger rate than the default, which is tuned for millions of tokens.
QUICK = Training(latents=64, k=4, lr=1e-2, batch=32, seed=3)
LABELS = [{"layer": d // 4, "module": MODULE_ORDER[d % 3], "component": 0} for d in range(D)]


def sparse_data(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [n, D] = (3 active of 32 non-negative codes) @ a random unit dictionary, each
    direction then scaled by its own order of magnitude; with example and position [n]."""
    g = torch.Generator().manual_seed(seed)
    dictionary = torch.randn(TRUE_LATENTS, D, generator=g)
    dictionary /= dictionary.norm(dim=1, keepdim=True)
    active = torch.rand(n, TRUE_LATENTS, generator=g).argsort(1)[:, :ACTIVE]
    values = torch.rand(n, ACTIVE, generator=g) * 2 + 0.5
    codes = torch.zeros(n, TRUE_LATENTS).scatter_(1, active, values)
    x = codes @ dictionary * torch.logspace(-2, 2, D)
    return x, torch.arange(n) // 50, torch.arange(n) % 50


def cache(folder: Path, x: torch.Tensor, example, position, writers: int = 1, rows: int = 997):
    """x into `writers` writers (tokens dealt round-robin, `rows` at a time); the reader."""
    ids = torch.zeros(len(x), dtype=torch.long)
    parts = [CacheWriter(folder, f"w{i}", x.shape[1], seed=11) for i in range(writers)]
    for n, start in enumerate(range(0, len(x), rows)):
        at = slice(start, start + rows)
        parts[n % writers].write(x[at], example[at], position[at], ids[at])
    for w in parts:
        w.finish()
    return CacheReader(folder)


def exact_scale(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x.double().mean(0).float(), x.double().square().mean(0).sqrt().float()


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[SAE, CacheReader, torch.Tensor]:
    x, example, position = sparse_data(20_000)
    reader = cache(tmp_path_factory.mktemp("cache"), x, example, position)
    return train_sae(reader, *exact_scale(x), LABELS, QUICK), reader, x


def by_hand(tensors: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """f [N, F] from a saved file's tensors, in float64, token by token."""
    t = {n: v.double() for n, v in tensors.items()}
    rows = []
    for token in x.double():
        pre = (token / t["scale"] - t["b_dec"]) @ t["W_enc"] + t["b_enc"]
        rows.append(torch.where(pre > t["threshold"], pre.clamp(min=0), 0.0))
    return torch.stack(rows)


def test_batch_topk_keeps_k_per_token_over_the_batch():
    pre = torch.randn(50, 40, generator=torch.Generator().manual_seed(0))
    f, kept = batch_topk(pre, 3)
    assert int(kept.sum()) == 150
    ranked = pre.flatten().sort(descending=True).values
    assert float(pre[kept].min()) == float(ranked[149]) > float(pre[~kept].max())
    assert torch.equal(f, torch.where(kept, pre.relu(), 0.0))
    assert len(set(kept.sum(1).tolist())) > 1  # per batch, not per token


def test_aux_loss_reconstructs_the_residual_with_the_top_dead_latents():
    g = torch.Generator().manual_seed(1)
    pre, residual = torch.randn(5, 12, generator=g), torch.randn(5, 4, generator=g)
    w_dec = torch.randn(12, 4, generator=g)
    for dead in (torch.tensor([True, False] * 6), torch.arange(12) == 5):
        expected = 0.0
        for b in range(5):  # k_aux = D / 2 = 2 dead latents per token (1 where 1 is dead)
            ranked = sorted(dead.nonzero()[:, 0].tolist(), key=lambda j: -float(pre[b, j]))[:2]
            write = sum(max(float(pre[b, j]), 0.0) * w_dec[j] for j in ranked)
            expected += float((write - residual[b]).square().sum())
        assert float(aux_loss(pre, dead, residual, w_dec)) == pytest.approx(expected / 20)


def test_input_scale_is_the_exact_rms_from_the_moments():
    data = make_data(50, 6, seed=2)
    shape = Shape(8, 1, 1, 4, torch.full((8, 0), -1), 0, torch.device("cpu"))
    moments = Moments(shape)
    for start in range(0, 50, 7):
        moments.update(batch_of(data, list(range(start, min(start + 7, 50)))))
    mean, scale = input_scale(moments.count[:6], moments.mean[:6], moments.m2[:6])
    torch.testing.assert_close(scale.double(), data.x.double().square().mean(0).sqrt())
    torch.testing.assert_close(mean, data.x.double().mean(0).float())
    _, still = input_scale(torch.tensor([5]), torch.zeros(1), torch.zeros(1))
    assert float(still) == 1.0  # a direction always 0: nothing to divide by


def test_saved_file_recomputed_by_hand_equals_encode(trained, tmp_path):
    sae, _, x = trained
    path = tmp_path / "run.sae.safetensors"
    sae.save(path)
    tensors = load_file(path)
    assert {n: tuple(t.shape) for n, t in tensors.items()} == {
        "W_enc": (D, 64),
        "b_enc": (64,),
        "W_dec": (64, D),
        "b_dec": (D,),
        "scale": (D,),
        "threshold": (),
    }
    loaded = load_sae(path, D)
    assert loaded.labels == LABELS and loaded.figures == json.loads(json.dumps(sae.figures))
    tokens = x[:300]
    f = loaded.encode(tokens)
    torch.testing.assert_close(f.double(), by_hand(tensors, tokens), atol=1e-5, rtol=1e-5)
    assert 0 < int((f > 0).sum()) < f.numel()  # the threshold both keeps and drops
    recon = (f.double() @ tensors["W_dec"].double() + tensors["b_dec"]) * tensors["scale"]
    torch.testing.assert_close(loaded.decode(f).double(), recon, atol=1e-4, rtol=1e-5)
    chunks = torch.cat([loaded.encode(tokens, slice(s, s + 24)) for s in range(0, 64, 24)], 1)
    torch.testing.assert_close(chunks, f)
    norms = tensors["W_dec"].norm(dim=1)
    torch.testing.assert_close(norms, torch.ones(64))


def test_features_of_a_chunk_of_latents_are_those_columns(trained):
    # The feature sweep encodes a chunk of latents per replay of the cache.
    sae, reader, _ = trained
    tokens = Tokens.cat(list(reader.tokens()))
    torch.testing.assert_close(sae.encode(tokens.x, slice(10, 30)), sae.encode(tokens.x)[:, 10:30])


def test_non_finite_activations_count_as_zero(trained):
    sae, _, x = trained
    broken = x[:4].clone()
    broken[0, 1], broken[1, 2], broken[2, 3] = math.nan, math.inf, -math.inf
    zeroed = broken.nan_to_num(0.0, 0.0, 0.0)
    assert torch.equal(sae.encode(broken), sae.encode(zeroed))


def test_training_is_deterministic_and_split_invariant(trained, tmp_path):
    sae, _, _ = trained
    x, example, position = sparse_data(20_000)
    again = train_sae(cache(tmp_path / "a", x, example, position), *exact_scale(x), LABELS, QUICK)
    split = cache(tmp_path / "b", x, example, position, writers=2, rows=313)
    shards = train_sae(split, *exact_scale(x), LABELS, QUICK)
    other = Training(**{**vars(QUICK), "seed": 4})
    reseeded = train_sae(split, *exact_scale(x), LABELS, other)
    for name, tensor in sae.tensors().items():
        assert torch.equal(tensor, getattr(again, name)), name
        assert torch.equal(tensor, getattr(shards, name)), name
    assert not torch.equal(sae.W_enc, reseeded.W_enc)
    train = sum(len(t) for t in split.tokens("train"))
    assert float(sae.threshold) > 0 and sae.figures["steps"] == math.ceil(train / 32)


def test_trained_sae_reconstructs_sparse_data(trained):
    sae, reader, _ = trained
    quality = evaluate(sae, reader)
    assert quality.fvu < 0.2 and quality.fvu_heldout < 0.2
    untrained = initial_sae(D, 64, *exact_scale(reader_x(reader)), seed=3, labels=LABELS)
    untrained.threshold = sae.threshold
    assert evaluate(untrained, reader).fvu > 0.5  # what a broken SAE scores
    assert 1 <= quality.l0 <= 8


def reader_x(reader: CacheReader) -> torch.Tensor:
    return Tokens.cat(list(reader.tokens())).x


def test_quality_figures_equal_a_brute_force(trained):
    sae, reader, _ = trained
    quality = evaluate(sae, reader)
    tokens = Tokens.cat(list(reader.tokens()))
    tensors = {n: t for n, t in sae.tensors().items()}
    f = by_hand(tensors, tokens.x)
    firing = (f > 0).sum(0)
    assert torch.equal(quality.firing, firing)
    assert quality.l0 == pytest.approx(float(firing.sum()) / len(tokens.x), rel=1e-12)
    assert quality.dead_fraction == pytest.approx(float((firing == 0).double().mean()), rel=1e-12)
    assert quality.num_tokens == len(tokens.x) == 20_000
    scaled = tokens.x.double() / tensors["scale"].double()
    err = scaled - (f @ tensors["W_dec"].double() + tensors["b_dec"].double())

    def fvu(rows: torch.Tensor) -> float:
        residual = err[rows].square().sum()
        return float(residual / (scaled[rows] - scaled[rows].mean(0)).square().sum())

    everything = torch.ones(len(err), dtype=torch.bool)
    assert quality.fvu == pytest.approx(fvu(everything), rel=1e-4)
    assert quality.fvu_heldout == pytest.approx(fvu(tokens.key >= HELD_OUT_FROM), rel=1e-4)
    per_direction = err.square().sum(0)
    for module in MODULE_ORDER[:3]:
        mine = [d for d in range(D) if LABELS[d]["module"] == module]
        share = float(per_direction[mine].sum() / per_direction.sum())
        assert quality.error_share[module] == pytest.approx(share, rel=1e-4)
    assert math.isclose(sum(quality.error_share.values()), 1.0)


def test_dead_latents_are_counted(tmp_path):
    x, example, position = sparse_data(2_000)
    reader = cache(tmp_path, x, example, position)
    sae = initial_sae(D, 64, *exact_scale(x), seed=0, labels=LABELS)
    sae.b_enc[:10] = -1e6  # never fire
    sae.threshold = torch.tensor(0.0)
    quality = evaluate(sae, reader)
    assert bool((quality.firing[:10] == 0).all())
    assert quality.dead_fraction == pytest.approx(float((quality.firing == 0).sum()) / 64)
    assert quality.dead_fraction >= 10 / 64


def test_bad_options_and_files_get_one_line(trained, tmp_path):
    sae, reader, x = trained
    for latents, k in ((64, 64), (16, 20)):
        with pytest.raises(UserError, match=r"--sae-k .* must be below") as e:
            check_options(D, latents, k)
        assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="must be below"):
        train_sae(reader, *exact_scale(x), LABELS, Training(latents=8, k=8))
    assert check_options(D, None, 16) == 8 * D
    path = tmp_path / "x.sae.safetensors"
    sae.save(path)
    with pytest.raises(UserError, match="an SAE of 16 directions; this adapter has 448") as e:
        load_sae(path, 448)
    assert "\n" not in str(e.value)
    bent = {n: t for n, t in load_file(path).items()}
    bent["b_dec"] = torch.zeros(D + 1)
    save_file(bent, tmp_path / "bent", {"format": "lora-adapter-sae", "labels": "[]"})
    with pytest.raises(UserError, match="shapes do not fit"):
        load_sae(tmp_path / "bent", D)
    (tmp_path / "junk").write_bytes(b"not a tensor file")
    with pytest.raises(UserError, match="not a safetensors file"):
        load_sae(tmp_path / "junk", D)
    with pytest.raises(UserError, match="no such file"):
        load_sae(tmp_path / "missing", D)
