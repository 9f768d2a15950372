"""One streaming pass: batches through the adapted model, activations into the run's state.

The pass can be checkpointed (every N examples or minutes, and on SIGINT/SIGTERM) and resumed
from the last checkpoint with the same result as an unbroken pass.
"""

from __future__ import annotations

import itertools
import signal
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from backend import UserError, warn
from backend.capture import ActivationCapture, read_sites
from backend.causal import NEW_TOKENS, EffectsState, effects_rows, pin
from backend.config import RunConfig
from backend.contexts import count_keys, kept_window_keys, window_keys
from backend.data import Batch, Position, Row, Sequence, collate
from backend.directions import LoraModule, cross_layer_cosine, find_lora_modules, logit_effects
from backend.effects import Effects, group_order
from backend.loading import input_device
from backend.neurons import neuron_sites
from backend.output import layer_layout
from backend.state import RunState, differing_options
from backend.steering import pinned_generations, steering_prompt
from backend.tracking import Tracker


def sibling_table(
    modules: list[LoraModule], first: dict[str, int], num_directions: int
) -> torch.Tensor:
    """[D, S]: for each direction, the other modules' directions of its layer and component
    (-1 where it has fewer than S), whose activations its kept contexts carry too; the rows
    past the modules' (baseline neurons) have none."""
    rows: dict[int, list[int]] = {d: [] for d in range(num_directions)}  # index -> siblings
    for m in modules:
        for c in range(m.rank):
            rows[first[m.name] + c] = [
                first[other.name] + c
                for other in modules
                if other.layer == m.layer and other is not m and c < other.rank
            ]
    width = max(map(len, rows.values()), default=0)
    padded = [rows[d] + [-1] * (width - len(rows[d])) for d in range(len(rows))]
    return torch.tensor(padded, dtype=torch.long).view(len(rows), width)


