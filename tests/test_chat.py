"""The chat backends of the explanations: a local model (adapter disabled), an OpenAI-compatible
endpoint (against a real HTTP server on 127.0.0.1) and the on-disk cache."""

from __future__ import annotations

import itertools
import os
import socket
import time
from collections.abc import Iterator

import pytest
import torch

from backend import UserError
from backend.chat import (
    Batch,
    Cache,
    Conversation,
    Judgement,
    LocalChat,
    MeteredChat,
    Usage,
    budget_batches,
    computed_tokens,
)
from backend.endpoint import EndpointChat
from backend.loading import BaseModel, load_base
from tests.chat_server import Server
from tests.runs import load
from tests.tiny import save_adapter


def user(text: str) -> Conversation:
    return [{"role": "user", "content": text}]


def endpoint(server: Server, **options) -> EndpointChat:
    return EndpointChat(server.url, "test-model", None, **{"backoff": 0.01, **options})


# ---------------------------------------------------------------- the endpoint


def test_endpoint_success_speaks_the_chat_protocol(server):
    chat = endpoint(server)
    assert chat.generate([user("hello"), user("answer  hi there ")], 7) == [
        "echo: hello",
        "hi there",
    ]
    headers, body = next(r for r in server.requests if r[1]["messages"][0]["content"] == "hello")
    assert body == {
        "model": "test-model",
        "messages": [{"role": "user", "content": "hello"}],
        "temperature": 0,
        "max_tokens": 7,
    }
    assert "Authorization" not in headers  # no key variable named: no header
    # usage from the response's usage field: prompt tokens len(text), completion tokens 2
    assert chat.usage()["num_prompts"] == 2
    assert chat.usage()["num_tokens"] == len("hello") + 2 + len("answer  hi there ") + 2


def test_endpoint_without_usage_counts_zero_tokens(server):
    server.plan = [("nousage",)]
    chat = endpoint(server)
    assert chat.generate([user("hello")], 5) == ["echo: hello"]
    assert chat.usage()["num_tokens"] == 0


def test_endpoint_judges_in_text(server):
    answers = ["answer Yes.", "answer no, it does not", "answer Maybe", "answer  NO"]
    judged = endpoint(server).judge([user(a) for a in answers])
    assert judged == [
        Judgement(True, None),
        Judgement(False, None),
        Judgement(None, None),
        Judgement(False, None),
    ]
    assert {body["max_tokens"] for _, body in server.requests} == {3}


def test_a_500_is_retried(server):
    server.plan = [("status", 500, "boom", {})]
    assert endpoint(server).generate([user("again")], 5) == ["echo: again"]
    assert len(server.requests) == 2


def test_retries_run_out_in_one_clear_error(server):
    server.plan = [("status", 503, "overloaded", {})] * 3
    with pytest.raises(UserError, match=r"failed 3 times: HTTP 503: overloaded") as e:
        endpoint(server, retries=2).generate([user("x")], 5)
    assert "\n" not in str(e.value)
    assert len(server.requests) == 3


def test_a_429_waits_its_retry_after(server):
    server.plan = [("status", 429, "slow down", {"Retry-After": "0.6"})]
    start = time.perf_counter()
    assert endpoint(server, backoff=0.001).generate([user("x")], 5) == ["echo: x"]
    assert time.perf_counter() - start >= 0.6  # the backoff alone would wait 1 ms
    assert len(server.requests) == 2


def test_a_slow_response_times_out_and_is_retried(server):
    server.plan = [("slow", 2.0)]
    start = time.perf_counter()
    assert endpoint(server, timeout=0.3).generate([user("x")], 5) == ["echo: x"]
    assert time.perf_counter() - start < 1.5  # it did not wait for the slow answer
    assert len(server.requests) == 2


def test_a_400_fails_at_once_with_the_servers_message(server):
    server.plan = [("status", 400, "model 'test-model' does not exist", {})]
    with pytest.raises(UserError, match=r"HTTP 400: model 'test-model' does not exist"):
        endpoint(server).generate([user("x")], 5)
    assert len(server.requests) == 1


def test_the_key_comes_from_the_named_variable(server, monkeypatch):
    monkeypatch.setenv("H13_TEST_KEY", "s3cret")
    chat = EndpointChat(server.url, "test-model", "H13_TEST_KEY")
    chat.generate([user("x")], 5)
    assert server.requests[0][0]["Authorization"] == "Bearer s3cret"


