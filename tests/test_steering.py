"""Pinned directions: clamped greedy generation against hook-free brute force, and the prompts."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from backend.data import tokenize_row
from backend.directions import LoraModule, find_lora_modules
from backend.steering import PROMPT_TOKENS, clamped_generate, pinned_generations, steering_prompt
from tests.tiny import random_texts, save_adapter

NEW = 16  # tokens per continuation: enough to diverge, few enough to stay fast


def load(base, adapter) -> PeftModel:
    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()


@pytest.fixture(scope="module")
def mlp_model(llama_base, tmp_path_factory) -> PeftModel:
    """Rank 1 on the MLP of a Llama (whose generation_config ends at token 2)."""
    return load(llama_base, save_adapter(llama_base, tmp_path_factory.mktemp("steer") / "mlp"))


@pytest.fixture(scope="module")
def attention_model(qwen2_base, tmp_path_factory) -> PeftModel:
    """Rank 2 on q_proj (which has a bias in Qwen2), o_proj and up_proj of a Qwen2."""
    path = tmp_path_factory.mktemp("steer") / "attention"
    targets = ("q_proj", "o_proj", "up_proj")
    return load(qwen2_base, save_adapter(qwen2_base, path, rank=2, targets=targets, seed=3))


@pytest.fixture(scope="module")
def tokenizer(llama_base):
    return AutoTokenizer.from_pretrained(llama_base)


@pytest.fixture(scope="module")
def prompt(tokenizer) -> list[int]:
    return tokenizer("wait let me double check the answer so")["input_ids"]


def direction(model: PeftModel, layer: int, name: str) -> LoraModule:
    return next(m for m in find_lora_modules(model) if (m.layer, m.module) == (layer, name))


def greedy(model: torch.nn.Module, prompt: list[int], n: int, eos: list[int]) -> list[int]:
    """Greedy decoding by hand, no cache: the argmax of a full forward's last logits, a token a
    step, stopping after an EOS."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]), use_cache=False).logits[0, -1].argmax()))
            if ids[-1] in eos:
                break
    return ids[len(prompt) :]


def pinned_by_weights(model: PeftModel, m: LoraModule, component: int, value: float) -> PeftModel:
    """A copy whose weights do what the clamp does, with no hook: lora_A's row `component` zeroed
    (that direction writes nothing) and its pinned write scaling * B[:, c] * value added to the
    base layer's bias."""
    pinned = copy.deepcopy(model)
    layer = pinned.get_submodule(m.name)
    write = m.scaling * m.B[:, component] * value  # [out]
    with torch.no_grad():
        layer.lora_A["default"].weight[component] = 0.0
        base = layer.base_layer
        if base.bias is None:
            base.bias = torch.nn.Parameter(write.clone())
        else:
            base.bias += write
    return pinned


def test_as_is_is_plain_greedy_generation(mlp_model, attention_model, prompt):
    for model, (layer, name, component) in (
        (mlp_model, (1, "gate_proj", 0)),
        (attention_model, (1, "q_proj", 1)),
    ):
        eos = model.generation_config.eos_token_id  # the default: the model's own
        plain = model.generate(
            input_ids=torch.tensor([prompt]), do_sample=False, max_new_tokens=NEW
        )[0, len(prompt) :].tolist()
        ours = clamped_generate(model, direction(model, layer, name), component, None, prompt, NEW)
        assert ours == plain == greedy(model, prompt, NEW, [] if eos is None else [eos])


CASES = [  # (model, layer, module, component, value): MLP and attention, rank 1 and rank 2
    ("mlp_model", 1, "gate_proj", 0, -6.0),
    ("mlp_model", 2, "down_proj", 0, 8.0),
    ("attention_model", 1, "q_proj", 1, 15.0),
    ("attention_model", 0, "o_proj", 1, -7.0),
    ("attention_model", 2, "up_proj", 0, 6.0),
]


@pytest.mark.parametrize(("fixture", "layer", "name", "component", "value"), CASES)
def test_clamp_equals_a_model_with_the_write_in_its_weights(
    request, prompt, fixture, layer, name, component, value
):
    model = request.getfixturevalue(fixture)
    m = direction(model, layer, name)
    ours = clamped_generate(model, m, component, value, prompt, NEW, eos_token_id=None)
    assert ours == greedy(pinned_by_weights(model, m, component, value), prompt, NEW, [])
    as_is = clamped_generate(model, m, component, None, prompt, NEW, eos_token_id=None)
    assert ours != as_is  # the clamp changes what the model says: the comparison has teeth