class Interrupted(UserError):
    """SIGINT or SIGTERM arrived; the state was saved."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum


class Analysis:
    """Every LoRA direction of `model`, tracked over the batches given to `process`."""

    def __init__(self, model: nn.Module, config: RunConfig, slot: tuple[int, int] = (0, 1)) -> None:
        """config: resolved (RunConfig.resolved); slot: the batches this state takes (i, n)."""
        self.config = config
        self.device = device = input_device(model)
        self.modules = find_lora_modules(model)
        neurons = neuron_sites(model, self.modules, config.baseline_neurons)
        self.capture = capture = ActivationCapture(
            model, read_sites(model, self.modules, neurons), device
        )
        first, labels = {}, {}
        for site in self.capture.sites:
            start = site.rows.start
            for m in site.modules:
                first[m.name], labels[m.name] = start, site.label
                start += m.rank
        tracker = Tracker(
            capture.num_directions,
            config.top_k,
            config.context_window,
            config.histogram_bins,
            device,
            siblings=sibling_table(self.modules, first, capture.num_directions),
            vocab_size=model.get_input_embeddings().weight.shape[0],
            below_median=config.below_median_contexts,
        )
        self.model, self.first = model, first
        effects = logit_effects(model, self.modules, config.logit_tokens)
        self.state = RunState(
            config.identity(),
            layer_layout(self.modules, first, labels, effects),
            tracker,
            cross_layer_cosine(self.modules),
            slot=slot,
            neurons=capture.neuron_layout(),
        )
        if config.effects:  # of the LoRA directions only: the neurons are never ablated
            groups = group_order(self.modules)
            self.state.effects = EffectsState(capture.num_lora, *groups, tracker.shape)
        self._split_before = False  # warn about the first out-of-memory split only

    def resume(self, saved: RunState, name: str) -> None:
        """Continue from a checkpoint of this very run."""
        if saved.run != self.state.run or saved.slot != self.state.slot:
            differs = differing_options(saved.run, self.state.run)
            if saved.slot != self.state.slot:
                differs.append("shard or process count")
            raise UserError(f"{name} is a checkpoint of another run ({', '.join(differs)} differ)")
        if saved.layers != self.state.layers or saved.neurons != self.state.neurons:
            raise UserError(f"{name} is a checkpoint of another adapter")
        if saved.finished and not self.config.explain:  # with --explain: cut short explaining
            raise UserError(f"{name} is a finished run: nothing to resume")
        self.state = saved

    def process(self, batch: Batch, sequences: list[Sequence], position: Position) -> None:
        self._track(batch, sequences)
        counters = self.state.counters
        counters["num_examples"] += len(sequences)
        counters["num_tokens"] += batch.num_tokens
        counters["num_truncated"] += sum(s.truncated for s in sequences)
        self.state.position = position

    def _track(self, batch: Batch, sequences: list[Sequence]) -> None:
        """The batch's activations into the tracker; a batch that runs out of GPU memory is
        split in two and each half tracked the same way (the tracker's result does not depend
        on how tokens are grouped into batches)."""
        input_ids = batch.input_ids.to(self.device)
        try:
            acts = self.capture.run(input_ids, batch.attention_mask.to(self.device))  # [D, B*L]
        except torch.OutOfMemoryError:
            acts = None  # split below, once the exception has let go of the forward's tensors
        if acts is None:
            self._split(batch, sequences)
            return
        tokens = self.state.tracker.update(
            acts,
            batch.real.to(self.device),
            input_ids,
            batch.lengths.to(self.device),
            batch.example_index.to(self.device),
        )
        if self.state.writer is not None and tokens is not None:  # --sae: the adapter state
            self.state.writer.update(tokens)

    def _split(self, batch: Batch, sequences: list[Sequence]) -> None:
        shape = "x".join(map(str, batch.input_ids.shape))
        if len(sequences) == 1:
            raise UserError(
                f"out of GPU memory on one sequence of {batch.num_tokens} tokens (example "
                f"{sequences[0].example_index}): cut sequences with --max-length"
            )
        if not self._split_before:
            warn(f"out of GPU memory on a batch of {shape} tokens: retrying it in smaller batches")
            self._split_before = True
        torch.cuda.empty_cache()
        half = len(sequences) // 2  # sorted longest first: the second half pads to less
        for part in (sequences[:half], sequences[half:]):
            self._track(collate(part), part)


def store_sequences(
    state: RunState, sequences: Iterable[Sequence], decode: Callable[[int], str]
) -> None:
    """Keep the token ids of every example the results may show (--store-sequences).

    `sequences` is the run's data once more, in row order; it is read up to the last example
    shown, and only tokenized: no forward pass.
    """
    kept = state.tracker.examples_kept()
    last = max(kept, default=-1)
    for sequence in sequences:
        if sequence.example_index > last:
            break
        if sequence.example_index in kept:
            state.sequences[sequence.example_index] = sequence.input_ids
    state.add_tokens(decode)


def count_windows(state: RunState, sequences: Iterable[Sequence], rows: int = 256) -> None:
    """Count how many tokens of the data have each window the summaries keep (those the
    document shows among them), into state.occurrences: `sequences` is the run's whole data
    once more, only tokenized (no forward pass); memory holds the kept windows' keys and `rows`
    sequences at a time."""
    windows = state.tracker.windows()  # [M, 2W+1]
    if state.effects is not None:
        windows = torch.cat([windows, state.effects.windows()])
    keys = kept_window_keys(windows)  # [K] sorted
    counts = torch.zeros_like(keys)
    window = state.tracker.shape.window
    group: list[list[int]] = []
    for sequence in [*sequences, None]:
        if sequence is not None:
            group.append(sequence.input_ids)
        if len(keys) and group and (len(group) == rows or sequence is None):
            counts += _occurrences(keys, group, window)
            group = []
    if len(keys) and int(counts.min()) == 0:  # e.g. rows given as an iterator, now spent
        raise UserError(
            "the data read again lacks windows the run kept: the rows must read the same each "
            "time they are iterated (a list, a dataset or a file, not an iterator)"
        )
    state.occurrences = dict(zip(keys.tolist(), counts.tolist(), strict=True))


def _occurrences(keys: torch.Tensor, group: list[list[int]], window: int) -> torch.Tensor:
    """[K] how many tokens of the sequences `group` have each of the sorted window keys."""
    lengths = torch.tensor([len(ids) for ids in group])
    ids = torch.zeros(len(group), int(lengths.max()), dtype=torch.long)
    for row, sequence in enumerate(group):
        ids[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
    inside = torch.arange(ids.shape[1])[None, :] < lengths[:, None]
    return count_keys(keys, window_keys(ids, lengths, window)[inside])


def token_decoder(tokenizer: Any) -> Callable[[int], str]:
    """id -> the text of that one token, as a reader should see it."""
    return lambda token_id: tokenizer.decode([token_id], clean_up_tokenization_spaces=False)


@dataclass
class Checkpoints:
    """Save the state to `path` every `examples` examples or `seconds` seconds, whichever first."""

    path: Path
    examples: int | None = None
    seconds: float | None = None

    def __post_init__(self) -> None:
        self._last_time, self._last_count = time.monotonic(), 0

    def due(self, done: int) -> bool:
        """done: the examples passed so far (and rows of the effects, once in them)."""
        by_count = self.examples is not None and done - self._last_count >= self.examples
        by_time = self.seconds is not None and time.monotonic() - self._last_time >= self.seconds
        return by_count or by_time

    def save(self, state: RunState, decode: Callable[[int], str], done: int) -> None:
        state.add_tokens(decode)
        state.save(self.path)
        self._last_time, self._last_count = time.monotonic(), done


@contextmanager
def deferred_signals() -> Iterator[list[int]]:
    """SIGINT/SIGTERM are noted (the pass then saves and stops) instead of killing mid-batch.

    A second signal acts as usual, so a stuck run can still be stopped.
    """
    received: list[int] = []
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def note(sig: int, frame: Any) -> None:
        received.append(sig)
        for s, handler in previous.items():
            signal.signal(s, handler)

    for sig in previous:
        signal.signal(sig, note)
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_analysis(
    analysis: Analysis,
    batches: Iterable[tuple[Batch, list[Sequence], Position]],
    decode: Callable[[int], str],
    checkpoints: Checkpoints | None = None,
    total: int | None = None,
    progress: bool = True,
) -> RunState:
    """Stream the batches through the model once; the hooks are gone afterwards, however it ends.

    Returns the finished state (position None, token strings recorded).
    """
    state = analysis.state
    start, done = time.perf_counter(), state.counters["num_tokens"]
    bar = tqdm(total=total, initial=state.counters["num_examples"], unit="ex", disable=not progress)
    with analysis.capture.hooks(), deferred_signals() as signals, bar:
        for batch, group, position in batches:
            analysis.process(batch, group, position)
            rate = (state.counters["num_tokens"] - done) / (time.perf_counter() - start)
            bar.set_postfix_str(f"{state.counters['num_tokens']} tok, {rate:,.0f} tok/s", False)
            bar.update(len(group))
            save_or_stop(state, decode, checkpoints, signals, state.counters["num_examples"])
    state.position = None
    state.add_tokens(decode)
    return state


def save_or_stop(
    state: RunState,
    decode: Callable[[int], str],
    checkpoints: Checkpoints | None,
    signals: list[int],
    done: int,
) -> None:
    """Between two steps of a pass: save a checkpoint where one is due (`done` steps passed)
    or a signal came, and stop (Interrupted) where one came."""
    if checkpoints is not None and (signals or checkpoints.due(done)):
        checkpoints.save(state, decode, done)
    if signals:
        name = signal.Signals(signals[0]).name
        where = f"; state saved to {checkpoints.path}" if checkpoints else ""
        raise Interrupted(signals[0], f"interrupted by {name}{where}: rerun with --resume")


def run_effects(
    analysis: Analysis,
    sequences: Iterable[Sequence],
    decode: Callable[[int], str],
    checkpoints: Checkpoints | None = None,
    progress: bool = True,
) -> None:
    """This slot's rows of the effects (backend.causal) into the state, after the pass: each
    row exactly (backend.effects), checkpointed like the pass; a resumed run goes on from the
    row it had reached. Each row's sequence is kept: the document shows it, coloured by KL."""
    config, state = analysis.config, analysis.state
    effects, (slot, slots) = state.effects, state.slot
    computer = Effects(analysis.model, analysis.modules, analysis.first, config.max_batch_tokens)
    bar = tqdm(
        total=config.effects,
        initial=effects.rows_done,
        desc="effects",
        unit="row",
        disable=not progress,
    )
    rows = effects_rows(sequences, config.effects, config.effects_max_length)
    with deferred_signals() as signals, bar:
        for ordinal, sequence, ids in rows:
            if ordinal < effects.rows_done:
                continue
            if ordinal % slots == slot:
                row = computer.row(ids.to(analysis.device))
                whole = len(ids) == len(sequence.input_ids)
                effects.update(row, ids, sequence.example_index, whole)
                state.sequences[sequence.example_index] = sequence.input_ids
            effects.rows_done = ordinal + 1
            bar.update(1)
            done = state.counters["num_examples"] + effects.rows_done
            save_or_stop(state, decode, checkpoints, signals, done)
    state.add_tokens(decode)