def test_a_missing_key_variable_is_named(server, monkeypatch):
    monkeypatch.delenv("H13_TEST_KEY", raising=False)
    with pytest.raises(UserError, match="H13_TEST_KEY"):
        EndpointChat(server.url, "test-model", "H13_TEST_KEY")
    assert server.requests == []


def test_check_an_unreachable_endpoint_is_one_clear_line():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    chat = EndpointChat(f"http://127.0.0.1:{port}/v1", "test-model", None)
    start = time.perf_counter()
    with pytest.raises(
        UserError, match=rf"cannot use the chat endpoint http://127.0.0.1:{port}/v1"
    ) as e:
        chat.check()
    assert "\n" not in str(e.value)
    assert time.perf_counter() - start < 5  # one try, no backoff


def test_check_a_reachable_endpoint(server):
    endpoint(server).check()
    assert server.requests[0][1]["max_tokens"] == 1


def test_concurrency_is_bounded():
    server = Server(delay=0.15)
    try:
        chat = endpoint(server, concurrency=3)
        texts = [f"m{i}" for i in range(12)]
        assert chat.generate([user(t) for t in texts], 5) == [f"echo: {t}" for t in texts]
        assert server.most_in_flight == 3
    finally:
        server.httpd.shutdown()
        server.httpd.server_close()


# ---------------------------------------------------------------- the local model


@pytest.fixture(scope="module")
def peft_model(qwen2_base, rank1_adapter):
    return load(qwen2_base, rank1_adapter)


EXPLANATIONS = ("numbers being multiplied", "the word wait before a check")


def scoring_conversations() -> list[Conversation]:
    """Judgements as the scorer asks them: one instruction and explanation, many short contexts."""
    instruction = (
        "You will see an explanation of a feature of a language model and a context in which one "
        "token is marked. Answer yes if the marked token fits the explanation, no otherwise."
    )
    contexts = (
        "7 times <<8>> is 56",
        "wait <<let>> me",
        "so we <<get>> 54",
        "the <<answer>> boxed",
    )
    return [
        [
            {"role": "system", "content": "You are a careful assistant."},
            {"role": "user", "content": f"{instruction}\nExplanation: {e}\nContext: {c}"},
        ]
        for e in EXPLANATIONS
        for c in contexts
    ]


def prompt_of(tokenizer, conversation: Conversation) -> list[int]:
    text = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def brute_p_yes(model, tokenizer, conversation: Conversation, adapter: bool = False) -> float:
    """One forward of the whole prompt, softmax at the last position: p(yes) / (p(yes) + p(no))
    over the first tokens of yes/no, with and without a space, capitalised, shared ones out."""
    firsts = [
        {
            tokenizer(v, add_special_tokens=False)["input_ids"][0]
            for v in (w, f" {w}", w.title(), f" {w.title()}")
        }
        for w in ("yes", "no")
    ]
    yes, no = firsts[0] - firsts[1], firsts[1] - firsts[0]
    ids = torch.tensor([prompt_of(tokenizer, conversation)])
    with torch.no_grad():
        if adapter:
            logits = model(input_ids=ids).logits[0, -1]
        else:
            with model.disable_adapter():
                logits = model(input_ids=ids).logits[0, -1]
    p = logits.double().softmax(-1)
    p_yes, p_no = p[sorted(yes)].sum(), p[sorted(no)].sum()
    return float(p_yes / (p_yes + p_no))


def brute_greedy(model, tokenizer, conversation: Conversation, max_new_tokens: int) -> str:
    """Greedy decoding by hand: a full forward per step (no cache), argmax, stop after EOS."""
    ids = prompt_of(tokenizer, conversation)
    new: list[int] = []
    with torch.no_grad(), model.disable_adapter():
        for _ in range(max_new_tokens):
            token = int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
            new.append(token)
            if token == tokenizer.eos_token_id:
                break
    return tokenizer.decode(new, skip_special_tokens=True).strip()