def several_pins(model: PeftModel) -> list:
    """Pins of three modules of the rank-2 Qwen2 (two components of one of them, on different
    rows) and a row left as is."""
    o_proj = direction(model, 0, "o_proj")
    up_proj = direction(model, 2, "up_proj")
    q_proj = direction(model, 1, "q_proj")
    return [
        (o_proj, 1, -7.0), (up_proj, 0, 6.0), (q_proj, 1, 15.0), (o_proj, 0, 9.0),
        (up_proj, 1, None),
    ]  # fmt: skip


def count_generate_calls(model: PeftModel, monkeypatch) -> list[int]:
    """The batch size of each model.generate call from now on."""
    calls = []
    generate = model.generate

    def counted(**kwargs):
        calls.append(len(kwargs["input_ids"]))
        return generate(**kwargs)

    monkeypatch.setattr(model, "generate", counted)
    return calls


def test_pins_of_several_modules_in_one_batch_equal_one_by_one(
    attention_model, prompt, monkeypatch
):
    pins = several_pins(attention_model)
    calls = count_generate_calls(attention_model, monkeypatch)
    batched = pinned_generations(attention_model, pins, prompt, NEW, eos_token_id=None)
    assert calls == [len(pins)]  # every row in one generate call
    one_by_one = [clamped_generate(attention_model, *pin, prompt, NEW, None) for pin in pins]
    assert batched == one_by_one
    copies = [attention_model if v is None else pinned_by_weights(attention_model, m, c, v)
              for m, c, v in pins]  # fmt: skip
    brute = [greedy(model, prompt, NEW, []) for model in copies]
    assert batched == brute
    assert len({tuple(row) for row in batched}) == len(pins)  # every pin says something else
    calls.clear()
    split = pinned_generations(attention_model, pins, prompt, NEW, None, max_rows=2)
    assert split == batched and calls == [2, 2, 1]


def test_rows_that_end_at_eos_at_different_steps(attention_model, prompt):
    pins = several_pins(attention_model)
    free = pinned_generations(attention_model, pins, prompt, NEW, eos_token_id=None)
    eos = [free[0][0], free[1][3]]  # two EOS ids: rows end at once, a few steps in, or never
    ended = pinned_generations(attention_model, pins, prompt, NEW, eos)
    assert ended == [clamped_generate(attention_model, *pin, prompt, NEW, eos) for pin in pins]
    cut = [row[: next((t + 1 for t, id in enumerate(row) if id in eos), NEW)] for row in free]
    assert ended == cut
    stops = {len(row) for row in ended if row[-1] in eos}
    assert ended[0] == eos[:1] and len(stops) >= 2 and NEW in {len(row) for row in ended}


def test_stops_after_eos_and_at_max_new_tokens(attention_model, prompt):
    m = direction(attention_model, 2, "up_proj")
    free = clamped_generate(attention_model, m, 0, 6.0, prompt, NEW, eos_token_id=None)
    assert len(free) == NEW
    assert clamped_generate(attention_model, m, 0, 6.0, prompt, 5, eos_token_id=None) == free[:5]
    second = free[1]
    stopped = free[: free.index(second) + 1]  # through the first occurrence of that token
    assert len(stopped) < NEW
    assert clamped_generate(attention_model, m, 0, 6.0, prompt, NEW, eos_token_id=second) == stopped
    assert clamped_generate(attention_model, m, 0, 6.0, prompt, NEW, [300, second]) == stopped


