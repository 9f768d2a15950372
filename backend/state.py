"""A run's accumulated state: what a checkpoint, a shard file and a process's result all are.

The state holds the tracker's tensors, the layout of the directions, the counters, the strings
of the tokens its top-k contexts use (so that merging needs no tokenizer), and where the pass
stands. States of the same run over disjoint rows merge exactly into the state of one pass over
all of them.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from backend import UserError
from backend.atomic import write_atomic
from backend.causal import EffectsState
from backend.data import Position
from backend.output import layout_token_ids
from backend.tracking import Tracker

if TYPE_CHECKING:
    from backend.adapter_cache import CacheWriter

CPU = torch.device("cpu")
FORMAT = "lora-activations-state"
# 9: quantile samples keep each window's activations once, windows zero outside the sequence;
# 8: the SAE's cache and results (--sae); 7: below-median contexts (the reservoir);
# 6: baseline neurons; 5: the effects (--effects); 4: top-k windows keep their keys
VERSION = 9
COUNTERS = ("num_examples", "num_tokens", "num_truncated", "num_skipped_rows")
# Every process and shard reads all the rows, so each counts all skipped ones: these are not
# summed when states merge.
PER_RUN_COUNTERS = ("num_skipped_rows",)


@dataclass
class RunState:
    run: dict[str, Any]  # RunConfig.identity(): equal for a resume or a merge
    layers: list[dict[str, Any]]  # the document's layout (output.layer_layout)
    tracker: Tracker
    cross_layer_cosine: dict[str, Any] = field(default_factory=dict)  # across layers
    counters: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0))
    tokens: dict[int, str] = field(default_factory=dict)  # strings of the top-k context ids
    sequences: dict[int, list[int]] = field(default_factory=dict)  # --store-sequences: token ids
    # window key -> tokens with that window in the data, for the windows the document shows
    # (backend.analysis.count_windows, once the pass over all the data is done)
    occurrences: dict[int, int] = field(default_factory=dict)
    position: Position | None = field(default_factory=Position)  # None once the pass is done
    slot: tuple[int, int] = (0, 1)  # this state's batches: number % slots == slot
    num_processes: int = 1  # processes whose results it holds
    effects: EffectsState | None = None  # --effects: run after the pass (backend.causal)
    # --baseline-neurons: each neuron's layer, coordinate and tracker index (backend.neurons)
    neurons: list[dict[str, int]] = field(default_factory=list)
    # --sae: the cache's folder and each slot's writer's position ({"folder", "writers": {name:
    # CacheWriter.state_dict()}}), this slot's writer while the pass writes (saved through
    # to_dict), and once the whole run's SAE is read, the document's `sae` (backend.sae_run)
    cache: dict[str, Any] | None = None
    writer: CacheWriter | None = field(default=None, repr=False)
    sae: dict[str, Any] | None = None

    @property
    def finished(self) -> bool:
        """The pass is done, and the effects' rows too where the run has them."""
        effects_done = self.effects is None or self.effects.rows_done == self.run["effects"]
        return self.position is None and effects_done

    def add_tokens(self, decode) -> None:
        """Record the strings of every id the output may show (decode: id -> str): those the
        summaries name (kept contexts; every token seen, which the token profiles rank only
        once merged with other processes' or shards'), the logit effects' and the stored
        sequences'."""
        ids = self.tracker.token_ids() | layout_token_ids(self.layers)
        if self.effects is not None:
            ids |= self.effects.token_ids()
        for sequence in self.sequences.values():
            ids.update(sequence)
        self.tokens.update({i: decode(i) for i in ids if i >= 0 and i not in self.tokens})

    def to_dict(self) -> dict[str, Any]:
        if self.writer is not None:  # flushed to disk, its position with the rest
            self.cache["writers"][self.writer.name] = self.writer.state_dict()
        return {
            "format": FORMAT,
            "version": VERSION,
            "run": self.run,
            "layers": self.layers,
            "cross_layer_cosine": self.cross_layer_cosine,
            "tracker": self.tracker.state_dict(),
            "counters": self.counters,
            "tokens": self.tokens,
            "sequences": self.sequences,
            "occurrences": self.occurrences,
            "position": None if self.position is None else vars(self.position),
            "slot": list(self.slot),
            "num_processes": self.num_processes,
            "effects": None if self.effects is None else self.effects.state_dict(),
            "neurons": self.neurons,
            "cache": self.cache,
            "sae": self.sae,
        }

    @classmethod
    def from_dict(cls, state: dict[str, Any], device: torch.device) -> RunState:
        tracker = Tracker.from_state_dict(state["tracker"], device)
        effects = state["effects"]
        return cls(
            run=state["run"],
            layers=state["layers"],
            tracker=tracker,
            cross_layer_cosine=state["cross_layer_cosine"],
            counters=state["counters"],
            tokens=state["tokens"],
            sequences=state["sequences"],
            occurrences=state["occurrences"],
            position=None if state["position"] is None else Position(**state["position"]),
            slot=tuple(state["slot"]),
            num_processes=state["num_processes"],
            effects=None
            if effects is None
            else EffectsState.from_state_dict(effects, tracker.shape),
            neurons=state["neurons"],
            cache=state["cache"],
            sae=state["sae"],
        )

    def save(self, path: Path) -> None:
        state = self.to_dict()
        write_atomic(path, lambda f: torch.save(state, f))


