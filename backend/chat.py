"""Who explains and scores: a chat model behind one small protocol, and an on-disk cache.

Two backends follow `Chat`: `LocalChat`, the run's own base model (the adapter disabled) through
transformers, and `backend.endpoint.EndpointChat`, any OpenAI-compatible chat endpoint. Both
decode greedily (temperature 0). `Cache` wraps either, so that a rerun makes no call at all.

Usage: every backend counts, over the calls made through it, the prompts, the tokens (prompt and
completion) and the wall-clock seconds of its calls. Each result's own tokens travel with it (a
`Usage`), so that the cache can store them and a rerun from the cache reports the same prompts
and tokens; its seconds are only the time really spent, near zero for cached results.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch
from torch import nn
from tqdm import tqdm
from transformers import GenerationConfig

from backend import UserError
from backend.loading import input_device
from backend.prompts import ANSWERS
from backend.steering import eos_ids, neutral_generation_config, through_eos

# Generation's token budget, in batch_tokens: each new token is one step of the whole batch, so
# rows come nearly free once the prompts are read (on SmolLM2 on 2 CPU cores, 2 explainer prompts
# a batch took 2.5 s a prompt).
GENERATION_BUDGET = 8
Message = dict[str, str]  # {"role": ..., "content": ...}
Conversation = list[Message]
T = TypeVar("T")


@dataclass(frozen=True)
class Judgement:
    """answer: True for yes, False for no, None where a text answer was neither. p_yes: p(yes)
    / (p(yes) + p(no)) where the backend reads probabilities (local), else None."""

    answer: bool | None
    p_yes: float | None


@dataclass(frozen=True)
class Usage:
    """What one result cost: its prompt and completion tokens, and its share of the seconds."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0


Batch = list[tuple[int, T, Usage]]  # (index of the conversation, its result, its usage)


class Chat(Protocol):
    name: str  # the model's public name: part of every cache key

    def generate(self, conversations: list[Conversation], max_new_tokens: int) -> list[str]: ...

    def judge(self, conversations: list[Conversation]) -> list[Judgement]: ...

    def usage(self) -> dict[str, Any]: ...


class MeteredChat(ABC):
    """A Chat whose results come a batch at a time, each with its usage: `generate` and `judge`
    collect them (timing the whole call), and the cache stores each batch as it arrives."""

    name: str
    # what decides its results besides the model's name, the messages and max_new_tokens
    # (greedy decoding, the dtype, how a judgement is read): part of every cache key
    decoding: dict[str, Any]

    def __init__(self) -> None:
        self._prompts = 0
        self._tokens = 0
        self._seconds = 0.0
        self.progress = False  # a progress bar over each call's conversations

    @abstractmethod
    def generate_batches(
        self, conversations: list[Conversation], max_new_tokens: int
    ) -> Iterator[Batch[str]]:
        """Greedy replies to every conversation, a batch at a time, in any order."""

    @abstractmethod
    def judge_batches(self, conversations: list[Conversation]) -> Iterator[Batch[Judgement]]:
        """A yes/no judgement of every conversation, a batch at a time, in any order."""

    def generate(self, conversations: list[Conversation], max_new_tokens: int) -> list[str]:
        return self._collect(self.generate_batches(conversations, max_new_tokens), conversations)

    def judge(self, conversations: list[Conversation]) -> list[Judgement]:
        return self._collect(self.judge_batches(conversations), conversations)

    def usage(self) -> dict[str, Any]:
        """Totals over every call made through this object; seconds: wall-clock time of calls."""
        return {"num_prompts": self._prompts, "num_tokens": self._tokens, "seconds": self._seconds}

    def _collect(self, batches: Iterator[Batch[T]], conversations: list[Conversation]) -> list[T]:
        start = time.perf_counter()
        results: list[Any] = [None] * len(conversations)
        bar = tqdm(
            total=len(conversations), desc=self.name, unit="prompt", disable=not self.progress
        )
        try:
            for batch in batches:
                for i, result, usage in batch:
                    results[i] = result
                    self._prompts += 1
                    self._tokens += usage.prompt_tokens + usage.completion_tokens
                bar.update(len(batch))
        finally:  # a failed call still spent its time
            self._seconds += time.perf_counter() - start
            bar.close()
        return results