def test_local_generate_is_greedy_and_batching_changes_nothing(peft_model):
    model, tokenizer = peft_model
    conversations = [user(t) for t in ("wait", "let me double check the answer so", "7 times 8 is")]
    batched = LocalChat(model, tokenizer, "tiny", batch_tokens=4096)
    alone = LocalChat(model, tokenizer, "tiny", batch_tokens=1)  # every prompt its own batch
    replies = batched.generate(conversations, 6)
    assert replies == batched.generate(conversations, 6)  # deterministic
    assert replies == alone.generate(conversations, 6)
    assert replies == [brute_greedy(model, tokenizer, c, 6) for c in conversations]
    prompts = sum(len(prompt_of(tokenizer, c)) for c in conversations)
    usage = batched.usage()
    assert usage["num_prompts"] == 6
    assert prompts * 2 < usage["num_tokens"] <= 2 * (prompts + 3 * 6)  # prompt + at most 6 new


@pytest.fixture(scope="module")
def llama_model(llama_base, tmp_path_factory):
    """Llama, with attention adapted too: another architecture under the prefix path."""
    targets = ("q_proj", "v_proj", "gate_proj", "down_proj")
    adapter = save_adapter(llama_base, tmp_path_factory.mktemp("llama_adapter"), 2, targets)
    return load(llama_base, adapter)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_local_judge_against_a_forward_per_conversation(arch, request):
    model, tokenizer = request.getfixturevalue(
        {"qwen2": "peft_model", "llama": "llama_model"}[arch]
    )
    conversations = scoring_conversations()
    brute = [brute_p_yes(model, tokenizer, c) for c in conversations]
    for reuse in (True, False):
        chat = LocalChat(model, tokenizer, "tiny", batch_tokens=750, reuse_prefix=reuse)
        judged = chat.judge(conversations)
        assert [j.p_yes for j in judged] == pytest.approx(brute, abs=1e-5)
        assert [j.answer for j in judged] == [p > 0.5 for p in brute]
        assert chat.usage()["num_tokens"] == sum(
            len(prompt_of(tokenizer, c)) for c in conversations
        )


def test_local_judge_computes_a_shared_prefix_once(peft_model):
    """The prefix path really runs: a one-row forward of what the batch's prompts share (the
    instruction), then only their rests."""
    model, tokenizer = peft_model
    conversations = scoring_conversations()
    shapes: list[tuple[int, int]] = []
    embed = model.get_input_embeddings()
    handle = embed.register_forward_hook(lambda _m, args, _o: shapes.append(tuple(args[0].shape)))
    try:
        plain = LocalChat(model, tokenizer, "tiny", 4096, reuse_prefix=False).judge(conversations)
        plain_shapes, shapes[:] = list(shapes), []
        shared = LocalChat(model, tokenizer, "tiny", 4096).judge(conversations)
    finally:
        handle.remove()
    prompts = [prompt_of(tokenizer, c) for c in conversations]
    longest = max(len(p) for p in prompts)
    assert plain_shapes == [(len(conversations), longest)]
    prefix = next(n for n in itertools.count() if len({tuple(p[: n + 1]) for p in prompts}) > 1)
    assert shapes == [(1, prefix), (len(conversations), longest - prefix)]
    assert [j.p_yes for j in shared] == pytest.approx([j.p_yes for j in plain], abs=1e-5)


def test_judgement_batches_fill_a_budget_of_computed_tokens():
    instruction = list(range(100, 140))
    prompts = [
        [*instruction, *[explanation] * 20, context, 7]
        for explanation in (1, 2)
        for context in (3, 4, 5, 6)
    ]
    order = sorted(range(8), key=lambda i: prompts[i])
    assert list(budget_batches(order, prompts, 0, 10_000, share=True)) == [order]
    # One explanation's 4 rows share 60 tokens and compute 68; a fifth, of the other, leaves
    # the instruction's 40 shared: 40 + 5 * 22 = 150 > 140.
    assert list(budget_batches(order, prompts, 0, 140, share=True)) == [order[:4], order[4:]]
    assert computed_tokens(order[:4], prompts) == 60 + 4 * 2  # one explanation: more shared
    # Padded, a budget of 3 rows of 62 tokens.
    assert list(budget_batches(order, prompts, 0, 3 * 62)) == [order[:3], order[3:6], order[6:]]
    unrelated = [[i, 50, 51] for i in range(6)]  # nothing to share: the rows alone count
    assert list(budget_batches(list(range(6)), unrelated, 0, 12, share=True)) == [
        [0, 1, 2, 3],
        [4, 5],
    ]


