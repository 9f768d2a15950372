"""Tiny real models, tokenizers and PEFT adapters, built offline for tests."""

from __future__ import annotations

import random
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WORDS = (
    "wait let me double check the answer so we get 7 times 8 is 56 not 54 alternatively "
    "case one two three total final answer boxed hmm think therefore x equals"
).split()


def make_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (any text tokenizes) with chat tokens and a chat template."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([" ".join(WORDS)] * 20, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
    )


def make_model(arch: str, vocab_size: int, layers: int = 3, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    shape = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(**shape)).eval()
    return Qwen2ForCausalLM(Qwen2Config(**shape)).eval()


def save_base(path: Path, arch: str = "qwen2", layers: int = 3) -> Path:
    tokenizer = make_tokenizer()
    make_model(arch, len(tokenizer), layers).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def save_adapter(
    base: Path,
    path: Path,
    rank: int = 1,
    targets: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj"),
    layers: list[int] | None = None,
    seed: int = 1,
) -> Path:
    """A real PEFT adapter with random, non-zero A and B (as if trained), saved to disk."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    torch.manual_seed(seed)
    config = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=list(targets),
        layers_to_transform=layers,
        init_lora_weights=False,  # B non-zero: the adapter changes the model
    )
    get_peft_model(model, config).save_pretrained(path)
    return path


def random_texts(n: int, seed: int = 0, max_words: int = 40) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, max_words))) for _ in range(n)]
