"""The SAE's features read like directions: one sweep of the cache with the finished SAE.

The cache is replayed batch by batch as the pass saw it (CacheReader.replay: whole sequences),
and each batch's features f [N, F] feed a Tracker over the latents, as the directions' do: the
same summaries (stats, histogram, top-k of distinct windows, quantile samples, position and
token profiles), exact and mergeable, so the features do not depend on how the tokens were
split into writers or batches, and the same export (Tracker.fields). Features carry no sibling
activations and are never negative: only top_positive and top_tokens of the two sides are kept.

Token profiles are vocabulary x latents (11 GB at the study's scale), so the latents are swept
in chunks sized to a memory budget, one replay of the cache per chunk, and one more replay
counts the occurrences of the windows shown.

Each live feature also gets its frequency (the fraction of tokens where f > 0), its
composition (the directions of largest |W_dec[f, d]|, in the scaled space) and, where the
directions' writes are given, the logit effects of its residual-stream write
sum_d W_dec[f, d] * scale_d * scaling_d * B_d. Dead latents (never firing) are listed only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from backend.adapter_cache import CacheReader
from backend.contexts import count_keys, kept_window_keys, window_keys
from backend.contract import writes_residual
from backend.directions import LoraModule, top_logits
from backend.output import Document
from backend.sae import SAE
from backend.summaries import Range, Summary
from backend.tracking import Tracker

MEMORY = 2**30  # default bytes for one chunk of latents' summaries and a batch's features
COMPOSITION = 16  # directions listed per feature
# Bytes per token and latent a batch holds at once: the features and pre-activations [N, F'],
# the dense activations [F', B*L], BatchTokens' copies (x, token-major rows, float64 rows) and
# the summaries' temporaries (about 85 measured at D = 90, F = 720, 8,192 tokens a batch).
TRANSIENT = 96
LOGIT_ROWS = 256  # features whose logits [rows, V] are computed at once
# The summaries' fields a feature's entry keeps (its activations are never negative).
EXPORTED = (
    "stats",
    "histogram",
    "top_positive",
    "quantile_samples",
    "top_tokens",
    "position_profile",
)


@dataclass
class Writes:
    """What a feature's residual-stream write is made of, per direction in cache order (b and
    scaling on the CPU, with the SAE; the unembedding and gain where the model is)."""

    b: torch.Tensor  # [D, hidden] each direction's B_d, 0 where it does not write the residual
    scaling: torch.Tensor  # [D] its module's LoRA scaling
    unembed: torch.Tensor  # [V, hidden] the output embedding
    gain: torch.Tensor  # [hidden] the final norm's weight
    n: int  # tokens listed per side


def residual_writes(
    modules: list[LoraModule], labels: list[dict[str, Any]]
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(B [D, hidden], scaling [D]) of the directions `labels` names ({layer, module,
    component}, in cache order), B = 0 for modules that do not write the residual stream
    (contract.writes_residual); None where none does."""
    by_site = {(m.layer, m.module): m for m in modules}
    writers = [m for m in modules if writes_residual(m.module)]
    if not writers:
        return None
    b = torch.zeros(len(labels), writers[0].B.shape[0])
    scaling = torch.zeros(len(labels))
    for d, label in enumerate(labels):
        m = by_site[label["layer"], label["module"]]
        scaling[d] = m.scaling
        if writes_residual(m.module):
            b[d] = m.B[:, label["component"]].detach().float().cpu()
    return b, scaling


@dataclass
class FeatureSweep:
    features: list[dict[str, Any]]  # the live features' entries, by index
    dead: list[int]  # latents that never fire on the cache
    num_tokens: int
    chunk: int  # latents per replay of the cache
    memory: int  # bytes estimated for one chunk (summaries and one batch's transients)