def pin_directions(
    state: RunState, model: nn.Module, tokenizer: Any, rows: Iterable[Row], config: RunConfig
) -> None:
    """The effects' pinned samples, on the merged state (the ranking needs every row): the
    config.steer_directions directions of largest ablation KL, each on the first
    config.steer_prompts rows of the effects, under every clamp (backend.steering)."""
    effects = state.effects
    modules = {(m.layer, m.module): m for m in find_lora_modules(model)}
    where = {
        d["index"]: (modules[layer["layer"], name], d["component"])
        for layer in state.layers
        for name, projection in layer["projections"].items()
        for d in projection["directions"]
    }
    chosen = []
    for index in effects.ranking()[: config.steer_directions]:
        lo, hi = state.tracker.moments.range.of(index)
        chosen.append((index, *where[index], lo, hi))
    wanted = sorted(effects.kl_tokens)[: config.steer_prompts]
    prompts = [
        (i, steering_prompt(row, tokenizer, config.text_field, config.max_length))
        for i, row in enumerate(itertools.islice(rows, wanted[-1] + 1 if wanted else 0))
        if i in wanted
    ]

    def generate(pins: list[tuple[LoraModule, int, float | None]], prompt: list[int]):
        return pinned_generations(model, pins, prompt, NEW_TOKENS)

    if chosen and prompts:
        pin(effects, chosen, prompts, generate, lambda ids: tokenizer.decode(ids))
    state.add_tokens(token_decoder(tokenizer))
