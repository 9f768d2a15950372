"""Explain and score the directions of a written activations file, in place or into another.

    python backend/explain_directions.py --data activations_data.json [options]

The same step as a run's --explain, on a file a run (or a merge of shards) wrote: every direction
and sign, and every baseline neuron and sign, explained from its even-ranked top examples and
scored on held-out contexts by detection and fuzzing, with the shuffled and neuron baselines.
The explainer and scorer are the file's base model (adapter disabled), loaded only if needed,
or an OpenAI-compatible endpoint. Every answer is cached, so a rerun costs nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if not __package__:  # run as a script: import `backend` from the repo root, not backend/ itself
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from backend import OptionError, UserError
from backend.atomic import check_writable
from backend.config import EXPLAIN_OPTIONS, add_arguments, default_batch_tokens
from backend.contract import ContractError, validate
from backend.embedded import EMBEDDED_MODEL_ID
from backend.explain import backends, cache_path, explain_document, summary_line
from backend.loading import (
    EMBEDDED,
    default_device,
    load_base,
    quiet_libraries,
    resolve_base_model,
    resolve_dtype,
)
from backend.output import write_json_atomic

PROG = "explain_directions.py"


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data", type=Path, required=True, help="the activations JSON to explain (required)"
    )
    parser.add_argument(
        "--output", type=Path, help="where to write it, atomically (default: --data, in place)"
    )
    parser.add_argument(
        "--base-model",
        help="the local explainer and scorer, without the adapter (default: the file's base model)",
    )
    parser.add_argument("--device", help="where the local model runs (default: cuda if there)")
    parser.add_argument("--dtype", help="its dtype (default: bfloat16 on a GPU, else float32)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    add_arguments(parser, only=EXPLAIN_OPTIONS)
    return parser


def main(argv: list[str] | None = None) -> int:
    prog = PROG if argv is not None else Path(sys.argv[0]).name
    try:
        return run(build_parser(prog).parse_args(sys.argv[1:] if argv is None else argv))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, OptionError) else 1


def read_document(path: Path) -> dict:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is not an activations JSON: {e}") from None
    try:
        validate(document)
    except ContractError as e:
        raise UserError(f"{path} is not an activations file: {e}") from None
    return document


def run(args: argparse.Namespace) -> int:
    quiet_libraries(downloads=not args.quiet)
    document = read_document(args.data)
    output = args.output or args.data
    check_writable(output)
    name = args.base_model or document["metadata"]["base_model"]

    def local():
        base = resolve_base_model(EMBEDDED if name == EMBEDDED_MODEL_ID else name)
        device = args.device or default_device()
        model, tokenizer = load_base(base, resolve_dtype(args.dtype, device), device)
        return model.eval(), tokenizer, base.name, default_batch_tokens(model.device)

    chats = backends(args, local)
    cache = cache_path(args.explain_cache, output)
    found = explain_document(document, chats, args, cache, progress=not args.quiet)
    write_json_atomic(document, output)
    if not args.quiet:
        print(summary_line(found))
        print(f"-> {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
