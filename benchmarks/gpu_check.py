"""The study's scale on one GPU (issue 15): a Qwen-2.5-32B-shaped model, built in GPU memory with
random bfloat16 weights, and a rank-1 LoRA on all seven projections of every layer (448
directions, random non-zero B, rsLoRA scaling), through every analysis.

    python3 benchmarks/gpu_check.py [--out DIR] [--tiny] [--effects-rows N] ...

Run from the repository root, with no install: the script imports `backend` from the tree. It
needs torch, transformers, peft, jinja2 and tqdm, not `datasets` or `gguf`, and no network:
nothing is downloaded or saved but its results (the 65.5 GB of weights fit no disk there).
Stages, in order, each timed with its peak GPU memory, each record appended to
DIR/gpu_check.jsonl (JSON lines, flushed) as soon as it is measured, so that a run stopped by a
timeout still returns every figure before the stop; a stage that fails records its error and the
run goes on with the stages that do not need it (exit status 1):
- build: the model on the device directly (no CPU init), random weights, the adapter;
- warmup: the pass and the floor on one sequence (kernel choice, allocator), not counted;
- floor: bench_pipeline's floor, the adapted model's forward up to the last adapted layer over
  the pass's batches, no hooks; timed before and after the pass, the faster one counts;
- pass: backend.pipeline.analyze, dtype and batch budget the model's defaults, on 64k+ random
  tokens in 4k-8k-token sequences (tokenization excluded: the rows carry their ids);
- export: the document built and written as the CLI writes it;
- profile: one batch of the pass under torch.profiler: the device's host-device copies, and the
  calls that copy or make the host wait (cudaMemcpy*, *Synchronize, item, nonzero), in all,
  inside the forward (the hooks run there: per layer) and inside the tracker's update (once a
  batch); DIR/profile.txt holds the profile's table;
- effects: analyze with --effects N --effects-max-length L, each row's Effects.row timed;
- naive: bench_effects' naive method on the first effects row, its fixed part (attribution
  forward and backward, base forward) and about 32 of its ablations timed, the rest extrapolated
  (every naive ablation is one full forward of the same cost);
- sae: analyze with --sae (the cache written in the pass, the SAE trained and measured after
  it), its time over the pass's;
- dashboard: the written document read and rendered as generate_html_dashboard does
  (DIR/dashboard.html), page size;
- summary: tokens/s, pipeline/floor, each analysis's share, the issue's targets.

On the GPU machine (the device tool runs in the repository root; $OUT comes back):

    PYTHONUNBUFFERED=1 timeout -k 20 400 python3 benchmarks/gpu_check.py --out "$OUT"

`--tiny` runs a tiny Qwen2 on the CPU through the same code (tests/test_gpu_check.py).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

if not __package__:  # run as a script: import `backend` from the repo root
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import torch
from torch import nn

import backend.analysis
from backend.analysis import Interrupted
from backend.config import RunConfig
from backend.data import Sequence, iter_batches
from backend.directions import LoraModule, find_lora_modules
from backend.effects import Ablation, Effects
from backend.loading import quiet_libraries
from backend.output import build_document, write_json_atomic
from backend.pipeline import analyze
from benchmarks.bench_effects import naive_ablation, naive_row, plain_log_probs, timed
from benchmarks.bench_pipeline import (
    NumberedTokens,
    Workload,
    bench_config,
    run_floor,
    sync,
    token_rows,
)

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RESULTS = "gpu_check.jsonl"
GIB = 2**30
# Issue 15's targets on the H200.
TARGETS = {"pipeline_over_floor": 1.05, "effects_over_naive": 0.7, "sae_overhead": 0.10}


@dataclass(frozen=True)
class Preset:
    """A model shape and the workload run on it."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tokens: int  # at least this many tokens in the pass ...
    lengths: tuple[int, int]  # ... in sequences of these lengths
    effects_max_length: int
    device: str
    dtype: str