class LocalChat(MeteredChat):
    """A loaded model answers with its chat template, greedily, batched by a token budget (the
    padded tokens of a batch, prompt and new tokens). A PEFT model answers with its adapter
    disabled: the base model speaks, whatever the adapter learned.

    A judgement is read off one forward pass at the generation prompt's position (where the
    reply's first token would come): p(yes) is the sum of the probabilities of the first tokens
    of "yes", " yes", "Yes" and " Yes" (each distinct token once), p(no) likewise, answer is
    p(yes) > p(no) and p_yes = p(yes) / (p(yes) + p(no)). A first token that both answers share
    (a bare space, in a tokenizer without those words) says nothing about either and is left out.

    Judgements whose prompts share a prefix (one instruction and explanation, many short
    contexts) compute it once per batch: one forward of the prefix, its key/value cache repeated
    for every row, then only the suffixes (reuse_prefix=False: every prompt whole, for checks).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        name: str,
        batch_tokens: int,
        reuse_prefix: bool = True,
    ) -> None:
        super().__init__()
        if not getattr(tokenizer, "chat_template", None):
            raise UserError(f"{name} has no chat template: it cannot explain or score")
        if batch_tokens < 1:
            raise ValueError(f"batch_tokens must be at least 1, not {batch_tokens}")
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.batch_tokens, self.reuse_prefix = batch_tokens, reuse_prefix
        self.answer_ids = answer_token_ids(tokenizer)
        self.decoding = {
            "temperature": 0,
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "judge": "p(yes) vs p(no) at the generation prompt",
            "answers": ANSWERS,
        }
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        # transformers 5 renamed forward's past_key_values (and its output's) to cache
        forward = inspect.signature(transformers_model(model).forward).parameters
        self.cache_name = "cache" if "cache" in forward else "past_key_values"

    def prompt_ids(self, conversation: Conversation) -> list[int]:
        """The conversation as the chat template renders it, ending with the reply's header."""
        text = self.tokenizer.apply_chat_template(
            conversation, add_generation_prompt=True, tokenize=False
        )
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def generate_batches(
        self, conversations: list[Conversation], max_new_tokens: int
    ) -> Iterator[Batch[str]]:
        prompts = [self.prompt_ids(c) for c in conversations]
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # similar lengths
        budget = self.batch_tokens * GENERATION_BUDGET
        for rows in budget_batches(order, prompts, max_new_tokens, budget):
            start = time.perf_counter()
            replies = self._generate([prompts[i] for i in rows], max_new_tokens)
            share = (time.perf_counter() - start) / len(rows)
            yield [
                (
                    i,
                    self.tokenizer.decode(new, skip_special_tokens=True).strip(),
                    Usage(len(prompts[i]), len(new), share),
                )
                for i, new in zip(rows, replies, strict=True)
            ]

    def judge_batches(self, conversations: list[Conversation]) -> Iterator[Batch[Judgement]]:
        prompts = [self.prompt_ids(c) for c in conversations]
        order = sorted(range(len(prompts)), key=lambda i: prompts[i])  # shared prefixes adjacent
        yes, no = (torch.tensor(ids) for ids in self.answer_ids)
        for rows in budget_batches(order, prompts, 0, self.batch_tokens, self.reuse_prefix):
            start = time.perf_counter()
            batch = [prompts[i] for i in rows]
            shared = shared_prefix(batch) if self.reuse_prefix else 0
            logits = self._last_logits(batch, shared).double().cpu()  # [n, V]
            # log p(yes) - log p(no): p_yes = sigmoid of it, with no 0/0 where both are tiny
            margin = logits[:, yes].logsumexp(-1) - logits[:, no].logsumexp(-1)  # [n]
            share = (time.perf_counter() - start) / len(rows)
            yield [
                (i, Judgement(bool(m > 0), float(m.sigmoid())), Usage(len(prompts[i]), 0, share))
                for i, m in zip(rows, margin, strict=True)
            ]

    def _generate(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """Greedy new tokens of each prompt (left-padded into one batch), through the first EOS."""
        inner = transformers_model(self.model)
        eos = sorted(
            {
                *eos_ids(inner.generation_config.eos_token_id),
                *eos_ids(self.tokenizer.eos_token_id),
            }
        )
        config = GenerationConfig(
            do_sample=False,
            num_beams=1,
            max_new_tokens=max_new_tokens,
            eos_token_id=eos or None,
            pad_token_id=self.pad_id,
        )
        ids, mask = left_padded(prompts, self.pad_id, input_device(self.model))  # [n, T] each
        with base_model(self.model), neutral_generation_config(inner):
            output = self.model.generate(
                input_ids=ids, attention_mask=mask, generation_config=config
            )
        return [through_eos(row, eos) for row in output[:, ids.shape[1] :].tolist()]

    @torch.no_grad()
    def _last_logits(self, prompts: list[list[int]], shared: int) -> torch.Tensor:
        """Logits [n, V] at each prompt's last token. The first `shared` tokens, the same in
        every prompt, run once; the rest (left-padded after them, each at its true positions)
        attend to their cached keys and values."""
        device = input_device(self.model)
        with base_model(self.model):
            cache = None
            if shared:
                prefix = torch.tensor([prompts[0][:shared]], device=device)  # [1, P]
                output = self.model(input_ids=prefix, use_cache=True, logits_to_keep=1)
                cache = getattr(output, self.cache_name)
                cache.batch_repeat_interleave(len(prompts))
            ids, mask = left_padded([p[shared:] for p in prompts], self.pad_id, device)  # [n, S]
            positions = (shared + mask.cumsum(-1) - 1).clamp(min=shared)  # [n, S]
            mask = torch.cat([mask.new_ones(len(prompts), shared), mask], dim=1)  # [n, P + S]
            output = self.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                use_cache=cache is not None,
                logits_to_keep=1,
                **{self.cache_name: cache},
            )
        return output.logits[:, -1]


