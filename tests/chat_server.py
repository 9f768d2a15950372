"""A real OpenAI-compatible chat server on 127.0.0.1, for the endpoint client's tests."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Server:
    """ThreadingHTTPServer on 127.0.0.1 (port 0) speaking the chat completions protocol.

    `plan`: how the next requests are answered, in order (then "ok"): ("ok",), ("status",
    code, message, headers), ("slow", seconds) (answers after that long), ("nousage",). A
    reply's content is the last message's text after "answer " if it starts so, else "echo: "
    and the text. It records every request (headers, body) and the most requests in flight."""

    def __init__(self, delay: float = 0.0, reply: Callable[[str], str] | None = None) -> None:
        self.reply = reply  # the answer to a last message's text, instead of the rule above
        self.plan: list[tuple] = []
        self.requests: list[tuple[dict, dict]] = []
        self.delay = delay  # every request takes at least this long
        self.lock = threading.Lock()
        self.in_flight = self.most_in_flight = 0
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler(self))
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def next(self, headers: dict, body: dict) -> tuple:
        with self.lock:
            self.requests.append((headers, body))
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
            return self.plan.pop(0) if self.plan else ("ok",)

    def done(self) -> None:
        with self.lock:
            self.in_flight -= 1


def handler(server: Server) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            how = server.next(dict(self.headers), body)
            self.counted = True  # in flight until its answer starts out (send), or it fails
            try:
                time.sleep(server.delay)
                self.answer(how, body)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up (a timeout)
                pass
            finally:
                self.finish_request()

        def answer(self, how: tuple, body: dict) -> None:
            if self.path != "/v1/chat/completions":
                return self.send(404, {"error": {"message": f"no route {self.path}"}})
            if how[0] == "status":
                _, code, message, headers = how
                return self.send(code, {"error": {"message": message}}, headers)
            if how[0] == "slow":
                time.sleep(how[1])
            text = body["messages"][-1]["content"]
            content = (
                server.reply(text)
                if server.reply is not None
                else text.removeprefix("answer ")
                if text.startswith("answer ")
                else f"echo: {text}"
            )
            reply: dict = {"choices": [{"message": {"role": "assistant", "content": content}}]}
            if how[0] != "nousage":
                reply["usage"] = {"prompt_tokens": len(text), "completion_tokens": 2}
            self.send(200, reply)

        def send(self, code: int, payload: dict, headers: dict | None = None) -> None:
            data = json.dumps(payload).encode()
            self.send_response(code)
            for name, value in {"Content-Type": "application/json", **(headers or {})}.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(data)))
            # Out of flight before the client can read the answer and send its next request.
            self.finish_request()
            self.end_headers()
            self.wfile.write(data)

        def finish_request(self) -> None:
            if self.counted:
                self.counted = False
                server.done()

        def log_message(self, *_: object) -> None:  # quiet
            pass

    return Handler