def sweep_features(
    sae: SAE,
    reader: CacheReader,
    tokens: Mapping[int, str],
    vocab_size: int,
    top_k: int,
    window: int,
    bins: int,
    min_token_count: int,
    writes: Writes | None = None,
    budget: int = MEMORY,
    device: torch.device | str = "cpu",
    below_median: int = 0,
) -> FeatureSweep:
    """Every feature of `sae` over the cache, in the document's field names (the explanations
    aside). tokens: id -> string for every id of the cache and, with `writes`, of the logit
    effects (the run's token table). vocab_size: 0 for no top tokens. below_median: contexts
    the lowest quantile range shows (Shape.below_median), for scoring explanations."""
    model, device = sae.to(device), torch.device(device)
    latents = sae.num_latents
    options = (top_k, window, bins, vocab_size, below_median)
    per_latent, fixed = tracker_bytes(*options)
    sizes = reader.batch_sizes()  # [batches] tokens
    largest = int(sizes.max()) if len(sizes) else 1
    cost = per_latent + TRANSIENT * largest
    chunk = int(max(1, min(latents, (budget - fixed) // cost)))
    features, documents, windows = [], [], []
    frequency = torch.zeros(latents, dtype=torch.float64)
    for start in range(0, latents, chunk):
        part = slice(start, min(latents, start + chunk))
        tracker, firing = track(model, reader, part, *options, device)
        frequency[part] = firing.double() / max(reader.num_tokens, 1)
        document = Document([], tracker, tokens, min_token_count)
        for j in firing.nonzero()[:, 0].tolist():
            fields = tracker.fields(j, document)
            entry = {"index": start + j, "frequency": float(frequency[start + j])}
            features.append(
                {**entry, **{name: fields[name] for name in EXPORTED if name in fields}}
            )
        windows.append(tracker.windows())
        # The chunk is exported: its document keeps the Examples to count, not the summaries.
        document.tracker = tracker = None
        documents.append(document)
    occurrences = count_occurrences(reader, torch.cat(windows), window)
    for document in documents:
        document.count(occurrences)
    live = torch.tensor([f["index"] for f in features], dtype=torch.long)
    for f, parts in zip(features, composition(sae, live), strict=True):
        f["composition"] = parts
    if writes is not None:
        effects = logit_effects(feature_writes(sae, writes)[live], writes, tokens)
        for f, found in zip(features, effects, strict=True):
            f["logit_effects"] = found
    dead = (frequency == 0).nonzero()[:, 0].tolist()
    return FeatureSweep(features, dead, reader.num_tokens, chunk, fixed + chunk * cost)


def track(
    sae: SAE,
    reader: CacheReader,
    latents: slice,
    top_k: int,
    window: int,
    bins: int,
    vocab_size: int,
    below_median: int,
    device: torch.device,
) -> tuple[Tracker, torch.Tensor]:
    """A tracker of latents `latents` over one replay of the cache, and how many tokens each
    fires on ([F'] int64, on the CPU)."""
    size = latents.stop - latents.start
    tracker = Tracker(
        size, top_k, window, bins, device, vocab_size=vocab_size, below_median=below_median
    )
    firing = torch.zeros(size, dtype=torch.long, device=device)
    for batch in reader.replay():
        f = sae.encode(batch.x.to(device), latents)  # [N, F']
        firing += (f > 0).sum(0)
        real = batch.real.to(device)
        acts = f.new_zeros(size, batch.input_ids.numel())  # [F', B*L], padding 0 (unread)
        acts[:, real] = f.T
        ids, lengths = batch.input_ids.to(device), batch.lengths.to(device)
        tracker.update(acts, real, ids, lengths, batch.example_index.to(device))
    return tracker, firing.cpu()


def tracker_bytes(
    top_k: int, window: int, bins: int, vocab_size: int, below_median: int
) -> tuple[int, int]:
    """(bytes per latent, bytes besides) a Tracker of these options holds, measured from
    trackers of one and two latents (every summary's memory is linear in the latents)."""
    cpu = torch.device("cpu")
    one, two = (
        sum(
            held_bytes(s)
            for s in Tracker(
                n, top_k, window, bins, cpu, vocab_size=vocab_size, below_median=below_median
            ).summaries.values()
        )
        for n in (1, 2)
    )
    return two - one, 2 * one - two


def held_bytes(summary: Summary) -> int:
    """Bytes of the tensors a summary holds (its Ranges' and inner summaries' too)."""
    total = 0
    for value in vars(summary).values():
        if isinstance(value, torch.Tensor):
            total += value.nbytes
        elif isinstance(value, Range):
            total += value.min.nbytes + value.max.nbytes
        elif isinstance(value, Summary):
            total += held_bytes(value)
    return total


def count_occurrences(reader: CacheReader, windows: torch.Tensor, window: int) -> dict[int, int]:
    """Window key -> tokens of the cache with that window, for the windows [M, 2W+1] kept (rows
    of -1: none): one replay, the kept keys in memory."""
    keys = kept_window_keys(windows)  # [K] sorted
    counts = torch.zeros_like(keys)
    for batch in reader.replay() if len(keys) else ():
        found = window_keys(batch.input_ids, batch.lengths, window).view(-1)[batch.real]
        counts += count_keys(keys, found)
    return dict(zip(keys.tolist(), counts.tolist(), strict=True))


def composition(sae: SAE, latents: torch.Tensor) -> list[list[dict[str, Any]]]:
    """Per latent of `latents`: its COMPOSITION directions of largest |W_dec[f, d]| (the
    scaled space), by decreasing |weight| (ties: the earlier direction), with their labels."""
    w = sae.W_dec[latents]  # [n, D]
    order = w.abs().argsort(dim=1, descending=True, stable=True)[:, :COMPOSITION]
    weights = w.gather(1, order)
    return [
        [{**sae.labels[d], "weight": float(v)} for d, v in zip(row, values, strict=True)]
        for row, values in zip(order.tolist(), weights.tolist(), strict=True)
    ]


def feature_writes(sae: SAE, writes: Writes) -> torch.Tensor:
    """[F, hidden]: each feature's residual-stream write sum_d W_dec[f, d] scale_d scaling_d B_d
    (a feature's unit in the scaled space, back in each direction's units, through its write)."""
    per_direction = sae.scale.double() * writes.scaling.double()  # [D]
    return ((sae.W_dec.double() * per_direction) @ writes.b.double()).float()


def logit_effects(
    write: torch.Tensor, writes: Writes, tokens: Mapping[int, str]
) -> list[dict[str, list[dict[str, Any]]]]:
    """Per write [R, hidden]: the tokens whose logits it raises and lowers most (as a
    direction's logit effects), LOGIT_ROWS writes at a time."""
    found = []
    for start in range(0, len(write), LOGIT_ROWS):
        sides = top_logits(writes.unembed, writes.gain, write[start : start + LOGIT_ROWS], writes.n)
        for r in range(len(sides[0].indices)):
            found.append(
                {
                    side: [
                        {"token": tokens[i], "value": v}
                        for i, v in zip(s.indices[r].tolist(), s.values[r].tolist(), strict=True)
                    ]
                    for side, s in zip(("top", "bottom"), sides, strict=True)
                }
            )
    return found