def answer_token_ids(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The token ids whose probabilities make p(yes) and p(no) (see LocalChat)."""
    firsts = []
    for word in ANSWERS:
        variants = (word, f" {word}", word.capitalize(), f" {word.capitalize()}")
        firsts.append({tokenizer(v, add_special_tokens=False)["input_ids"][0] for v in variants})
    yes, no = firsts[0] - firsts[1], firsts[1] - firsts[0]
    if not yes or not no:
        raise ValueError("the tokenizer gives 'yes' and 'no' the same first tokens")
    return sorted(yes), sorted(no)


def transformers_model(model: nn.Module) -> nn.Module:
    """The transformers model under a PEFT model (whose generate and forward run), or the model."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@contextlib.contextmanager
def base_model(model: nn.Module) -> Iterator[None]:
    """A PEFT model with its adapter disabled while the context is open; any other model as is."""
    with model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext():
        yield


def budget_batches(
    order: list[int], prompts: list[list[int]], extra: int, budget: int, share: bool = False
) -> Iterator[list[int]]:
    """Consecutive runs of `order` whose size fits the budget; a prompt that alone exceeds it is
    a batch of its own. The size: rows × (longest prompt + extra), padded; with share
    (judgements, `order` sorted so that shared prefixes are adjacent, their common prefix run
    once), the tokens the batch computes (computed_tokens). Batches span explanations and share
    what all their prompts do, the instruction at least: a forward costs about the same for a
    few rows as for many on a CPU, and a batch per explanation (a few contexts each) made the
    demo's scoring several times slower than its tokens."""
    size = computed_tokens if share else lambda rows, prompts: padded_tokens(rows, prompts, extra)
    batch: list[int] = []
    for i in order:
        rows = [*batch, i]
        if batch and size(rows, prompts) > budget:
            yield batch
            rows = [i]
        batch = rows
    if batch:
        yield batch


def padded_tokens(rows: list[int], prompts: list[list[int]], extra: int) -> int:
    return len(rows) * (max(len(prompts[i]) for i in rows) + extra)


def computed_tokens(rows: list[int], prompts: list[list[int]]) -> int:
    """The tokens a judgement batch runs through the model: the shared prefix once, then each
    row's rest at the width of the longest."""
    batch = [prompts[i] for i in rows]
    shared = shared_prefix(batch)
    return shared + len(batch) * (max(len(p) for p in batch) - shared)


def shared_prefix(prompts: list[list[int]]) -> int:
    """How many leading tokens lexicographically sorted prompts all share (as many as the first
    and the last do), leaving every prompt at least one token; 0 for one prompt."""
    if len(prompts) < 2:
        return 0
    return min(common_length(prompts[0], prompts[-1]), min(len(p) for p in prompts) - 1)


def common_length(a: list[int], b: list[int]) -> int:
    """How many leading tokens a and b share."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def left_padded(
    rows: list[list[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask), both [n, longest]: each row right-aligned after pads."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    return ids, mask


class Cache(MeteredChat):
    """Any MeteredChat behind an on-disk cache: a JSON line per result, keyed by the sha256 of
    the canonical JSON of (model name, kind of call, decoding parameters and max_new_tokens,
    the full messages). Each batch is appended (and flushed) as it arrives, so a killed run
    loses at most the batch in flight; a torn last line (a kill mid-write) is dropped on load.
    An entry keeps the result's usage, so a rerun from the cache reports the same prompts and
    tokens; its seconds are the time really spent (near zero for cached results), and `usage()`
    adds how many results came from the cache (`num_cached`)."""

    def __init__(self, chat: MeteredChat, path: Path) -> None:
        super().__init__()
        self.chat, self.path = chat, Path(path)
        self.name, self.decoding = chat.name, chat.decoding
        self.entries = load_cache(self.path)
        self._cached = 0

    def generate_batches(
        self, conversations: list[Conversation], max_new_tokens: int
    ) -> Iterator[Batch[str]]:
        keys = [self.key("generate", max_new_tokens, c) for c in conversations]

        def compute(todo: list[Conversation]) -> Iterator[Batch[str]]:
            return self.chat.generate_batches(todo, max_new_tokens)

        return self._through(keys, conversations, compute, str, str)

    def judge_batches(self, conversations: list[Conversation]) -> Iterator[Batch[Judgement]]:
        keys = [self.key("judge", None, c) for c in conversations]
        return self._through(
            keys, conversations, self.chat.judge_batches, asdict, lambda d: Judgement(**d)
        )

    def usage(self) -> dict[str, Any]:
        return {**super().usage(), "num_cached": self._cached}

    def key(self, kind: str, max_new_tokens: int | None, conversation: Conversation) -> str:
        what = [self.name, kind, self.decoding, max_new_tokens, conversation]
        text = json.dumps(what, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(text.encode()).hexdigest()

    def _through(
        self,
        keys: list[str],
        conversations: list[Conversation],
        compute: Callable[[list[Conversation]], Iterator[Batch[T]]],
        encode: Callable[[T], Any],
        decode: Callable[[Any], T],
    ) -> Iterator[Batch[T]]:
        """The cached results first (one batch), then the wrapped chat's for the rest, each
        distinct conversation computed once, every batch stored before it is passed on."""
        hits = [(i, k) for i, k in enumerate(keys) if k in self.entries]
        if hits:
            self._cached += len(hits)
            yield [(i, decode(self.entries[k][0]), self.entries[k][1]) for i, k in hits]
        todo: dict[str, list[int]] = {}  # key -> the indices that ask for it
        for i, k in enumerate(keys):
            if k not in self.entries:
                todo.setdefault(k, []).append(i)
        self._cached += sum(len(same) - 1 for same in todo.values())  # repeats in this call
        missing = list(todo)
        for batch in compute([conversations[todo[k][0]] for k in missing]):
            lines, done = [], []
            for j, result, usage in batch:
                entry = {"key": missing[j], "result": encode(result), "usage": asdict(usage)}
                self.entries[missing[j]] = (entry["result"], usage)
                lines.append(json.dumps(entry, ensure_ascii=False) + "\n")
                done += [(i, result, usage) for i in todo[missing[j]]]
            append_text(self.path, "".join(lines))
            yield done


def load_cache(path: Path) -> dict[str, tuple[Any, Usage]]:
    """The (result as stored, usage) of each entry of a cache file by key ({} if there is no
    file). A torn last line (no newline:
    a write cut short) is dropped and cut off the file, so that appends start on a fresh line."""
    try:
        data = path.read_bytes() if path.exists() else b""
        whole = data[: data.rfind(b"\n") + 1]
        if len(whole) < len(data):
            with path.open("r+b") as f:
                f.truncate(len(whole))
    except OSError as e:
        raise UserError(f"{path}: cannot read the cache ({e.strerror or e})") from None
    entries = {}
    for n, line in enumerate(whole.splitlines(), 1):
        try:
            entry = json.loads(line.decode())
            entries[entry["key"]] = (entry["result"], Usage(**entry["usage"]))
        except (ValueError, KeyError, TypeError):
            raise UserError(
                f"{path}: line {n} is not a cache entry (delete the file to start afresh)"
            ) from None
    return entries


def append_text(path: Path, text: str) -> None:
    """One write at the end of the file, closed (so flushed) before returning."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as f:
            f.write(text)
    except OSError as e:
        raise UserError(f"{path}: cannot write the cache ({e.strerror or e})") from None