def test_local_chat_disables_the_adapter(peft_model, qwen2_base):
    model, tokenizer = peft_model
    base, base_tokenizer = load_base(
        BaseModel(str(qwen2_base), str(qwen2_base)), torch.float32, "cpu"
    )
    conversations = scoring_conversations()[:3]
    ids = torch.tensor([prompt_of(tokenizer, conversations[0])])
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
    judged = LocalChat(model, tokenizer, "tiny", 4096).judge(conversations)
    plain = LocalChat(base, base_tokenizer, "tiny", 4096).judge(conversations)
    assert [j.p_yes for j in judged] == pytest.approx([j.p_yes for j in plain], abs=1e-6)
    # the adapter changes these answers (so the comparison can fail) ...
    with_adapter = [brute_p_yes(model, tokenizer, c, adapter=True) for c in conversations]
    assert max(abs(a - j.p_yes) for a, j in zip(with_adapter, judged, strict=True)) > 1e-4
    # ... and is on again after the calls
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, adapted)
    replies = [user("wait let me"), user("so we get")]
    assert LocalChat(model, tokenizer, "tiny", 4096).generate(replies, 5) == LocalChat(
        base, base_tokenizer, "tiny", 4096
    ).generate(replies, 5)


def test_local_chat_needs_a_chat_template(peft_model):
    model, tokenizer = peft_model
    saved = tokenizer.chat_template
    tokenizer.chat_template = None
    try:
        with pytest.raises(UserError, match="tiny has no chat template"):
            LocalChat(model, tokenizer, "tiny", 4096)
    finally:
        tokenizer.chat_template = saved


# ---------------------------------------------------------------- the cache


class Scripted(MeteredChat):
    """A deterministic chat without a model, in batches of `batch`, counting the conversations
    it is asked; `fail_after` batches it raises (a run killed mid-call)."""

    def __init__(
        self, name: str = "scripted", batch: int = 2, fail_after: int | None = None, dtype="f32"
    ):
        super().__init__()
        self.name, self.batch, self.fail_after = name, batch, fail_after
        self.decoding = {"temperature": 0, "dtype": dtype}
        self.asked = 0

    def _batches(self, conversations: list[Conversation], result) -> Iterator[Batch]:
        for n, start in enumerate(range(0, len(conversations), self.batch)):
            if n == self.fail_after:
                raise KeyboardInterrupt
            part = conversations[start : start + self.batch]
            self.asked += len(part)
            yield [
                (start + j, result(c[-1]["content"]), Usage(len(c[-1]["content"]), 3, 0.5))
                for j, c in enumerate(part)
            ]

    def generate_batches(self, conversations, max_new_tokens):
        return self._batches(conversations, lambda text: f"{text[::-1]}/{max_new_tokens}")

    def judge_batches(self, conversations):
        return self._batches(
            conversations, lambda text: Judgement(len(text) % 2 == 0, len(text) / 97)
        )


CONVERSATIONS = [user(f"context number {i}" + "!" * i) for i in range(7)]


def test_a_rerun_from_the_cache_makes_no_calls(tmp_path):
    path = tmp_path / "cache" / "chat.jsonl"
    first = Cache(Scripted(), path)
    replies, judged = first.generate(CONVERSATIONS, 8), first.judge(CONVERSATIONS)
    assert first.chat.asked == 14 and first.usage()["num_cached"] == 0
    again = Cache(Scripted(), path)
    assert again.generate(CONVERSATIONS, 8) == replies
    assert again.judge(CONVERSATIONS) == judged  # p_yes floats round-trip exactly
    assert again.chat.asked == 0
    totals = ("num_prompts", "num_tokens")
    assert {k: again.usage()[k] for k in totals} == {k: first.usage()[k] for k in totals}
    assert first.usage()["num_tokens"] == 2 * sum(len(c[0]["content"]) + 3 for c in CONVERSATIONS)
    assert again.usage()["num_cached"] == 14


