"""Per-direction activations of a LoRA adapter over a dataset, written as one JSON file.

    python backend/generate_activations_data.py --lora-path ADAPTER [options]
    lora-activations --lora-path ADAPTER [options]       # the same, once installed

For every module PEFT adapted, each rank component's activation `lora_A · x` is computed per
token in the adapted model's own forward pass; the JSON keeps its top-k positive and negative
tokens in context, seeded samples from across its distribution, exact statistics and a
histogram, its top tokens and position profile, its logit effects, and the read/write cosine
similarities within and across layers.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import re
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import replace
from pathlib import Path

if not __package__:  # run as a script: import `backend` from the repo root, not backend/ itself
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from backend import OptionError, UserError
from backend.analysis import Interrupted, count_windows
from backend.atomic import check_writable
from backend.config import RunConfig, add_arguments
from backend.data import Row, count_rows, peek, read_hub_rows, read_rows, row_content
from backend.directions import find_lora_modules
from backend.explain import backends, cache_path, explain_document, summary_line
from backend.loading import (
    EMBEDDED,
    default_device,
    load_model,
    quiet_libraries,
    resolve_base_model,
    resolve_dtype,
)
from backend.output import build_document, write_json_atomic
from backend.pipeline import analyze, finish, rows_read, tokenize
from backend.processes import gather_states, init_processes
from backend.sae_run import check_sae_options
from backend.state import RunState, check_shards, load_state, merge_states

PROG = "generate_activations_data.py"  # as --help and usage errors name the command


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=__doc__.split("\n\n")[0],
        epilog="Shard files of a --shard I/N run combine into one activations JSON with: "
        f"{prog} merge OUT.json SHARD_FILE...",
    )
    add_arguments(parser)
    return parser


def build_merge_parser(prog: str = PROG) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"{prog} merge",
        description="Combine the shard files of a --shard I/N run into one activations JSON, "
        "exactly as one unbroken run would have written it. It reads the run's data once more "
        "(tokenize-only, with the base model's tokenizer) to count each shown window's "
        "occurrences.",
    )
    parser.add_argument("output", type=Path, help="the activations JSON to write")
    parser.add_argument("shards", type=Path, nargs="+", help="shard files, one per shard")
    parser.add_argument(
        "--keep-cache", action="store_true", help="(--sae runs) keep the shards' SAE cache"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    # From the command line, usage names the command as typed (a script or `lora-activations`).
    prog = PROG if argv is not None else Path(sys.argv[0]).name
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["merge"]:
            return merge(build_merge_parser(prog).parse_args(argv[1:]))
        return run(RunConfig.from_args(build_parser(prog).parse_args(argv)))
    except Interrupted as e:
        print(e, file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:  # before or after the pass, where there is nothing to save
        print("interrupted", file=sys.stderr)
        return 130
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, OptionError) else 1


class FileRows:
    """The rows of a data file, read afresh each time they are iterated (the count of the shown
    windows and --store-sequences read them again): the first time on from the rows read to
    find the first readable one, and later times quietly, so that a malformed line is warned
    about once. Its len is the file's row count."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.first, self._started = peek(read_rows(path), str(path))

    def __iter__(self) -> Iterator[Row]:
        started, self._started = self._started, None
        return started if started is not None else read_rows(self.path, quiet=True)

    @functools.cached_property
    def _length(self) -> int:
        return count_rows(self.path)

    def __len__(self) -> int:  # the progress bar's total
        return self._length


def open_rows(config: RunConfig) -> tuple[Iterable[Row], dict]:
    """The rows of the data, and the first readable one (read now, to check it)."""
    if config.data_file is not None:
        rows = FileRows(config.data_file)
        return rows, rows.first
    dataset = read_hub_rows(config.dataset, config.split)  # sized, and iterable again
    return dataset, peek(dataset, config.source)[0]


