"""A BatchTopK sparse autoencoder of the whole adapter state, in plain torch.

Input: a token's D-vector x of direction activations, each direction divided by its exact RMS
over all tokens (`input_scale`, from the pass's moments), because module types differ by orders
of magnitude; non-finite activations count as 0. With pre = (x / scale - b_dec) @ W_enc + b_enc:

- training keeps, in each batch of B tokens, the k*B largest pre-activations over the whole
  batch (BatchTopK), with ReLU;
- inference is the JumpReLU form f = relu(pre) * (pre > threshold), the threshold being a
  running estimate, made in training, of the smallest positive activation BatchTopK keeps;
- the reconstruction is (f @ W_dec + b_dec) * scale.

Training (`train_sae`) is one epoch over the cache's training tokens in their seeded key order
(backend.adapter_cache): Adam with a linear learning-rate warm-up, decoder rows kept at unit
norm (the gradient's part along each row removed before a step, the rows renormalised after),
and the auxiliary top-k loss for dead latents of Gao et al. 2024 ("Scaling and evaluating
sparse autoencoders"): latents that have not fired for `dead_after` tokens reconstruct the
main reconstruction's residual with their k_aux largest activations, weighted AUX_ALPHA.
Initialisation comes from a private seeded generator on the CPU: W_enc random, W_dec its
transpose with unit rows, b_enc 0, b_dec the data's exact mean (scaled). On a CPU with a given
number of threads the result is a function of the seed and the tokens only (the order and the
batches do not depend on how the cache was split). On a GPU, matrix products sum in another
order than on a CPU, so its parameters agree with a CPU's to float32 rounding at first and may
drift further apart through the discrete top-k over a long training; two GPU runs agree where
cuBLAS picks the same kernels (the same GPU, shapes and library versions).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from backend import UserError
from backend.adapter_cache import HELD_OUT, HELD_OUT_FROM, CacheReader
from backend.atomic import write_atomic

EXPANSION = 8  # default latents: 8 x D
K = 16
LR = 5e-4
BATCH = 512
WARMUP = 0.05  # of the steps, at most MAX_WARMUP
MAX_WARMUP = 1000
AUX_ALPHA = 1 / 32
DEAD_AFTER_BATCHES = 5  # a latent silent for this many batches' tokens is dead in training
DECAY = 0.99  # of the running estimate of the threshold, per step
SWEEP = 4096  # tokens encoded at once by a sweep
FORMAT = "lora-adapter-sae"
TENSORS = ("W_enc", "b_enc", "W_dec", "b_dec", "scale", "threshold")


def check_options(num_directions: int, latents: int | None, k: int) -> int:
    """The number of latents (8 x D by default); refuses, in one line, options no SAE has."""
    latents = EXPANSION * num_directions if latents is None else latents
    if latents < 1 or k < 1:
        raise UserError(f"--sae-latents {latents} and --sae-k {k}: both must be at least 1")
    if k >= latents:
        raise UserError(f"--sae-k {k} must be below the number of latents ({latents})")
    return latents


def input_scale(
    count: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, scale) [D] float32 from a direction's exact moments (backend.tracking.Moments:
    count, mean, M2 of its finite values): scale is its RMS, sqrt(mean**2 + M2 / count), 1 for
    a direction that is always 0 (nothing to divide)."""
    rms = (mean.double().square() + m2.double() / count.clamp(min=1)).sqrt()
    return mean.float(), rms.where(rms > 0, 1.0).float()