PRESETS = {
    "qwen2.5-32b": Preset(64, 5120, 27648, 40, 8, 152064, 65536, (4096, 8192), 2048, "cuda",
                          "bfloat16"),
    "tiny": Preset(2, 64, 128, 4, 2, 512, 512, (48, 128), 32, "cpu", "float32"),
}  # fmt: skip


class Results:
    """The run's records, one JSON line each, on disk as soon as they are added."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = path.open("w", encoding="utf-8")
        self.records: dict[str, dict[str, Any]] = {}  # stage -> its last record

    def add(self, stage: str, **figures: Any) -> dict[str, Any]:
        record = {"stage": stage, **figures}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())
        print(json.dumps(record), flush=True)
        self.records[stage] = record
        return record

    def get(self, stage: str, key: str) -> Any:
        """A figure of an earlier stage, None if that stage did not record it."""
        return self.records.get(stage, {}).get(key)


# ---------------------------------------------------------------- model and data


def build_model(preset: Preset, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The base model with random weights, made where it runs (a 32B CPU init would take many
    minutes and 65 GB of RAM), and the adapter on it (peft makes its few weights on the CPU and
    moves them to their layer's device, as when it loads an adapter)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=preset.vocab,
        hidden_size=preset.hidden,
        intermediate_size=preset.intermediate,
        num_hidden_layers=preset.layers,
        num_attention_heads=preset.heads,
        num_key_value_heads=preset.kv_heads,
        max_position_embeddings=32768,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with device:
        base = Qwen2ForCausalLM._from_config(config, dtype=dtype)
    return rank1_adapter(base.eval(), seed=1)


def rank1_adapter(model: nn.Module, seed: int) -> nn.Module:
    """A rank-1 LoRA on all seven projections of every layer, rsLoRA scaling, A and B random."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(
        r=1, lora_alpha=1, target_modules=PROJECTIONS, init_lora_weights=False, use_rslora=True
    )
    return get_peft_model(model, config).eval()


def random_sequences(preset: Preset, seed: int = 0) -> list[Sequence]:
    """Random token ids: sequences of random lengths in preset.lengths, preset.tokens or more."""
    gen = torch.Generator().manual_seed(seed)
    sequences: list[Sequence] = []
    total = 0
    while total < preset.tokens:
        lo, hi = preset.lengths
        length = int(torch.randint(lo, hi + 1, (1,), generator=gen))
        ids = torch.randint(0, preset.vocab, (length,), generator=gen).tolist()
        sequences.append(Sequence(len(sequences), ids, False))
        total += length
    return sequences


# ---------------------------------------------------------------- measuring


def peak_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / GIB


def fresh_peak(device: torch.device) -> None:
    """Drop what earlier stages left, so that each stage's peak is its own."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def rss_gib() -> float:
    """The process's peak resident memory so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB


