"""Cost of the causal effects (backend.effects) against the naive method, measured in one run.

    python benchmarks/bench_effects.py [--quick] [--device cpu|cuda] [--rows N] [--length L]

On the embedded SmolLM2-135M with the demo adapter (90 directions: 123 ablations with the 30
layers and 3 modules), the first rows of demo/data/heldout.jsonl, cut to --length tokens, it
times, interleaved, best of --repeats:
- effects: Effects.row over the rows (ablations from each start layer, batched; one backward);
- naive: per row, one plain full forward of the whole model per ablation (its lora_B columns
  zeroed in the weights), plus the same full forward with autograd and its backward (the
  attribution) and the base forward, with KL and cross-entropy in float64 as effects computes.
Steering is not counted. Target: effects <= 0.7 x naive, in this process's CPU seconds on a
CPU (which a shared machine's load does not lengthen; wall time is shown too) and in wall time
on a GPU. Both results are compared too.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

if not __package__:  # run as a script: import `backend` from the repo root
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import torch
import torch.nn.functional as F
from torch import nn

from backend.config import default_batch_tokens
from backend.data import iter_sequences, read_rows
from backend.directions import LoraModule, find_lora_modules
from backend.effects import Ablation, Effects, RowEffects
from backend.loading import EMBEDDED, load_model, quiet_libraries, resolve_base_model
from benchmarks.bench_pipeline import cpu_seconds, machine, print_machine

# transformers 5 warns about its own API when peft calls it: not ours to fix (as in pyproject)
warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)

REPO = Path(__file__).resolve().parent.parent
TARGET = 0.7  # max effects / naive


def demo_rows(tokenizer, rows: int, length: int) -> list[torch.Tensor]:
    """The first `rows` rows of the demo's held-out data, tokenized as the main pass does."""
    sequences = iter_sequences(
        read_rows(REPO / "demo" / "data" / "heldout.jsonl"),
        tokenizer,
        text_field=None,
        max_length=length,
        num_examples=None,
    )
    found = [torch.tensor(s.input_ids) for s in sequences if len(s.input_ids) >= 2]
    return found[:rows]