def differing_options(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """The names of the options on which two run identities differ."""
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))


def load_state(path: Path, device: torch.device = CPU) -> RunState:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"no such file: {path}") from None
    except Exception as e:  # pickle, zip and torch errors alike: not a state file of ours
        raise UserError(f"{path} is not a state file ({type(e).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"{path} is not a state file of this tool")
    if state.get("version") != VERSION:
        raise UserError(f"{path}: state version {state.get('version')}, expected {VERSION}")
    return RunState.from_dict(state, device)


def merge_states(states: list[RunState], names: list[str]) -> RunState:
    """One state holding all of `states`: finished passes of one run over disjoint batches.

    What needs the whole run (the windows' occurrences, the effects' pinned samples) is still
    to be done: backend.pipeline.finish."""
    first = states[0]
    for state, name in zip(states, names, strict=True):
        if not state.finished:
            raise UserError(f"{name} is an unfinished run: finish it with --resume first")
        if state.run != first.run or (state.layers, state.neurons) != (first.layers, first.neurons):
            differs = differing_options(state.run, first.run)
            what = ", ".join(differs) if differs else "the adapter's directions"
            raise UserError(f"{name} is not from the same run as {names[0]} ({what} differ)")
    tracker = Tracker.from_state_dict(first.tracker.state_dict(), CPU)
    merged = RunState(
        first.run,
        first.layers,
        tracker,
        first.cross_layer_cosine,
        dict(first.counters),
        dict(first.tokens),
        dict(first.sequences),
    )
    merged.position, merged.num_processes = None, first.num_processes
    merged.neurons = first.neurons
    merged.cache = merge_caches([s.cache for s in states], names)
    if first.effects is not None:
        merged.effects = EffectsState.from_state_dict(first.effects.state_dict(), tracker.shape)
    for state in states[1:]:
        merged.tracker.merge(state.tracker)
        if merged.effects is not None:
            merged.effects.merge(state.effects)
        merged.tokens.update(state.tokens)
        merged.sequences.update(state.sequences)
        merged.num_processes += state.num_processes
        for key in COUNTERS:
            combine = max if key in PER_RUN_COUNTERS else operator.add
            merged.counters[key] = combine(merged.counters[key], state.counters[key])
    return merged


def merge_caches(caches: list[dict[str, Any] | None], names: list[str]) -> dict[str, Any] | None:
    """The union of the slots' SAE caches (--sae), which must share one folder."""
    if caches[0] is None:
        return None
    for cache, name in zip(caches, names, strict=True):
        if cache["folder"] != caches[0]["folder"]:
            raise UserError(
                f"{name} cached the adapter state in {cache['folder']}, {names[0]} in "
                f"{caches[0]['folder']}: move the caches into one folder (--cache-dir)"
            )
    return {"folder": caches[0]["folder"], "writers": {
        writer: position for cache in caches for writer, position in cache["writers"].items()
    }}  # fmt: skip


def check_shards(states: list[RunState], names: list[str]) -> None:
    """Refuse a set of shard files that does not hold each shard of one split exactly once."""
    slots = sorted((s.slot, name) for s, name in zip(states, names, strict=True))
    total = slots[0][0][1]
    if [slot for slot, _ in slots] != [(i, total) for i in range(total)]:
        have = ", ".join(f"{name}: shard {i}/{n}" for (i, n), name in slots)
        raise UserError(f"need shards 0..{total - 1} of {total}, each once; got {have}")