def run(config: RunConfig) -> int:
    started = time.perf_counter()
    quiet_libraries(downloads=not config.quiet)
    rows, first = open_rows(config)
    row_content(first, config.text_field)  # a wrong field fails before the model loads
    check_effects(config, rows)
    rank, world, device = init_processes(config.device or default_device(), config.device_map)
    checkpoint = checkpoint_path(config, rank, world)
    for path in (config.output, checkpoint):  # before the model loads, not after the pass
        check_writable(path)
    shard, shards = config.shard
    slot = (shard * world + rank, shards * world)  # this process's batches: i % slots == slot
    base = resolve_base_model(config.base_model)
    dtype = resolve_dtype(config.dtype, device.type)
    model, tokenizer = load_model(base, config.lora_path, dtype, device, config.device_map)
    config = replace(config, base_model=base.name)  # outputs name the model, not a cache path
    progress = not config.quiet and rank == 0
    if config.explain and shards > 1:
        raise UserError(
            "--explain with --shard: merge the shards, then explain the merged file with "
            "backend/explain_directions.py"
        )
    if config.sae:  # bad options, a saved SAE of another adapter, too little disk: now
        num_lora = sum(m.rank for m in find_lora_modules(model))
        check_sae_options(config, num_lora, estimate_tokens(rows, tokenizer, config))
    if config.explain and rank == 0:  # an unusable endpoint fails now, before the pass
        batch = config.resolved(model).max_batch_tokens
        chats = backends(config, lambda: (model, tokenizer, base.name, batch))
    state = analyze(
        model, tokenizer, rows, config, checkpoint=checkpoint, slot=slot, progress=progress
    )
    state = gather_states(state, rank, world)
    if rank != 0:
        return 0
    if state.counters["num_examples"] == 0:
        raise UserError(f"no examples with tokens in {config.source}")
    if world > 1 and shards == 1:  # each process saw its batches only: finish the whole run
        finish(state, model, tokenizer, rows, config.resolved(model), progress)
    if shards > 1:
        state.slot = (shard, shards)
        state.save(config.output)
    else:
        document = build_document(state)
        if config.explain:
            state.save(checkpoint)  # a run killed while explaining resumes here
            found = explain_document(
                document, chats, config, cache_path(config.explain_cache, config.output), progress
            )
        write_json_atomic(document, config.output)
    for r in range(world):
        checkpoint_path(config, r, world).unlink(missing_ok=True)
    if not config.quiet:
        summary(state, config.output, time.perf_counter() - started)
        if config.explain:
            print(summary_line(found))
    return 0


def check_effects(config: RunConfig, rows: Iterable[Row]) -> None:
    """--effects N beyond the rows there are fails now, not after the pass (rows without 2
    tokens are found only once the effects read them)."""
    read = rows_read(rows, config)
    if read is not None and config.effects > read:
        raise UserError(
            f"--effects {config.effects}: the run reads only {read} rows "
            "(the data's rows, within --num-examples)"
        )


ESTIMATE_ROWS = 64  # rows tokenized to estimate a run's tokens before it starts


def estimate_tokens(rows: Iterable[Row], tokenizer, config: RunConfig) -> int | None:
    """The run's tokens, roughly: the mean of the first rows' times the rows it reads (None
    where their number is unknown), for the SAE cache's disk check."""
    read = rows_read(rows, config)
    lengths = [len(s.input_ids) for s in itertools.islice(tokenize(rows, tokenizer, config),
                                                          ESTIMATE_ROWS)]  # fmt: skip
    if read is None or not lengths:
        return None
    return round(sum(lengths) / len(lengths) * read)


def checkpoint_path(config: RunConfig, rank: int, world: int) -> Path:
    path = config.checkpoint or config.output.with_name(config.output.name + ".ckpt")
    return path if world == 1 else path.with_name(f"{path.name}.rank{rank}")


