"""The one entry point of an analysis: rows through an already loaded model into a run's state.

    state = analyze(model, tokenizer, rows, RunConfig(lora_path="my/adapter", top_k=32))
    document = build_document(state)  # backend.output: the activations JSON

The CLI, the tests and the benchmark call it; so can a script that built its model in GPU
memory itself.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sized
from pathlib import Path
from typing import Any

from torch import nn

from backend.analysis import (
    Analysis,
    Checkpoints,
    count_windows,
    pin_directions,
    run_analysis,
    run_effects,
    store_sequences,
    token_decoder,
)
from backend.config import RunConfig
from backend.data import Row, Sequence, iter_batches, iter_sequences
from backend.sae_run import close_writer, open_writer, read_sae
from backend.state import RunState, load_state


def analyze(
    model: nn.Module,
    tokenizer: Any,
    rows: Iterable[Row],
    config: RunConfig,
    *,
    checkpoint: Path | None = None,
    slot: tuple[int, int] = (0, 1),
    progress: bool = False,
) -> RunState:
    """Every LoRA direction of `model` (a PEFT model in eval mode) over `rows`, in one pass.

    rows: dicts as the CLI reads them (text, a chat, or `input_ids`), None for a row that could
    not be read (skipped, counted, keeping its index); iterated once more, from the start, to
    count the shown windows' occurrences (a whole run: slot (0, 1)), and with
    config.store_sequences. config: its dtype and batch budget, if left open, are the model's
    (`RunConfig.resolved`); config.data_file or dataset name the rows in the output.
    checkpoint: saved every config.checkpoint_every and on SIGINT/SIGTERM, and continued from
    with config.resume. slot (i, n): of the pass's batches, take those numbered i mod n.
    With config.effects, the effects' rows follow the pass (backend.causal).
    Returns this slot's finished state (merge slots with backend.state.merge_states, then
    `finish` the merged state).
    """
    config = config.resolved(model)
    analysis = Analysis(model, config, slot)
    if checkpoint is not None and config.resume and checkpoint.exists():
        analysis.resume(load_state(checkpoint, analysis.device), str(checkpoint))
    state = analysis.state
    decode = token_decoder(tokenizer)
    every = None if checkpoint is None else Checkpoints(checkpoint, *config.checkpoint_every)
    if state.position is not None:  # a run resumed during its effects has done its pass
        if config.sae:
            open_writer(config, state, analysis.capture.num_lora)
        state.counters["num_skipped_rows"] = 0  # a resumed pass reads every row again
        sequences = tokenize(counted(rows, state.counters), tokenizer, config, state.position.row)
        batches = iter_batches(
            sequences, config.max_batch_tokens, config.sort_window, state.position, slot
        )
        # The bar counts this slot's examples: known in advance only when it takes every batch.
        total = rows_read(rows, config) if slot[1] == 1 else None
        state = run_analysis(analysis, batches, decode, every, total=total, progress=progress)
        if state.writer is not None:
            close_writer(state)
    if state.effects is not None:
        run_effects(analysis, tokenize(rows, tokenizer, config), decode, every, progress)
    if config.store_sequences:
        store_sequences(state, tokenize(rows, tokenizer, config), decode)
    if slot[1] == 1:
        finish(state, model, tokenizer, rows, config, progress)
    return state


def finish(
    state: RunState,
    model: nn.Module,
    tokenizer: Any,
    rows: Iterable[Row],
    config: RunConfig,
    progress: bool = False,
) -> None:
    """What needs the whole run's state, on the process that holds it: the shown windows'
    occurrences over all the data, the effects' pinned samples, and the SAE (--sae)."""
    count_windows(state, tokenize(rows, tokenizer, config))
    if state.effects is not None:
        pin_directions(state, model, tokenizer, rows, config)
    if config.sae:
        read_sae(state, model, token_decoder(tokenizer), config, progress)


def tokenize(
    rows: Iterable[Row], tokenizer: Any, config: RunConfig, start_row: int = 0
) -> Iterator[Sequence]:
    return iter_sequences(
        rows,
        tokenizer,
        text_field=config.text_field,
        max_length=config.max_length,
        num_examples=config.num_examples,
        start_row=start_row,
    )


def counted(rows: Iterable[Row], counters: dict[str, int]) -> Iterator[Row]:
    """The rows, counting the unreadable ones (None) as they pass."""
    for row in rows:
        if row is None:
            counters["num_skipped_rows"] += 1
        yield row


def rows_read(rows: Iterable[Row], config: RunConfig) -> int | None:
    """How many rows the run reads, where it is known in advance: --num-examples, or the
    length of rows that have one."""
    sized = len(rows) if isinstance(rows, Sized) else None
    known = [n for n in (config.num_examples, sized) if n is not None]
    return min(known) if known else None