def test_different_decoding_parameters_or_models_miss(tmp_path):
    path = tmp_path / "chat.jsonl"
    Cache(Scripted(), path).generate(CONVERSATIONS, 8)
    shorter = Cache(Scripted(), path)
    assert shorter.generate(CONVERSATIONS, 4)[0].endswith("/4")
    assert shorter.chat.asked == 7
    other = Cache(Scripted(name="another"), path)
    other.generate(CONVERSATIONS, 8)
    assert other.chat.asked == 7
    wider = Cache(Scripted(dtype="f64"), path)  # other decoding parameters
    wider.generate(CONVERSATIONS, 8)
    assert wider.chat.asked == 7
    judge = Cache(Scripted(), path)  # a judgement is not a reply
    judge.judge(CONVERSATIONS)
    assert judge.chat.asked == 7


def test_repeats_in_one_call_are_computed_once(tmp_path):
    chat = Cache(Scripted(), tmp_path / "chat.jsonl")
    replies = chat.generate([CONVERSATIONS[0], CONVERSATIONS[1], CONVERSATIONS[0]], 8)
    assert replies[0] == replies[2] and chat.chat.asked == 2
    assert chat.usage()["num_prompts"] == 3 and chat.usage()["num_cached"] == 1


def test_a_killed_run_loses_only_the_batch_in_flight(tmp_path):
    path = tmp_path / "chat.jsonl"
    with pytest.raises(KeyboardInterrupt):
        Cache(Scripted(batch=2, fail_after=2), path).generate(CONVERSATIONS, 8)
    assert len(path.read_text().splitlines()) == 4  # two batches of two, each flushed
    rerun = Cache(Scripted(), path)
    assert rerun.generate(CONVERSATIONS, 8) == Scripted().generate(CONVERSATIONS, 8)
    assert rerun.chat.asked == 3 and rerun.usage()["num_cached"] == 4


def test_a_torn_last_line_is_ignored(tmp_path):
    path = tmp_path / "chat.jsonl"
    Cache(Scripted(), path).generate(CONVERSATIONS[:3], 8)
    whole = path.read_text()
    last = whole.splitlines()[-1]
    path.write_text(whole[: len(whole) - len(last) // 2 - 1])  # the last entry cut mid-write
    torn = Cache(Scripted(), path)
    assert torn.generate(CONVERSATIONS[:3], 8) == Scripted().generate(CONVERSATIONS[:3], 8)
    assert torn.chat.asked == 1  # only the torn entry again
    assert path.read_text() == whole  # cut off, then appended whole: every line parses
    assert Cache(Scripted(), path).generate(CONVERSATIONS[:3], 8)


def test_a_corrupt_cache_line_is_one_clear_error(tmp_path):
    path = tmp_path / "chat.jsonl"
    Cache(Scripted(), path).generate(CONVERSATIONS[:2], 8)
    lines = path.read_text().splitlines()
    path.write_text(f"{lines[0]}\nnot json\n{lines[1]}\n")
    with pytest.raises(UserError, match=r"chat.jsonl: line 2 is not a cache entry"):
        Cache(Scripted(), path)


def test_the_cache_around_real_backends(tmp_path, peft_model, server):
    """A local model's replies and judgements, and an endpoint's text judgements, come back
    from the cache as they were computed, with the same usage, and without a model call."""
    model, tokenizer = peft_model
    conversations = scoring_conversations()[:3]
    path = tmp_path / "chat.jsonl"
    local = Cache(LocalChat(model, tokenizer, "tiny", 4096), path)
    replies, judged = local.generate(conversations, 4), local.judge(conversations)
    calls = []
    handle = model.get_input_embeddings().register_forward_hook(lambda *_: calls.append(1))
    try:
        again = Cache(LocalChat(model, tokenizer, "tiny", 4096), path)
        assert (again.generate(conversations, 4), again.judge(conversations)) == (replies, judged)
    finally:
        handle.remove()
    assert calls == []
    assert again.usage()["num_tokens"] == local.usage()["num_tokens"]
    web = [user("answer yes"), user("answer No")]
    assert Cache(endpoint(server), path).judge(web) == [
        Judgement(True, None),
        Judgement(False, None),
    ]
    assert Cache(endpoint(server), path).judge(web) == [
        Judgement(True, None),
        Judgement(False, None),
    ]
    assert len(server.requests) == 2
    assert os.path.getsize(path) > 0