def test_the_models_generation_settings_cannot_change_greedy_decoding(mlp_model, prompt, capfd):
    model = copy.deepcopy(mlp_model)
    m = direction(model, 1, "up_proj")
    expected = greedy(pinned_by_weights(model, m, 0, 5.0), prompt, NEW, [])
    settings = model.generation_config
    for key, value in dict(
        do_sample=True, temperature=0.3, top_k=3, top_p=0.5, repetition_penalty=3.0,
        no_repeat_ngram_size=1, suppress_tokens=expected[:1], min_new_tokens=NEW, max_length=4,
        bad_words_ids=[[expected[0]]], forced_bos_token_id=7,
    ).items():  # fmt: skip
        setattr(settings, key, value)
    capfd.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        ours = clamped_generate(model, m, 0, 5.0, prompt, NEW, eos_token_id=None)
    assert ours == expected
    assert capfd.readouterr() == ("", "")  # nothing printed or logged
    assert model.generation_config is settings  # the model's own settings are back


def test_the_clamps_are_gone_after_the_call_however_it_ends(attention_model, prompt, monkeypatch):
    pins = several_pins(attention_model)
    lora_as = [attention_model.get_submodule(m.name).lora_A["default"] for m, _, _ in pins]
    settings = attention_model.generation_config
    pinned_generations(attention_model, pins, prompt, 3)
    assert not any(lora_a._forward_hooks for lora_a in lora_as)

    def fail(**_):
        assert all(lora_a._forward_hooks for lora_a in lora_as[:3])  # on while it runs
        raise RuntimeError("out of memory")

    monkeypatch.setattr(attention_model, "generate", fail)
    with pytest.raises(RuntimeError, match="out of memory"):
        pinned_generations(attention_model, pins, prompt, 3)
    assert not any(lora_a._forward_hooks for lora_a in lora_as)
    assert attention_model.generation_config is settings


def test_bad_arguments(mlp_model, prompt):
    m = direction(mlp_model, 0, "gate_proj")
    with pytest.raises(ValueError, match="rank 1: no component 1"):
        clamped_generate(mlp_model, m, 1, 1.0, prompt)
    with pytest.raises(ValueError, match="needs a prompt"):
        clamped_generate(mlp_model, m, 0, 1.0, [])
    with pytest.raises(ValueError, match="needs a prompt and at least one pin"):
        pinned_generations(mlp_model, [], [5, 6])
    with pytest.raises(ValueError, match="max_rows must be at least 1, not 0"):
        pinned_generations(mlp_model, [(m, 0, 1.0)], [5, 6], max_rows=0)


def test_chat_prompt_ends_with_the_assistant_header(tokenizer):
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "what is 7 times 8"},
        {"role": "assistant", "content": "56"},
        {"role": "user", "content": "double check"},
        {"role": "assistant", "content": "56 final answer"},
    ]
    row = {"messages": messages}
    ids = steering_prompt(row, tokenizer, None, max_length=4)  # a chat prompt is never cut
    assert tokenizer.decode(ids) == (
        "<|im_start|>system\nbe brief<|im_end|>\n"
        "<|im_start|>user\nwhat is 7 times 8<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tokenize_row(row, tokenizer, None)[: len(ids)] == ids  # the main pass's tokens


def test_s1k_prompt_is_the_question_and_the_assistant_header(tokenizer):
    row = {
        "question": "What is 7 times 8?",
        "deepseek_thinking_trajectory": "7 times 8 is 54. Wait, 56.",
        "deepseek_attempt": "boxed 56",
    }
    ids = steering_prompt(row, tokenizer, None, None)
    expected = "<|im_start|>user\nWhat is 7 times 8?<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.decode(ids) == expected
    assert tokenize_row(row, tokenizer, None)[: len(ids)] == ids


def test_text_and_token_prompts_are_the_first_tokens_of_the_row(tokenizer):
    text = " ".join(random_texts(12, seed=4))
    row = {"text": text}
    tokens = tokenizer(text)["input_ids"]
    assert len(tokens) > PROMPT_TOKENS == 64
    assert steering_prompt(row, tokenizer, None, None) == tokens[:64]
    assert steering_prompt(row, tokenizer, None, 10) == tokens[:10]  # cut like the main pass
    assert steering_prompt({"body": text}, tokenizer, "body", None) == tokens[:64]
    short = tokenizer("wait")["input_ids"]
    assert steering_prompt({"text": "wait"}, tokenizer, None, None) == short  # all of it
    row = {"input_ids": list(range(100))}
    assert steering_prompt(row, tokenizer, None, None) == list(range(64))
    assert steering_prompt(row, tokenizer, None, 5) == list(range(5))
