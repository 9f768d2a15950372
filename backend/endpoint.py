"""An OpenAI-compatible chat endpoint (vLLM, a llama.cpp server, a hosted API) as a Chat.

`POST {url}/chat/completions` with {model, messages, temperature: 0, max_tokens}, through urllib
(no dependency). Requests run in a bounded thread pool, each with a timeout; connection errors,
timeouts, 429 and 5xx are retried with exponential backoff (or the server's Retry-After), any
other 4xx fails at once with the server's message. Every failure the user can act on is a
`backend.UserError`: one line, no traceback.
"""

from __future__ import annotations

import http.client
import itertools
import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

from backend import UserError
from backend.chat import Batch, Conversation, Judgement, MeteredChat, Usage
from backend.prompts import parse_answer

JUDGE_TOKENS = 3  # room for "Yes." and little else: the answer is its first word


class Retryable(Exception):
    """A failure that another try may not have: the connection, a timeout, a busy server."""

    def __init__(self, message: str, wait_s: float | None = None) -> None:
        super().__init__(message)
        self.wait_s = wait_s  # the server's Retry-After, when it gave one


class EndpointChat(MeteredChat):
    """Replies and yes/no judgements from a chat endpoint, greedy (temperature 0). A judgement
    is the reply's first word, at most JUDGE_TOKENS tokens: yes, no, or None if neither; it has
    no probability (p_yes None). Usage: the tokens of the response's `usage` field, 0 where a
    server sends none."""

    def __init__(
        self,
        url: str,
        model: str,
        key_env: str | None,
        concurrency: int = 8,
        timeout: float = 60,
        retries: int = 4,
        backoff: float = 1.0,
    ) -> None:
        super().__init__()
        if concurrency < 1 or retries < 0 or timeout <= 0:
            raise ValueError("concurrency >= 1, retries >= 0 and timeout > 0, please")
        self.url, self.name = url.rstrip("/"), model
        self.concurrency, self.timeout = concurrency, timeout
        self.retries, self.backoff = retries, backoff
        self.headers = {"Content-Type": "application/json"}
        if key_env is not None:
            key = os.environ.get(key_env)
            if not key:
                raise UserError(
                    f"the environment variable {key_env} (the endpoint's key) is not set"
                )
            self.headers["Authorization"] = f"Bearer {key}"
        self.decoding = {"temperature": 0, "judge_max_tokens": JUDGE_TOKENS}

    def check(self) -> None:
        """One cheap request (one token), one try: an endpoint that cannot answer is one clear
        UserError before any work."""
        try:
            self._request([{"role": "user", "content": "Say yes."}], 1)
        except Retryable as e:
            raise UserError(f"cannot use the chat endpoint {self.url}: {e}") from None

    def generate_batches(
        self, conversations: list[Conversation], max_new_tokens: int
    ) -> Iterator[Batch[str]]:
        for i, text, usage in self._complete(conversations, max_new_tokens):
            yield [(i, text.strip(), usage)]

    def judge_batches(self, conversations: list[Conversation]) -> Iterator[Batch[Judgement]]:
        for i, text, usage in self._complete(conversations, JUDGE_TOKENS):
            yield [(i, Judgement(parse_answer(text), None), usage)]

    def _complete(
        self, conversations: list[Conversation], max_tokens: int
    ) -> Iterator[tuple[int, str, Usage]]:
        """(index, reply, usage) of every conversation, as each request finishes; at most
        `concurrency` requests in flight. A request that fails for good cancels the rest."""
        with ThreadPoolExecutor(self.concurrency) as pool:
            pending = {
                pool.submit(self._with_retries, c, max_tokens): i
                for i, c in enumerate(conversations)
            }
            try:
                while pending:
                    done, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for future in done:
                        text, usage = future.result()
                        yield pending.pop(future), text, usage
            finally:
                for future in pending:
                    future.cancel()

    def _with_retries(self, messages: Conversation, max_tokens: int) -> tuple[str, Usage]:
        start = time.perf_counter()
        for attempt in itertools.count():
            try:
                text, prompt, completion = self._request(messages, max_tokens)
                return text, Usage(prompt, completion, time.perf_counter() - start)
            except Retryable as e:
                if attempt == self.retries:
                    raise UserError(
                        f"the chat endpoint {self.url} failed {attempt + 1} times: {e}"
                    ) from None
                time.sleep(e.wait_s if e.wait_s is not None else self.backoff * 2**attempt)

    def _request(self, messages: Conversation, max_tokens: int) -> tuple[str, int, int]:
        """(reply, prompt tokens, completion tokens) of one request; Retryable or UserError."""
        body = {
            "model": self.name,
            "messages": messages,
            "temperature": 0,
            "max_tokens": max_tokens,
        }
        request = urllib.request.Request(
            f"{self.url}/chat/completions", json.dumps(body).encode(), self.headers, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                answer = response.read()
        except urllib.error.HTTPError as e:
            message = f"HTTP {e.code}: {server_message(e.read())}"
            if e.code == 429 or e.code >= 500:  # busy or failing: worth another try
                raise Retryable(message, retry_after(e.headers.get("Retry-After"))) from None
            raise UserError(f"the chat endpoint {self.url} refused a request ({message})") from None
        except urllib.error.URLError as e:  # refused, unknown host...: the reason says which
            raise Retryable(str(e.reason)) from None
        except (TimeoutError, ConnectionError, http.client.HTTPException) as e:
            raise Retryable(f"{type(e).__name__}: {e}" if str(e) else type(e).__name__) from None
        return parse_reply(answer, self.url)


def parse_reply(answer: bytes, url: str) -> tuple[str, int, int]:
    try:
        reply = json.loads(answer)
        text = reply["choices"][0]["message"]["content"] or ""
    except (ValueError, KeyError, IndexError, TypeError):
        raise UserError(
            f"the chat endpoint {url} sent no chat completion: {answer[:200]!r}"
        ) from None
    usage = reply.get("usage") or {}
    return text, int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)


def server_message(body: bytes) -> str:
    """What an error response says: the OpenAI error's message, else its first 200 characters."""
    text = body.decode("utf-8", "replace")
    try:
        error = json.loads(text)["error"]
        return str(error["message"] if isinstance(error, dict) else error)
    except (ValueError, KeyError, TypeError):
        return text.strip()[:200] or "no message"


def retry_after(value: str | None) -> float | None:
    """Retry-After in seconds (the HTTP-date form is ignored: backoff instead)."""
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None