@dataclass
class SAE:
    W_enc: torch.Tensor  # [D, F]
    b_enc: torch.Tensor  # [F]
    W_dec: torch.Tensor  # [F, D], rows of unit norm
    b_dec: torch.Tensor  # [D]
    scale: torch.Tensor  # [D]
    threshold: torch.Tensor  # [] float32
    labels: list[dict[str, Any]] = field(default_factory=list)  # per direction
    figures: dict[str, Any] = field(default_factory=dict)  # training and quality figures

    @property
    def num_directions(self) -> int:
        return self.W_enc.shape[0]

    @property
    def num_latents(self) -> int:
        return self.W_enc.shape[1]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in TENSORS}

    def to(self, device: torch.device | str) -> SAE:
        moved = {n: t.to(device) for n, t in self.tensors().items()}
        return SAE(**moved, labels=self.labels, figures=self.figures)

    def scaled(self, x: torch.Tensor) -> torch.Tensor:
        """[N, D]: the SAE's input space, x / scale, non-finite values as 0."""
        return torch.nan_to_num(x.float() / self.scale, nan=0.0, posinf=0.0, neginf=0.0)

    def pre(self, scaled: torch.Tensor, latents: slice = slice(None)) -> torch.Tensor:
        """[N, F'] pre-activations of latents `latents` from scaled inputs [N, D]."""
        return (scaled - self.b_dec) @ self.W_enc[:, latents] + self.b_enc[latents]

    def encode(self, x: torch.Tensor, latents: slice = slice(None)) -> torch.Tensor:
        """f [N, F'] of tokens x [N, D] (raw activations): the inference form, for latents
        `latents` only where asked (a sweep over F in chunks keeps memory at N x chunk)."""
        pre = self.pre(self.scaled(x), latents)
        return pre.relu() * (pre > self.threshold)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """[N, D] reconstruction of raw activations from features f [N, F]."""
        return (f @ self.W_dec + self.b_dec) * self.scale

    def save(self, path: Path) -> None:
        """`path` (<output>.sae.safetensors), atomically; labels and figures in its metadata."""
        from safetensors.torch import save

        tensors = {n: t.detach().cpu().contiguous() for n, t in self.tensors().items()}
        metadata = {
            "format": FORMAT,
            "labels": json.dumps(self.labels),
            "figures": json.dumps(self.figures),
        }
        data = save(tensors, metadata)
        write_atomic(Path(path), lambda f: f.write(data))


def load_sae(path: Path, num_directions: int | None = None) -> SAE:
    """A saved SAE; refuses, in one line, a file that is not one, or one of another D."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {n: f.get_tensor(n) for n in TENSORS if n in f.keys()}  # noqa: SIM118
    except FileNotFoundError:
        raise UserError(f"no such file: {path}") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path} is not a safetensors file ({type(e).__name__})") from None
    if metadata.get("format") != FORMAT or len(tensors) != len(TENSORS):
        raise UserError(f"{path} is not an SAE saved by this tool")
    d, f = tensors["W_enc"].shape if tensors["W_enc"].dim() == 2 else (0, 0)
    shapes = {"W_enc": (d, f), "b_enc": (f,), "W_dec": (f, d), "b_dec": (d,), "scale": (d,)}
    if any(tuple(tensors[n].shape) != s for n, s in shapes.items()) or tensors["threshold"].dim():
        raise UserError(f"{path}: an SAE whose tensors' shapes do not fit together")
    if num_directions is not None and d != num_directions:
        raise UserError(f"{path}: an SAE of {d} directions; this adapter has {num_directions}")
    labels = json.loads(metadata.get("labels", "[]"))
    figures = json.loads(metadata.get("figures", "{}"))
    return SAE(**tensors, labels=labels, figures=figures)


def batch_topk(pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(f, kept) [B, F]: the k*B largest pre-activations of the batch kept (kept: exactly
    min(k*B, B*F) True), through ReLU."""
    flat = pre.flatten()
    kept = torch.zeros_like(flat, dtype=torch.bool)
    kept[flat.topk(min(k * pre.shape[0], flat.numel()), sorted=False).indices] = True
    kept = kept.view_as(pre)
    return pre.relu() * kept, kept


def initial_sae(
    num_directions: int,
    latents: int,
    mean: torch.Tensor,
    scale: torch.Tensor,
    seed: int,
    labels: list[dict[str, Any]],
) -> SAE:
    """The SAE before training (module docstring), from a private generator seeded `seed`."""
    generator = torch.Generator().manual_seed(seed)
    bound = 1 / math.sqrt(num_directions)
    w_enc = (torch.rand(num_directions, latents, generator=generator) * 2 - 1) * bound
    w_dec = w_enc.T / w_enc.T.norm(dim=1, keepdim=True)
    return SAE(
        W_enc=w_dec.T.contiguous(),
        b_enc=torch.zeros(latents),
        W_dec=w_dec.contiguous(),
        b_dec=(mean.float() / scale).nan_to_num(0.0, 0.0, 0.0),
        scale=scale.float().clone(),
        threshold=torch.tensor(0.0),
        labels=labels,
    )