def seconds_of(run: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """(wall seconds, result) of run(), the device synced before and after."""
    sync(device)
    start = time.perf_counter()
    result = run()
    sync(device)
    return time.perf_counter() - start, result


@contextmanager
def timed_effect_rows(device: torch.device) -> Iterator[list[float]]:
    """Inside the block, every Effects.row that the pipeline runs appends its seconds."""
    original = backend.analysis.Effects
    seconds: list[float] = []

    class TimedEffects(original):  # type: ignore[misc, valid-type]
        def row(self, input_ids: torch.Tensor):
            took, found = seconds_of(lambda: super(TimedEffects, self).row(input_ids), device)
            seconds.append(took)
            return found

    backend.analysis.Effects = TimedEffects
    try:
        yield seconds
    finally:
        backend.analysis.Effects = original


# ---------------------------------------------------------------- the stages


@dataclass
class Check:
    """What the stages share."""

    preset: Preset
    device: torch.device
    dtype: torch.dtype
    out: Path
    scratch: Path  # written documents: not returned
    results: Results
    args: argparse.Namespace
    model: nn.Module | None = None
    sequences: list[Sequence] | None = None
    config: RunConfig | None = None
    state: Any = None  # the latest run's state, for the export
    document: Path | None = None  # the latest document written, for the dashboard

    @property
    def workload(self) -> Workload:
        """What bench_pipeline's floor takes: the model, its device and the sequences."""
        rows = list(token_rows(self.sequences))
        tokens = NumberedTokens()
        return Workload("gpu-check", self.model, tokens, self.device, "", self.config,
                        self.sequences, rows)  # fmt: skip

    @property
    def tokens(self) -> int:
        return sum(len(s.input_ids) for s in self.sequences)

    def run(self, config: RunConfig, rows: list | None = None) -> tuple[float, Any]:
        """(seconds, state) of the pipeline on the check's rows (or `rows`)."""
        rows = rows if rows is not None else self.workload.rows
        return seconds_of(lambda: analyze(self.model, NumberedTokens(), rows, config), self.device)


def stage_build(c: Check) -> dict[str, Any]:
    took, c.model = seconds_of(lambda: build_model(c.preset, c.device, c.dtype), c.device)
    c.sequences = random_sequences(c.preset)
    p = c.preset
    note = f"random Qwen2, {p.layers} layers, hidden {p.hidden}, vocab {p.vocab}, {p.dtype}"
    c.config = replace(bench_config(note, None), output=c.scratch / "activations.json")
    modules = find_lora_modules(c.model)
    lora = [c.model.get_submodule(m.name) for m in modules]
    weights = sum(p.numel() * p.element_size() for p in c.model.parameters())
    ids = [s.input_ids for s in c.sequences]
    return {
        "seconds": took,
        "directions": sum(m.rank for m in modules),
        "lora_modules": len(modules),
        "lora_b_nonzero": all(bool(module.lora_B["default"].weight.any()) for module in lora),
        "rslora": bool(c.model.peft_config["default"].use_rslora),
        "scaling": float(lora[0].scaling["default"]),
        "weights_gib": weights / GIB,
        "param_device": str(next(c.model.parameters()).device),
        "param_dtype": str(c.model.get_input_embeddings().weight.dtype),
        "attention": c.model.config._attn_implementation,
        "sequences": len(c.sequences),
        "tokens": c.tokens,
        "lengths": [min(map(len, ids)), max(map(len, ids))],
    }


def stage_warmup(c: Check) -> dict[str, Any]:
    one = c.sequences[:1]
    pass_s, _ = c.run(c.config, list(token_rows(one)))
    floor_s = run_floor(c.workload, budget(c), one)
    return {"pass_seconds": pass_s, "floor_seconds": floor_s, "tokens": len(one[0].input_ids)}


def budget(c: Check) -> int:
    return c.config.resolved(c.model).max_batch_tokens


def stage_floor(c: Check) -> dict[str, Any]:
    seconds = run_floor(c.workload, budget(c))
    batches = sum(1 for _ in iter_batches(c.sequences, budget(c), RunConfig.sort_window))
    return {
        "seconds": seconds,
        "tokens": c.tokens,
        "tokens_per_s": c.tokens / seconds,
        "batches": batches,
        "max_batch_tokens": budget(c),
    }


def stage_pass(c: Check) -> dict[str, Any]:
    seconds, state = c.run(c.config)
    c.state = state
    return {
        "seconds": seconds,
        "tokens": state.counters["num_tokens"],
        "tokens_per_s": state.counters["num_tokens"] / seconds,
        "examples": state.counters["num_examples"],
        "nonfinite": int(state.tracker.moments.nonfinite.sum()),  # random weights, bf16: 0?
        "dtype": state.run["dtype"],
        "max_batch_tokens": state.run["max_batch_tokens"],
    }


def stage_export(c: Check, name: str = "activations.json") -> dict[str, Any]:
    path = c.scratch / name
    build_s, document = seconds_of(lambda: build_document(c.state), c.device)
    write_s, _ = seconds_of(lambda: write_json_atomic(document, path), c.device)
    c.document = path
    return {
        "seconds": build_s + write_s,
        "build_seconds": build_s,
        "write_seconds": write_s,
        "bytes": path.stat().st_size,
    }


# Profiler events that mean a copy between host and device (the device's own, and the host's
# call that starts one), or the host waiting for the device (a sync, or an op that needs one).
COPIES = ("Memcpy HtoD", "Memcpy DtoH")
CALLS = ("cudaMemcpy", "Synchronize", "aten::_local_scalar_dense", "aten::nonzero")
FORWARD, TRACKER = "gpu_check: forward with hooks", "gpu_check: tracker update"


def labelled(name: str, run: Callable) -> Callable:
    """run(), as a region of the profile named `name`."""
    from torch.profiler import record_function

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with record_function(name):
            return run(*args, **kwargs)

    return wrapped


def stage_profile(c: Check) -> dict[str, Any]:
    """One batch of the pass, profiled: the copies and host waits per batch, and of them those
    inside the forward (the hooks: per layer) and those of the tracker (once a batch)."""
    from torch.profiler import ProfilerActivity, profile

    analysis = backend.analysis.Analysis(c.model, c.config.resolved(c.model))
    analysis.capture.run = labelled(FORWARD, analysis.capture.run)
    tracker = analysis.state.tracker
    tracker.update = labelled(TRACKER, tracker.update)
    batch, group, position = next(iter_batches(c.sequences, budget(c), RunConfig.sort_window))
    activities = [ProfilerActivity.CPU]
    if c.device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with analysis.capture.hooks(), profile(activities=activities) as prof:
        analysis.process(batch, group, position)
        sync(c.device)
    events = prof.events()
    regions = {
        name: [e.time_range for e in events if e.name == name] for name in (FORWARD, TRACKER)
    }
    calls = [e for e in events if any(p in e.name for p in CALLS)]

    def within(name: str) -> dict[str, int]:
        inside = [e for e in calls if any(r.start <= e.time_range.start <= r.end
                                          for r in regions[name])]  # fmt: skip
        return dict(Counter(e.name for e in inside))

    forward = within(FORWARD)
    write_profile(prof, c.out / "profile.txt", c.device)
    return {
        "batch_tokens": batch.num_tokens,
        "layers": c.preset.layers,
        "device_copies": {
            e.key: e.count for e in prof.key_averages() if any(p in e.key for p in COPIES)
        },
        "calls": dict(Counter(e.name for e in calls)),
        "calls_in_forward": forward,
        "calls_in_tracker": within(TRACKER),
        "calls_in_forward_per_layer": sum(forward.values()) / c.preset.layers,
    }


def write_profile(prof: Any, path: Path, device: torch.device) -> None:
    """The profile's table, by self time on the device (the CPU's, without one)."""
    sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    try:
        table = prof.key_averages().table(sort_by=sort, row_limit=50)
    except (AttributeError, KeyError, ValueError):  # an older torch names the column otherwise
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=50)
    path.write_text(table + "\n", encoding="utf-8")


