"""Per-direction activations of a LoRA adapter over a dataset, written as one JSON file.

    python backend/generate_activations_data.py --lora-path ADAPTER [options]

For every module PEFT adapted, each rank component's activation `lora_A · x` is computed per
token in the adapted model's own forward pass; the JSON keeps its top-k positive and negative
tokens in context, exact statistics and a histogram, and the read/write cosine similarities.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

if not __package__:  # run as a script: import `backend` from the repo root, not backend/ itself
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from backend import UserError
from backend.analysis import AnalysisConfig, run_analysis
from backend.data import iter_sequences, peek, read_hub_rows, read_rows, row_content
from backend.loading import DTYPES, default_device, input_device, load_model, resolve_dtype
from backend.output import write_json_atomic


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
        formatter_class=HelpFormatter,
    )
    model = parser.add_argument_group("model")
    model.add_argument(
        "--base-model",
        default="Qwen/Qwen2.5-32B-Instruct",
        help="base model: hub id, local directory, or a .gguf file (converted once, cached)",
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
        "overrides --dataset",
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
        help="cut sequences to this many tokens (default: no cut)",
    )
    analysis = parser.add_argument_group("analysis")
    analysis.add_argument(
        "--top-k", type=positive_int, default=16, help="examples kept per direction and sign"
    )
    analysis.add_argument(
        "--context-window",
        type=non_negative_int,
        default=10,
        help="tokens kept on each side of a top example",
    )
    analysis.add_argument(
        "--histogram-bins", type=positive_int, default=50, help="at most this many bins"
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
        default=8192,
        help="token budget of a batch (sequences x padded length)",
    )
    output = parser.add_argument_group("output")
    output.add_argument(
        "--output",
        type=Path,
        default=Path("backend/activations_data.json"),
        help="where to write the JSON (atomically)",
    )
    output.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    if args.data_file is not None:
        rows, source = read_rows(args.data_file), str(args.data_file)
    else:
        rows, source = read_hub_rows(args.dataset, args.split), f"{args.dataset} ({args.split})"
    first, rows = peek(rows, source)
    row_content(first, args.text_field)  # a wrong field fails before the model loads
    dtype = resolve_dtype(args.dtype, args.device)
    model, tokenizer = load_model(
        args.base_model, args.lora_path, dtype, args.device, args.device_map
    )
    sequences = iter_sequences(
        rows,
        tokenizer,
        text_field=args.text_field,
        max_length=args.max_length,
        num_examples=args.num_examples,
    )
    config = AnalysisConfig(
        top_k=args.top_k,
        context_window=args.context_window,
        histogram_bins=args.histogram_bins,
        max_batch_tokens=args.max_batch_tokens,
    )
    analysis = run_analysis(
        model, sequences, config, input_device(model), args.num_examples, not args.quiet
    )
    if analysis.num_examples == 0:
        raise UserError(f"no examples with tokens in {source}")
    metadata = {
        "base_model": args.base_model,
        "adapter": args.lora_path,
        "dataset": source,
        "num_processes": 1,
        "dtype": str(dtype).removeprefix("torch."),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_json_atomic(analysis.document(metadata, tokenizer), args.output)
    if not args.quiet:
        seconds = time.perf_counter() - started
        print(
            f"{analysis.num_examples} examples, {analysis.num_tokens} tokens "
            f"({analysis.num_truncated} cut at --max-length), "
            f"{analysis.capture.num_directions} directions in "
            f"{len({m.layer for m in analysis.modules})} layers, {seconds:.1f} s "
            f"-> {args.output} ({args.output.stat().st_size / 1e6:.1f} MB)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