@dataclass
class Training:
    """The recipe's numbers (defaults like the study's)."""

    latents: int | None = None  # None: 8 x D
    k: int = K
    lr: float = LR
    batch: int = BATCH
    seed: int = 0
    aux_alpha: float = AUX_ALPHA
    dead_after: int | None = None  # tokens; None: DEAD_AFTER_BATCHES batches


def train_sae(
    reader: CacheReader,
    mean: torch.Tensor,
    scale: torch.Tensor,
    labels: list[dict[str, Any]],
    recipe: Training,
    device: torch.device | str = "cpu",
    progress: Callable[[int], None] | None = None,
) -> SAE:
    """An SAE trained for one epoch over the cache's training tokens (mean, scale [D]: the
    data's exact per-direction mean and RMS, `input_scale`). progress(tokens): after a step."""
    d = reader.num_directions
    latents = check_options(d, recipe.latents, recipe.k)
    sae = initial_sae(d, latents, mean, scale, recipe.seed, labels).to(device)
    # Steps as planned from the cache's size (the held-out share of keys aside): the same
    # however the tokens were split into writers.
    steps = max(1, math.ceil(reader.num_tokens * (1 - HELD_OUT) / recipe.batch))
    trainer, started = _Trainer(sae, recipe, steps), time.perf_counter()
    for tokens in reader.batches(recipe.batch, "train"):
        trainer.step(sae.scaled(tokens.x.to(device)))
        if progress is not None:
            progress(len(tokens))
    for p in trainer.params:
        p.requires_grad_(False)
    sae.threshold = trainer.threshold.nan_to_num(0.0)  # 0: nothing was ever kept above 0
    sae.figures = {
        "steps": trainer.steps,
        "warmup_steps": trainer.warmup,
        "latents": latents,
        "k": recipe.k,
        "lr": recipe.lr,
        "batch": recipe.batch,
        "seed": recipe.seed,
        "training_seconds": round(time.perf_counter() - started, 3),
    }
    return sae.to("cpu")


class _Trainer:
    """The optimizer and the running counts of one training; no host synchronisation per step
    (on a GPU, steps queue up)."""

    def __init__(self, sae: SAE, recipe: Training, planned: int) -> None:
        self.sae, self.recipe = sae, recipe
        self.params = [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec]
        for p in self.params:
            p.requires_grad_(True)
        self.optimizer = torch.optim.Adam(self.params, lr=recipe.lr)
        self.warmup = max(1, min(MAX_WARMUP, round(WARMUP * planned)))
        self.dead_after = recipe.dead_after or DEAD_AFTER_BATCHES * recipe.batch
        device = sae.W_enc.device
        self.silent = torch.zeros(sae.num_latents, dtype=torch.long, device=device)  # tokens
        self.threshold = torch.tensor(math.nan, device=device)  # nan: no estimate yet
        self.steps = 0

    def step(self, x: torch.Tensor) -> None:
        """One step on scaled inputs x [B, D]."""
        sae, recipe = self.sae, self.recipe
        for group in self.optimizer.param_groups:
            group["lr"] = recipe.lr * min(1.0, (self.steps + 1) / self.warmup)
        pre = sae.pre(x)  # [B, F]
        f, kept = batch_topk(pre, recipe.k)
        residual = x - (f @ sae.W_dec + sae.b_dec)  # [B, D]
        dead = self.silent >= self.dead_after
        aux = aux_loss(pre, dead, residual.detach(), sae.W_dec) * dead.any()
        loss = residual.square().mean() + recipe.aux_alpha * aux
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            self.silent = torch.where((f > 0).any(0), 0, self.silent + len(x))
            # The running estimate of the smallest positive activation BatchTopK keeps.
            smallest = f.where(kept & (f > 0), math.inf).amin()
            estimate = self.threshold.lerp(smallest, 1 - DECAY)
            estimate = smallest.where(self.threshold.isnan(), estimate)
            self.threshold = estimate.where(smallest.isfinite(), self.threshold)
            rows = sae.W_dec
            rows.grad -= (rows.grad * rows).sum(1, keepdim=True) * rows  # along each row: none
            self.optimizer.step()
            rows /= rows.norm(dim=1, keepdim=True)
        self.steps += 1


