"""A PEFT adapter checked before any model is loaded: that it is plain LoRA, and that its weight
shapes fit the base model's (both read from safetensors headers, not from the weights).

Local directories and hub repositories already in the local cache are read; where the base
model's weights are not (a hub model not downloaded yet, .bin files), the fit is checked again
once it is loaded, and a hub adapter not downloaded yet is left to peft.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from backend import UserError

CONFIG = "adapter_config.json"
WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
SUPPORTED = "only plain LoRA adapters (peft_type LORA, without DoRA) are supported"
# PEFT's saved key of a LoRA matrix: base_model.model.<module>.lora_A.weight (or lora_B).
_LORA_KEY = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])\.weight$")

Shapes = dict[str, tuple[int, ...]]


def local_file(repo: str, filename: str) -> Path | None:
    """`filename` of a local directory, or of a hub repository already in the local cache."""
    if Path(repo).is_dir():
        path = Path(repo) / filename
        return path if path.is_file() else None
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(repo, filename)
    except ValueError:  # not a valid repository id either
        return None
    return Path(cached) if isinstance(cached, str) else None


def read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    except ValueError as e:  # invalid JSON or not UTF-8
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise UserError(f"{path}: expected a JSON object")
    return value


@dataclass
class LocalAdapter:
    """An adapter whose files are here: its config and the shapes of its LoRA matrices."""

    path: str
    config: dict
    lora: Shapes  # '<module>.lora_A' / '<module>.lora_B' -> shape

    def check_fit(self, base: Shapes, complete: bool) -> None:
        """Refuse matrices that do not fit the base weights (`base`: weight name -> shape).

        A module missing from `base` is an error when `complete` (every weight of the loaded
        model), or when some other module was found: if none is, the files may name the
        weights otherwise than the loaded model does, and the check waits for it.
        """
        modules = sorted({name.rsplit(".", 1)[0] for name in self.lora})
        missing = [m for m in modules if f"{m}.weight" not in base]
        if missing and (complete or len(missing) < len(modules)):
            raise UserError(
                f"{self.path} does not fit the base model: it adapts {missing[0]}, which the "
                "base model does not have (an adapter of another architecture or size?)"
            )
        for module in modules:
            weight = base.get(f"{module}.weight")
            a, b = self.lora.get(f"{module}.lora_A"), self.lora.get(f"{module}.lora_B")
            if weight is None or len(weight) != 2:
                continue  # not a linear layer: find_lora_modules refuses it with its own reason
            # Weights are [out, in] ([in, out] for Conv1D); lora_A is [r, in], lora_B [out, r].
            out, inp = weight[::-1] if self.config.get("fan_in_fan_out") else weight
            if a is None or b is None or (a[1], b[0], a[0]) != (inp, out, b[1]):
                raise UserError(
                    f"{self.path} does not fit the base model: {module} is {out}x{inp} "
                    f"(out x in) there, but the adapter has lora_A {_shape(a)} and lora_B "
                    f"{_shape(b)}"
                )


def read_adapter(lora_path: str) -> LocalAdapter | None:
    """The adapter at `lora_path` if it is local (or cached), refused unless it is plain LoRA;
    None for a hub id not in the cache (peft checks it when it downloads it)."""
    path = Path(lora_path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{lora_path} is a file; --lora-path takes a PEFT adapter directory")
    hub_id = lora_path.count("/") == 1 and not lora_path.startswith((".", "/"))
    if not path.exists() and not hub_id:
        raise UserError(f"adapter not found: {lora_path}")
    config_file = local_file(lora_path, CONFIG)
    if config_file is None and path.is_dir():
        if (path / "config.json").is_file():
            raise UserError(
                f"{lora_path} is a full model (a merged adapter?), not a PEFT adapter; {SUPPORTED}"
            )
        raise UserError(f"{lora_path} is not a PEFT adapter directory (no {CONFIG})")
    if config_file is None:
        return None
    config = read_json(config_file)
    if config.get("peft_type") != "LORA":
        raise UserError(f"{lora_path} is a {config.get('peft_type')} adapter; {SUPPORTED}")
    if config.get("use_dora"):
        raise UserError(f"{lora_path} is a DoRA adapter; {SUPPORTED}")
    return LocalAdapter(lora_path, config, lora_shapes(lora_path))


def safetensors_shapes(path: Path) -> Shapes:
    """Tensor name -> shape, from the file's JSON header (the data is not read)."""
    try:
        with path.open("rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        return {name: tuple(t["shape"]) for name, t in header.items() if name != "__metadata__"}
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    except (struct.error, ValueError, MemoryError, OverflowError, AttributeError, LookupError,
            TypeError):  # fmt: skip
        raise UserError(f"{path} is not a safetensors file") from None


def lora_shapes(lora_path: str) -> Shapes:
    """The adapter's LoRA matrices: '<module>.lora_A' / '<module>.lora_B' -> shape."""
    weights = {name: local_file(lora_path, name) for name in WEIGHTS}
    if weights["adapter_model.safetensors"] is not None:
        shapes = safetensors_shapes(weights["adapter_model.safetensors"])
    elif weights["adapter_model.bin"] is not None:
        try:
            state = torch.load(weights["adapter_model.bin"], map_location="cpu", weights_only=True)
            shapes = {name: tuple(t.shape) for name, t in state.items()}
        except Exception as e:  # pickle, zip and torch errors alike: not a weights file
            what = f"not a weights file ({type(e).__name__})"
            raise UserError(f"{lora_path}: adapter_model.bin is {what}") from None
    else:
        raise UserError(f"{lora_path} has no adapter weights ({' or '.join(WEIGHTS)})")
    lora = {}
    for name, shape in shapes.items():
        match = _LORA_KEY.match(name)
        if match:
            lora[f"{match.group(1)}.lora_{match.group(2)}"] = shape
    if not lora:
        raise UserError(f"{lora_path}: no LoRA matrices in the adapter weights; {SUPPORTED}")
    return lora


def base_shapes(base_path: str) -> Shapes:
    """The base model's weight shapes from its safetensors headers; {} when they are not local."""
    index = local_file(base_path, "model.safetensors.index.json")
    if index is not None:
        files = sorted(set(read_json(index).get("weight_map", {}).values()))
    else:
        files = ["model.safetensors"]
    shapes: Shapes = {}
    for name in files:
        path = local_file(base_path, name)
        if path is None:
            return {}
        shapes.update(safetensors_shapes(path))
    return shapes


def _shape(shape: tuple[int, ...] | None) -> str:
    return "missing" if shape is None else "x".join(map(str, shape))