def plain_log_probs(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """[n-1, V] float64 log-probabilities of the whole model's plain forward."""
    return F.log_softmax(model(input_ids=ids[None], use_cache=False).logits[0, :-1].double(), -1)


@torch.no_grad()
def naive_ablation(
    model: nn.Module, ablation: Ablation, ids: torch.Tensor, log_p: torch.Tensor
) -> tuple[float, float]:
    """Summed KL(full || ablated) and CE change: zero the columns, run it all, restore them."""
    saved = {}
    for name, components in ablation.drop.items():
        weight = model.get_submodule(name).lora_B["default"].weight
        saved[name] = weight[:, components].clone()
        weight[:, components] = 0
    try:
        log_q = plain_log_probs(model, ids)
    finally:
        for name, components in ablation.drop.items():
            model.get_submodule(name).lora_B["default"].weight[:, components] = saved[name]
    target = ids[1:, None]
    kl = (log_p.exp() * (log_p - log_q)).sum()
    return float(kl), float((log_p.gather(1, target) - log_q.gather(1, target)).sum())


def naive_row(
    model: nn.Module, modules: list[LoraModule], ablations: list[Ablation], ids: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The naive method on one row: what it found, by ablation kind, and the attribution."""
    n = ids.numel()
    # attribution: -dL/ds at s = 1 for a scale on each lora_A output, which is -a * dL/da
    scales = {m.name: torch.ones(1, n, m.rank, requires_grad=True) for m in modules}
    handles = [
        model.get_submodule(m.name)
        .lora_A["default"]
        .register_forward_hook(lambda mod, args, out, s=scales[m.name]: out * s.to(out))
        for m in modules
    ]
    try:
        log_p = plain_log_probs(model, ids)
        (-log_p.gather(1, ids[1:, None]).sum()).backward()
    finally:
        for handle in handles:
            handle.remove()
    log_p = log_p.detach()
    with torch.no_grad(), model.disable_adapter():
        log_base = plain_log_probs(model, ids)
    found = {
        "kl_tokens": (log_p.exp() * (log_p - log_base)).sum(-1),
        "attribution": -torch.cat([scales[m.name].grad[0].T for m in modules]),  # modules order
    }
    sums: dict[str, list[float]] = {}
    for ablation in ablations:
        kl, dloss = naive_ablation(model, ablation, ids, log_p)
        sums.setdefault(f"{ablation.kind}_kl", []).append((ablation.index, kl))
        sums.setdefault(f"{ablation.kind}_dloss", []).append((ablation.index, dloss))
    for key, values in sums.items():
        found[key] = torch.tensor([v for _, v in sorted(values)], dtype=torch.float64)
    return found


def largest_difference(ours: RowEffects, naive: dict[str, torch.Tensor]) -> tuple[str, float]:
    """The field where effects and naive differ most, relative to the field's largest value."""
    worst = ("", 0.0)
    for key, expected in naive.items():
        got = getattr(ours, key).to(expected)
        difference = float((got - expected).abs().max() / expected.abs().max().clamp_min(1e-30))
        worst = max(worst, (key, difference), key=lambda w: w[1])
    return worst


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="1 row x 128 tokens (a smoke run)")
    p.add_argument(
        "--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    p.add_argument("--rows", type=int, help="rows of the held-out data (default 2; quick 1)")
    p.add_argument("--length", type=int, help="tokens per row (default 512; quick 128)")
    p.add_argument("--repeats", type=int, default=1, help="runs per timing, best kept")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    args = p.parse_args(argv)
    args.rows = args.rows or (1 if args.quick else 2)
    args.length = args.length or (128 if args.quick else 512)
    return args


def timed(run, device: torch.device) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds) of run()."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    quiet_libraries(downloads=False)
    device = torch.device(args.device)
    base = resolve_base_model(EMBEDDED)
    model, tokenizer = load_model(base, str(REPO / "demo" / "adapter"), torch.float32, device, None)
    modules = find_lora_modules(model)
    first, start = {}, 0
    for m in modules:  # the rows in modules order, as naive_row's attribution
        first[m.name], start = start, start + m.rank
    effects = Effects(model, modules, first, default_batch_tokens(device))
    plan = effects.ablations
    rows = [ids.to(device) for ids in demo_rows(tokenizer, args.rows, args.length)]
    tokens = sum(ids.numel() for ids in rows)
    info, cpu_before = machine(args.device), cpu_seconds()
    print(f"machine: {info}; load average {os.getloadavg()[0]:.2f}", flush=True)
    print(
        f"{base.name}: {start} directions, {len(effects.ablations)} ablations; "
        f"{len(rows)} rows, {tokens} tokens",
        flush=True,
    )
    runs: dict[str, list[float]] = {"effects": [], "naive": []}
    cpu = dict.fromkeys(runs, 0.0)  # CPU seconds of this process, over all repeats
    ours, naive = [], []
    started = time.perf_counter()
    for _ in range(args.repeats):
        spent = dict.fromkeys(runs, 0.0)
        for ids in rows:  # interleaved row by row: a change in the machine's load hits both
            for what, run in (
                ("effects", lambda ids=ids: ours.append(effects.row(ids))),
                ("naive", lambda ids=ids: naive.append(naive_row(model, modules, plan, ids))),
            ):
                wall, process = timed(run, device)
                spent[what] += wall
                cpu[what] += process
                print(f"    {what:<8} row of {ids.numel()} tokens: {wall:8.2f} s", flush=True)
        for what, seconds in spent.items():
            runs[what].append(seconds)
    seconds = time.perf_counter() - started
    others = [b - a for a, b in zip(cpu_before, cpu_seconds(), strict=True)]
    busy = (others[0] - others[1]) / seconds
    worst = max(
        (largest_difference(o, n) for o, n in zip(ours, naive, strict=True)), key=lambda w: w[1]
    )
    best = {what: min(times) for what, times in runs.items()}
    # On a CPU shared with other jobs, wall time mostly measures their load (it changes from row
    # to row); the CPU seconds this process spent do not grow while it waits for a core.
    counted = cpu if device.type == "cpu" else best
    ratio = counted["effects"] / counted["naive"]
    print_machine(info, busy)
    for what, times in runs.items():
        print(f"  {what:<8} wall " + " ".join(f"{t:.2f}" for t in times))
    what = "process CPU time, all repeats" if device.type == "cpu" else "wall time, best run"
    print(
        f"{'PASS' if ratio <= TARGET else 'FAIL'}  effects/naive {ratio:.3f}, "
        f"target <= {TARGET:.2f} ({what}: effects {counted['effects']:.2f} s, naive "
        f"{counted['naive']:.2f} s; {len(rows)} rows, {tokens} tokens, "
        f"{len(effects.ablations)} ablations)"
    )
    print(
        f"info  wall time, best run: effects/naive {best['effects'] / best['naive']:.3f} "
        f"(effects {best['effects']:.2f} s, naive {best['naive']:.2f} s)"
    )
    print(
        f"info  largest difference effects vs naive: {worst[0]} {worst[1]:.2e} of its largest value"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