def aux_loss(
    pre: torch.Tensor,  # [B, F]
    dead: torch.Tensor,  # [F] bool
    residual: torch.Tensor,  # [B, D] what the main reconstruction missed, detached
    w_dec: torch.Tensor,  # [F, D]
) -> torch.Tensor:
    """The dead latents' reconstruction of the residual: each token's k_aux = D/2 largest dead
    pre-activations (fewer where fewer are dead) through ReLU, decoded without bias; the mean
    squared error."""
    k_aux = min(max(1, residual.shape[1] // 2), pre.shape[1])
    top = pre.masked_fill(~dead, -math.inf).topk(k_aux, dim=1)  # live ones: -inf, then 0
    z = torch.zeros_like(pre).scatter(1, top.indices, top.values.relu())
    return ((z @ w_dec) - residual).square().mean()


@dataclass
class Quality:
    """What a sweep of the cache with a finished SAE measures (inference form)."""

    fvu: float  # 1 - explained variance in the scaled space, all tokens
    fvu_heldout: float
    l0: float  # mean number of firing latents per token
    dead_fraction: float  # of latents that never fire on the cache
    num_tokens: int
    firing: torch.Tensor  # [F] int64: tokens on which each latent fires
    error_share: dict[str, float]  # module -> its share of the squared reconstruction error

    def figures(self) -> dict[str, Any]:
        """The plain numbers, for the document and the file's metadata."""
        return {
            "fvu": self.fvu,
            "fvu_heldout": self.fvu_heldout,
            "l0": self.l0,
            "dead_fraction": self.dead_fraction,
            "num_tokens": self.num_tokens,
            "error_share": self.error_share,
        }


class _Sums:
    """float64 sums [D] of x, x**2 and the squared error, and the count, of a set of tokens."""

    def __init__(self, d: int) -> None:
        self.n, self.x, self.x2, self.err = 0, *torch.zeros(3, d, dtype=torch.float64)

    def add(self, x: torch.Tensor, err: torch.Tensor) -> None:
        self.n += len(x)
        self.x += x.double().sum(0)
        self.x2 += x.double().square().sum(0)
        self.err += err.double().square().sum(0)

    def fvu(self) -> float:
        variance = (self.x2 - self.x.square() / max(self.n, 1)).sum()
        return float(self.err.sum() / variance) if variance > 0 else math.nan


def evaluate(
    sae: SAE, reader: CacheReader, device: torch.device | str = "cpu", chunk: int = SWEEP
) -> Quality:
    """FVU (all and held-out), L0, firing counts and error shares: one sweep over the cache,
    `chunk` tokens at a time (memory: chunk x F floats, a few times)."""
    model = sae.to(device)
    whole, held = _Sums(sae.num_directions), _Sums(sae.num_directions)
    firing = torch.zeros(sae.num_latents, dtype=torch.long, device=device)
    for tokens in reader.batches(chunk, "all"):
        x = tokens.x.to(device)
        f = model.encode(x)  # [n, F]
        scaled = model.scaled(x)
        err = scaled - (f @ model.W_dec + model.b_dec)  # [n, D], in the scaled space
        firing += (f > 0).sum(0)
        whole.add(scaled, err)
        heldout = tokens.key.to(device) >= HELD_OUT_FROM
        held.add(scaled[heldout], err[heldout])
    firing = firing.cpu()
    return Quality(
        fvu=whole.fvu(),
        fvu_heldout=held.fvu(),
        l0=float(firing.sum()) / max(whole.n, 1),
        dead_fraction=float((firing == 0).double().mean()),
        num_tokens=whole.n,
        firing=firing,
        error_share=error_share(whole.err.cpu(), sae.labels),
    )


def error_share(err: torch.Tensor, labels: list[dict[str, Any]]) -> dict[str, float]:
    """Each module type's share of the squared error err [D] (labels: each direction's
    `module`); {} without labels."""
    if len(labels) != len(err):
        return {}
    total = float(err.sum())
    shares: dict[str, float] = {}
    for label, e in zip(labels, err.tolist(), strict=True):
        shares[label["module"]] = shares.get(label["module"], 0.0) + e
    return {m: (s / total if total > 0 else 0.0) for m, s in shares.items()}
