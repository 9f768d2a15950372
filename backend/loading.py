"""Base model, tokenizer and PEFT adapter, loaded through the ordinary transformers/peft path."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from backend import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(name: str | None, device_type: str) -> torch.dtype:
    """bfloat16 on a GPU, float32 on the CPU, unless asked otherwise."""
    if name is None:
        return torch.float32 if device_type == "cpu" else torch.bfloat16
    return DTYPES[name]


def check_adapter(lora_path: str) -> None:
    """Refuse, before any model is loaded, a local adapter that is not plain LoRA."""
    path = Path(lora_path)
    if not path.exists():
        if path.is_absolute() or lora_path.startswith(".") or lora_path.count("/") != 1:
            raise UserError(f"adapter not found: {lora_path}")
        return  # looks like a hub id: peft checks it when it downloads
    config_file = path / "adapter_config.json"
    if not config_file.is_file():
        raise UserError(f"{lora_path} is not a PEFT adapter directory (no adapter_config.json)")
    config = json.loads(config_file.read_text(encoding="utf-8"))
    if config.get("peft_type") != "LORA":
        raise UserError(
            f"{lora_path}: peft_type {config.get('peft_type')!r}; only LORA is supported"
        )
    if config.get("use_dora"):
        raise UserError(f"{lora_path}: DoRA adapters are not supported, only plain LoRA")


def base_model_dir(base_model: str) -> str:
    """A directory or hub id from_pretrained can read; a .gguf file is converted once and cached."""
    if base_model.endswith(".gguf"):
        from backend.embedded import gguf_to_hf_dir

        return str(gguf_to_hf_dir(Path(base_model)))
    return base_model


def load_model(
    base_model: str,
    lora_path: str,
    dtype: torch.dtype,
    device: torch.device | str,
    device_map: str | None,
) -> tuple[nn.Module, Any]:
    """(PEFT model in eval mode, tokenizer). With device_map, accelerate places the layers."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_adapter(lora_path)
    source = base_model_dir(base_model)
    tokenizer = AutoTokenizer.from_pretrained(source)
    placement = {"device_map": device_map} if device_map else {}
    base = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **placement)
    if not device_map:
        base.to(device)
    model = PeftModel.from_pretrained(base, lora_path)
    return model.eval(), tokenizer


def input_device(model: nn.Module) -> torch.device:
    """Where input ids go: the device of the input embeddings (the first one under a device map)."""
    return model.get_input_embeddings().weight.device