def summary(state: RunState, output: Path, seconds: float) -> None:
    counters = state.counters
    directions = sum(
        len(p["directions"]) for layer in state.layers for p in layer["projections"].values()
    )
    neurons = f" + {len(state.neurons)} baseline neurons" if state.neurons else ""
    print(
        f"{counters['num_examples']} examples, {counters['num_tokens']} tokens "
        f"({counters['num_truncated']} cut at --max-length, {counters['num_skipped_rows']} "
        f"malformed rows skipped), {directions} directions{neurons} in "
        f"{len(state.layers)} layers, {state.num_processes} process(es), {seconds:.1f} s "
        f"-> {output} ({output.stat().st_size / 1e6:.1f} MB)"
    )
    if state.sae is not None:
        print(sae_line(state.sae))
    nonfinite = int(state.tracker.moments.nonfinite.sum())
    if nonfinite:
        worst = int(state.tracker.moments.nonfinite.argmax())
        print(
            f"warning: {nonfinite} NaN/infinite activations were left out of the statistics "
            f"(most in direction {worst}); see stats.nonfinite per direction",
            file=sys.stderr,
        )


def sae_line(sae: dict) -> str:
    return (
        f"SAE: {sae['num_latents']} latents, k {sae['k']}: FVU {sae['fvu']:.3f} (held out "
        f"{sae['fvu_heldout']:.3f}), L0 {sae['l0']:.1f}, {sae['dead_fraction']:.0%} dead "
        f"-> {sae['path']}"
    )


def merge(args: argparse.Namespace) -> int:
    names = [str(p) for p in args.shards]
    states = [load_state(p) for p in args.shards]
    check_shards(states, names)
    merged = merge_states(states, names)
    config = replace(data_config(merged.run), output=args.output, keep_cache=args.keep_cache)
    rows, _ = open_rows(config)
    if merged.effects is None and not config.sae:
        count_windows(merged, tokenize(rows, run_tokenizer(merged.run), config))
    else:  # the pinned samples and the SAE's features need the model
        device = default_device()
        dtype = resolve_dtype(merged.run["dtype"], device)
        model, tokenizer = load_model(
            run_base_model(merged.run), config.lora_path, dtype, device, None
        )
        finish(merged, model, tokenizer, rows, config, progress=True)
    write_json_atomic(build_document(merged), args.output)
    print(f"merged {len(states)} shards -> {args.output}")
    if merged.sae is not None:
        print(sae_line(merged.sae))
    return 0


def data_config(run: dict) -> RunConfig:
    """The options that read a run's data, from its identity (the shards' `run`)."""
    source = run["dataset"]
    hub = re.fullmatch(r"(.+) \((.+)\)", source)
    if Path(source).exists() or hub is None:
        where = {"data_file": Path(source)}
    else:
        where = {"dataset": hub[1], "split": hub[2]}
    if "data_file" in where and not where["data_file"].exists():
        raise UserError(
            f"merge counts the shown windows over the run's data, and {source} is not there"
        )
    options = (
        "base_model", "lora_path", "text_field", "num_examples", "max_length", "effects",
        "effects_max_length", "steer_directions", "steer_prompts", "sae", "sae_latents", "sae_k",
        "sae_lr", "sae_batch", "sae_seed", "sae_from", "cache_dtype", "min_token_count",
    )  # fmt: skip
    return RunConfig(**{key: run[key] for key in options}, **where)


def run_base_model(run: dict):
    """The run's base model, found again from the name its output records."""
    from backend.embedded import EMBEDDED_MODEL_ID

    name = run["base_model"]
    return resolve_base_model(EMBEDDED if name == EMBEDDED_MODEL_ID else name)


def run_tokenizer(run: dict):
    """The tokenizer of the run's base model (merge reads the data once more, tokenize-only)."""
    from transformers import AutoTokenizer

    name = run["base_model"]
    try:
        return AutoTokenizer.from_pretrained(run_base_model(run).path)
    except (OSError, ValueError) as e:
        raise UserError(
            f"merge counts the shown windows over the run's data and needs the tokenizer of "
            f"{name}: cannot load it ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
        ) from None


if __name__ == "__main__":
    sys.exit(main())
