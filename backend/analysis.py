"""One streaming pass: batches through the adapted model, activations into the tracker."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from backend.capture import ActivationCapture, read_sites
from backend.data import Batch, Sequence, iter_batches
from backend.directions import find_lora_modules
from backend.output import build_document
from backend.tracking import Tracker


@dataclass
class AnalysisConfig:
    top_k: int = 16
    context_window: int = 10
    histogram_bins: int = 50
    max_batch_tokens: int = 8192


class Analysis:
    """Every LoRA direction of `model`, tracked over the batches given to `process`."""

    def __init__(self, model: nn.Module, config: AnalysisConfig, device: torch.device) -> None:
        self.config = config
        self.device = device
        self.modules = find_lora_modules(model)
        self.capture = ActivationCapture(model, read_sites(model, self.modules), device)
        self.tracker = Tracker(
            self.capture.num_directions,
            config.top_k,
            config.context_window,
            config.histogram_bins,
            device,
        )
        self.num_examples = self.num_tokens = self.num_truncated = 0

    def process(self, batch: Batch, sequences: list[Sequence]) -> None:
        input_ids = batch.input_ids.to(self.device)
        acts = self.capture.run(input_ids, batch.attention_mask.to(self.device))  # [D, B*L]
        self.tracker.update(
            acts,
            batch.real.to(self.device),
            input_ids,
            batch.lengths.to(self.device),
            batch.example_index.to(self.device),
        )
        self.num_examples += len(sequences)
        self.num_tokens += batch.num_tokens
        self.num_truncated += sum(s.truncated for s in sequences)

    def document(self, metadata: dict[str, Any], tokenizer: Any) -> dict[str, Any]:
        first, sites = {}, {}
        for site in self.capture.sites:
            start = site.rows.start
            for m in site.modules:
                first[m.name], sites[m.name] = start, site.label
                start += m.rank
        run = {
            "num_examples": self.num_examples,
            "num_tokens": self.num_tokens,
            "num_truncated": self.num_truncated,
            "top_k": self.config.top_k,
            "context_window": self.config.context_window,
            "histogram_bins": self.config.histogram_bins,
        }
        return build_document(
            {**metadata, **run},
            self.modules,
            first,
            sites,
            self.tracker,
            token_decoder(tokenizer),
        )


def token_decoder(tokenizer: Any):
    """id -> the text of that one token, as a reader should see it (cached)."""
    cache: dict[int, str] = {}

    def decode(token_id: int) -> str:
        if token_id not in cache:
            cache[token_id] = tokenizer.decode([token_id], clean_up_tokenization_spaces=False)
        return cache[token_id]

    return decode


def run_analysis(
    model: nn.Module,
    sequences: Iterable[Sequence],
    config: AnalysisConfig,
    device: torch.device,
    total: int | None = None,
    progress: bool = True,
) -> Analysis:
    """Stream `sequences` through `model` once; the hooks are gone afterwards, however it ends."""
    analysis = Analysis(model, config, device)
    start = time.perf_counter()
    with analysis.capture.hooks(), tqdm(total=total, unit="ex", disable=not progress) as bar:
        for batch, group in iter_batches(sequences, config.max_batch_tokens):
            analysis.process(batch, group)
            rate = analysis.num_tokens / (time.perf_counter() - start)
            bar.set_postfix_str(f"{analysis.num_tokens} tok, {rate:,.0f} tok/s", refresh=False)
            bar.update(len(group))
    return analysis
