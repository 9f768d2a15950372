"""Training a rank-1 LoRA end to end on a tiny random Llama, offline, in seconds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from backend.data import s1k_messages
from backend.train_rank1_lora import IGNORE_INDEX, main, tokenize_example


def trace(n: int) -> dict[str, str]:
    return {
        "question": f"What is {n} times 8?",
        "deepseek_thinking_trajectory": f"{n} times 8 is {8 * n + 2}. Wait, that's not right. "
        f"{n} times 8 is {8 * n}. Let me double check: {8 * n} / 8 = {n}.",
        "deepseek_attempt": f"**Final answer:** \\boxed{{{8 * n}}}",
    }


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("traces")
    for name, numbers in (("train", range(2, 8)), ("heldout", range(11, 13))):
        rows = "".join(json.dumps(trace(n)) + "\n" for n in numbers)
        (folder / f"{name}.jsonl").write_text(rows)
    return folder


def train(base: Path, data: Path, output: Path, seed: int = 0) -> Path:
    argv = ["--base-model", str(base), "--train-file", str(data / "train.jsonl")]
    argv += ["--eval-file", str(data / "heldout.jsonl"), "--output", str(output)]
    argv += ["--steps", "3", "--batch-size", "2", "--lr", "1e-2", "--seed", str(seed)]
    assert main(argv) == 0
    return output


@pytest.fixture(scope="module")
def adapter(llama_base, data, tmp_path_factory) -> Path:
    return train(llama_base, data, tmp_path_factory.mktemp("run") / "adapter")


def test_loss_covers_only_the_assistant_turn(llama_base):
    tokenizer = AutoTokenizer.from_pretrained(llama_base)
    messages = s1k_messages(trace(7))
    prompt = tokenizer.apply_chat_template(messages[:1], add_generation_prompt=True, tokenize=False)
    n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])

    example = tokenize_example(messages, tokenizer, max_length=1024)
    assert example.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert example.labels[n_prompt:] == example.input_ids[n_prompt:]
    supervised = tokenizer.decode(example.input_ids[n_prompt:])
    assert supervised.startswith("<think>\n7 times 8 is 58.") and "boxed{56}" in supervised

    cut = tokenize_example(messages, tokenizer, max_length=n_prompt + 3)
    assert len(cut.input_ids) == len(cut.labels) == n_prompt + 3


def test_saves_a_loadable_rank1_adapter_on_every_mlp(adapter, llama_base):
    assert {p.name for p in adapter.iterdir()} == {
        "adapter_config.json",
        "adapter_model.safetensors",
        "README.md",
    }
    assert "Held-out loss per assistant token" in (adapter / "README.md").read_text()
    base = AutoModelForCausalLM.from_pretrained(llama_base)
    model = PeftModel.from_pretrained(base, adapter)
    adapted = {
        name[name.index("layers.") :]: module
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer)
    }
    layers = base.config.num_hidden_layers
    mlp = ("gate_proj", "up_proj", "down_proj")
    assert set(adapted) == {f"layers.{i}.mlp.{m}" for i in range(layers) for m in mlp}
    for module in adapted.values():
        assert module.r["default"] == 1
        assert module.lora_A["default"].weight.shape[0] == 1
    assert any(m.lora_B["default"].weight.abs().sum() > 0 for m in adapted.values())  # trained


def test_same_seed_gives_identical_weights(adapter, llama_base, data, tmp_path):
    weights = load_file(adapter / "adapter_model.safetensors")
    again = load_file(train(llama_base, data, tmp_path / "again") / "adapter_model.safetensors")
    other = load_file(
        train(llama_base, data, tmp_path / "other", seed=1) / "adapter_model.safetensors"
    )
    assert weights.keys() == again.keys() == other.keys()
    assert all(torch.equal(weights[k], again[k]) for k in weights)
    assert not all(torch.equal(weights[k], other[k]) for k in weights)


def test_bad_input_is_one_line_on_stderr(llama_base, tmp_path, capsys):
    missing, output = str(tmp_path / "none.jsonl"), str(tmp_path / "out")
    code = main(["--base-model", str(llama_base), "--train-file", missing, "--output", output])
    assert code != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: data file not found") and "\n" not in err
