"""--sae in a run: the pass caches the adapter state, and the process that holds the whole run
trains (or loads) the SAE on that cache, measures it and reads its features.

- Each slot of the pass (a process, a `--shard`, both) writes its own cache files in the run's
  cache folder (`RunConfig.sae_cache`), named by the run and the slot, so that reruns of other
  runs there cannot mix with them. Its writer's position goes into every checkpoint
  (`RunState.cache`), and `--resume` cuts the files back to it.
- Once the pass is done on every slot (after the processes' gather, or in `merge` after the
  shards), `read_sae` trains on the union of the slots' files in the cache's seeded key order
  (backend.adapter_cache), which does not depend on the split, so neither does the SAE; it
  saves it as <output>.sae.safetensors, measures it over the cache, and then removes the cache
  unless --keep-cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from backend.adapter_cache import CacheReader, CacheWriter, check_disk, remove_cache
from backend.config import RunConfig
from backend.directions import find_lora_modules, readout
from backend.loading import input_device
from backend.sae import SAE, Training, check_options, evaluate, input_scale, load_sae, train_sae
from backend.sae_features import Writes, residual_writes, sweep_features
from backend.state import RunState


def run_id(run: dict[str, Any]) -> str:
    """The run's identity as one string: the caches of one run carry it, the reader checks it."""
    return json.dumps(run, sort_keys=True, default=str)


def writer_name(run: dict[str, Any], slot: tuple[int, int]) -> str:
    digest = hashlib.sha256(run_id(run).encode()).hexdigest()[:12]
    return f"{digest}-slot{slot[0]}of{slot[1]}"


def direction_labels(layers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """{layer, module, component} of every LoRA direction, in tracker (and cache) order."""
    found = {
        d["index"]: {"layer": layer["layer"], "module": module, "component": d["component"]}
        for layer in layers
        for module, projection in layer["projections"].items()
        for d in projection["directions"]
    }
    return [found[i] for i in range(len(found))]


def check_sae_options(config: RunConfig, num_directions: int, tokens: int | None) -> None:
    """Before the pass: options no SAE has, a saved SAE of another adapter, and a disk without
    room for the cache (`tokens`: the run's tokens as estimated, None if unknown) refused in
    one line each."""
    if config.sae_from is not None:
        load_sae(Path(config.sae_from), num_directions)
    else:
        check_options(num_directions, config.sae_latents, config.sae_k)
    if tokens is not None:
        check_disk(config.sae_cache, tokens, num_directions, config.cache_dtype)


def open_writer(config: RunConfig, state: RunState, num_directions: int) -> None:
    """This slot's cache writer, on `state.writer`: afresh, or where the checkpoint `state`
    left it (its files cut back to what that checkpoint had written)."""
    name = writer_name(state.run, state.slot)
    saved = None if state.cache is None else state.cache["writers"].get(name)
    state.writer = CacheWriter(
        config.sae_cache, name, num_directions, config.sae_seed, config.cache_dtype,
        run=run_id(state.run), state=saved,
    )  # fmt: skip
    state.cache = {"folder": str(config.sae_cache), "writers": {name: state.writer.state_dict()}}


def close_writer(state: RunState) -> None:
    """The pass is done: this slot's files are finished (a reader may take them)."""
    writer, state.writer = state.writer, None
    state.cache["writers"][writer.name] = writer.state_dict()
    writer.finish()


class Decoded(dict):
    """Token id -> string: the run's table, decoding (and keeping) an id it lacks."""

    def __init__(self, table: dict[int, str], decode: Callable[[int], str]) -> None:
        super().__init__(table)
        self.decode = decode

    def __missing__(self, token: int) -> str:
        self[token] = text = self.decode(token)
        return text


def read_sae(
    state: RunState,
    model: nn.Module,
    decode: Callable[[int], str],
    config: RunConfig,
    progress: bool,
) -> None:
    """On the state of the whole run: train the SAE (or load --sae-from), save it beside
    config.output, measure it, and read its features (backend.sae_features), into `state.sae`
    (the document's `sae`); then remove the cache unless --keep-cache. A state that has its
    SAE already (a resumed run) is left as it is."""
    if state.sae is not None:
        return
    device = input_device(model)
    folder, names = Path(state.cache["folder"]), sorted(state.cache["writers"])
    reader = CacheReader(folder, names, run=run_id(state.run))
    labels = direction_labels(state.layers)
    if config.sae_from is not None:
        sae, path = load_sae(Path(config.sae_from), len(labels)), Path(config.sae_from)
    else:
        sae, path = train(reader, state, config, labels, device, progress), None
    quality = evaluate(sae, reader, device)
    sae.figures |= quality.figures()
    if path is None:
        path = config.output.with_name(config.output.name + ".sae.safetensors")
        sae.save(path)
    shape = state.tracker.shape
    found = sweep_features(
        sae, reader, Decoded(state.tokens, decode), shape.vocab_size, shape.top_k,
        shape.window, shape.bins, config.min_token_count, writes(model, labels, config),
        device=device, below_median=shape.below_median,
    )  # fmt: skip
    state.sae = section(sae, path) | {"features": found.features, "dead": found.dead}
    if not config.keep_cache:
        remove_cache(folder, names)
        with contextlib.suppress(OSError):  # the folder too, unless something else is in it
            folder.rmdir()


def train(
    reader: CacheReader,
    state: RunState,
    config: RunConfig,
    labels: list[dict[str, Any]],
    device: torch.device,
    progress: bool,
) -> SAE:
    """One seeded epoch over the cache, the input scaled by each direction's exact RMS."""
    d, moments = len(labels), state.tracker.moments
    mean, scale = input_scale(moments.count[:d], moments.mean[:d], moments.m2[:d])
    recipe = Training(
        latents=config.sae_latents, k=config.sae_k, lr=config.sae_lr, batch=config.sae_batch,
        seed=config.sae_seed,
    )  # fmt: skip
    with tqdm(desc="SAE training", unit="tok", disable=not progress) as bar:
        return train_sae(reader, mean, scale, labels, recipe, device, progress=bar.update)


def writes(model: nn.Module, labels: list[dict[str, Any]], config: RunConfig) -> Writes | None:
    """What the features' residual writes and their logit effects are made of (None where no
    direction writes the residual stream, or the model has no final norm to read them by)."""
    found, read = residual_writes(find_lora_modules(model), labels), readout(model)
    if found is None or read is None:
        return None
    return Writes(*found, *read, config.logit_tokens)


def section(sae: SAE, path: Path) -> dict[str, Any]:
    """The document's `sae`, the features aside."""
    figures = sae.figures
    # The file's figures by the document's names (a loaded SAE's are those of its training).
    training = {
        "steps": "steps", "warmup_steps": "warmup_steps", "batch_size": "batch",
        "learning_rate": "lr", "seed": "seed", "seconds": "training_seconds",
    }  # fmt: skip
    return {
        "num_latents": sae.num_latents,
        "k": figures["k"],
        "threshold": float(sae.threshold),
        **{key: figures[key] for key in ("fvu", "fvu_heldout", "l0", "dead_fraction")},
        "num_tokens": figures["num_tokens"],
        "path": path.name,
        "error_share": figures["error_share"],
        "training": {name: figures[key] for name, key in training.items()},
    }