def stage_effects(c: Check) -> dict[str, Any]:
    config = replace(
        c.config, effects=c.args.effects_rows, effects_max_length=c.args.effects_max_length
    )
    with timed_effect_rows(c.device) as rows:
        seconds, c.state = c.run(config)
    pass_s = c.results.get("pass", "seconds")
    beyond = None if pass_s is None else seconds - pass_s  # what --effects adds to the run
    steady = rows[1:] or rows  # the first row also pays for the effects' first kernels
    mean = sum(steady) / len(steady)
    return {
        "seconds": seconds,
        "rows": len(rows),
        "row_tokens": c.args.effects_max_length,
        "row_seconds": rows,
        "row_steady_seconds": mean,
        "beyond_pass_seconds": beyond,
        "rows_16_estimated_seconds": None if beyond is None else beyond + (16 - len(rows)) * mean,
        "ablations": len(effects_plan(c)[1]),
    }


def effects_plan(c: Check) -> tuple[list[LoraModule], list[Ablation]]:
    """The adapter's modules and the ablations that the effects run, in their order."""
    modules = find_lora_modules(c.model)
    first, start = {}, 0
    for m in modules:
        first[m.name], start = start, start + m.rank
    return modules, Effects(c.model, modules, first, budget(c)).ablations


def stage_naive(c: Check) -> dict[str, Any]:
    modules, plan = effects_plan(c)
    ids = torch.tensor(c.sequences[0].input_ids[: c.args.effects_max_length], device=c.device)
    fixed, _ = timed(lambda: naive_row(c.model, modules, [], ids), c.device)
    c.model.zero_grad(set_to_none=True)  # the attribution's backward left the adapter's grads
    with torch.no_grad():
        log_p = plain_log_probs(c.model, ids)
    step = max(1, len(plan) // c.args.naive_ablations)
    sample = plan[::step][: c.args.naive_ablations]
    each = [timed(lambda a=a: naive_ablation(c.model, a, ids, log_p), c.device)[0] for a in sample]
    mean = sum(each) / len(each)
    row = fixed + len(plan) * mean
    effects_row = c.results.get("effects", "row_steady_seconds")
    return {
        "row_tokens": ids.numel(),
        "fixed_seconds": fixed,
        "ablations_timed": len(each),
        "ablation_seconds": each,
        "ablation_mean_seconds": mean,
        "ablations": len(plan),
        "row_estimated_seconds": row,
        "rows_16_estimated_seconds": 16 * row,
        "effects_over_naive": None if effects_row is None else effects_row / row,
    }


def stage_sae(c: Check) -> dict[str, Any]:
    seconds, c.state = c.run(replace(c.config, sae=True))
    pass_s = c.results.get("pass", "seconds")
    overhead = None if pass_s is None else seconds / pass_s - 1
    return {"seconds": seconds, "overhead_over_pass": overhead}


def stage_dashboard(c: Check) -> dict[str, Any]:
    from generate_html_dashboard import load_activations, render_dashboard

    def render() -> str:
        return render_dashboard(load_activations(c.document), "gpu check")

    seconds, html = seconds_of(render, c.device)
    page = c.out / "dashboard.html"
    page.write_bytes(html.encode("utf-8", errors="replace"))
    return {
        "seconds": seconds,
        "page_bytes": page.stat().st_size,
        "document": c.document.name,
        "document_bytes": c.document.stat().st_size,
    }


def summary(r: Results) -> dict[str, Any]:
    """The ratios the issue asks for, from the stages that recorded their figures."""
    floors = [s for s in (r.get("floor", "seconds"), r.get("floor_again", "seconds")) if s]
    floor = min(floors) if floors else None
    pass_s, sae_s = r.get("pass", "seconds"), r.get("sae", "seconds")
    parts = {
        "pass": pass_s,
        "export": r.get("export", "seconds"),
        "effects": r.get("effects", "beyond_pass_seconds"),
        "sae": None if None in (sae_s, pass_s) else sae_s - pass_s,
        "dashboard": r.get("dashboard", "seconds"),
    }
    known = {k: v for k, v in parts.items() if v is not None}
    total = sum(known.values())
    ratio = None if None in (floor, pass_s) else pass_s / floor
    found = {
        "pipeline_over_floor": ratio,
        "effects_over_naive": r.get("naive", "effects_over_naive"),
        "sae_overhead": r.get("sae", "overhead_over_pass"),
    }
    verdicts = {
        key: None if value is None else value <= TARGETS[key] for key, value in found.items()
    }
    return {
        **found,
        "targets": TARGETS,
        "met": verdicts,
        "pass_tokens_per_s": r.get("pass", "tokens_per_s"),
        "floor_tokens_per_s": None if floor is None else r.get("floor", "tokens") / floor,
        "shares": {k: v / total for k, v in known.items()} if total else {},
        "calls_in_forward_per_layer": r.get("profile", "calls_in_forward_per_layer"),
        "page_bytes": r.get("dashboard", "page_bytes"),
    }


# Each stage, and the stages whose results it needs.
STAGES: list[tuple[str, Callable[[Check], dict[str, Any]], tuple[str, ...]]] = [
    ("build", stage_build, ()),
    ("warmup", stage_warmup, ("build",)),
    ("floor", stage_floor, ("build",)),
    ("pass", stage_pass, ("build",)),
    ("floor_again", stage_floor, ("build",)),
    ("export", stage_export, ("pass",)),
    ("profile", stage_profile, ("build",)),
    ("effects", stage_effects, ("build",)),
    ("export_effects", lambda c: stage_export(c, "activations-effects.json"), ("effects",)),
    ("naive", stage_naive, ("build",)),
    ("sae", stage_sae, ("build",)),
    ("dashboard", stage_dashboard, ("export",)),
]


def run_stages(c: Check) -> bool:
    """Every stage whose prerequisites succeeded; True if all of them succeeded."""
    done: set[str] = set()
    for name, run, needs in STAGES:
        missing = [n for n in needs if n not in done]
        if missing:
            c.results.add(name, skipped=f"{', '.join(missing)} failed")
            continue
        fresh_peak(c.device)
        try:
            figures = run(c)
        except Interrupted as e:  # SIGTERM (a timeout) inside the pipeline: stop there
            c.results.add(name, error=str(e))
            break
        except Exception as e:  # recorded; the stages that do not need this one still run
            traceback.print_exc()
            c.results.add(name, error=f"{type(e).__name__}: {str(e).strip()[:500]}")
            continue
        c.results.add(name, **figures, peak_gpu_gib=peak_gib(c.device), peak_rss_gib=rss_gib())
        done.add(name)
    c.results.add("summary", **summary(c.results))
    return len(done) == len(STAGES)


def machine(device: torch.device) -> dict[str, Any]:
    import peft
    import transformers

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {
        "device": gpu or "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="a tiny Qwen2 on the CPU, in seconds")
    p.add_argument("--layers", type=int, help="override the preset's layer count")
    p.add_argument("--device", help="torch device (default: the preset's, cuda or cpu)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="default: the preset's")
    p.add_argument("--tokens", type=int, help="pass tokens, at least (default: the preset's)")
    p.add_argument("--effects-rows", type=int, default=2, help="--effects N (default 2)")
    p.add_argument("--effects-max-length", type=int, help="default: 2048; --tiny 32")
    p.add_argument("--naive-ablations", type=int, default=32, help="naive ablations timed")
    default_out = os.environ.get("OUT")
    p.add_argument(
        "--out",
        type=Path,
        default=default_out,
        required=default_out is None,
        help="folder for the results and the page (default: $OUT)",
    )
    args = p.parse_args(argv)
    least = {"layers": 1, "tokens": 1, "effects_rows": 1, "effects_max_length": 2,
             "naive_ablations": 1}  # fmt: skip
    for name, lowest in least.items():
        value = getattr(args, name)
        if value is not None and value < lowest:
            p.error(f"--{name.replace('_', '-')} must be at least {lowest}, got {value}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    preset = PRESETS["tiny" if args.tiny else "qwen2.5-32b"]
    chosen = {
        "layers": args.layers,
        "tokens": args.tokens,
        "device": args.device,
        "dtype": args.dtype,
    }
    preset = replace(preset, **{k: v for k, v in chosen.items() if v is not None})
    args.effects_max_length = args.effects_max_length or preset.effects_max_length
    device = torch.device(preset.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device here: run with --tiny (or --device cpu)", file=sys.stderr)
        return 2
    quiet_libraries(downloads=False)
    results = Results(args.out / RESULTS)
    results.add(
        "machine",
        **machine(device),
        preset=preset.__dict__,
        args=vars(args) | {"out": str(args.out)},
    )
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as scratch:
        dtype = getattr(torch, preset.dtype)
        check = Check(preset, device, dtype, args.out, Path(scratch), results, args)
        ok = run_stages(check)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
