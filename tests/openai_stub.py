"""A scriptable loopback server speaking enough of the OpenAI chat-completions API for the SDK."""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

COMPLETIONS_PATH = "/v1/chat/completions"


@dataclass(frozen=True)
class Reply:
    """One scripted behaviour, consumed by one request."""

    content: str | None = ""  # the assistant message text (None: a null content field)
    delay_s: float = 0.0  # wait this long before answering
    status: int = 200  # non-200: an OpenAI-style error body instead of a completion
    echo_key: bool = False  # put the caller's bearer token into the error message (as some servers do)


def answer(text: str) -> Reply:
    return Reply(content=text)


def delayed(text: str, seconds: float) -> Reply:
    return Reply(content=text, delay_s=seconds)


def http_error(status: int = 500, echo_key: bool = False) -> Reply:
    return Reply(status=status, echo_key=echo_key)


def empty() -> Reply:
    return Reply(content="")


def malformed_json() -> Reply:
    return Reply(content='{"rewritten_text": "unterminated')


@dataclass(frozen=True)
class RecordedRequest:
    """What the server saw: path, headers (lower-cased names) and the decoded JSON body."""

    path: str
    headers: dict[str, str]
    body: dict[str, Any]


class StubServer:
    """A ThreadingHTTPServer on 127.0.0.1:<free port>; script it with `push`, inspect `requests`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._script: deque[Reply] = deque()
        self._stopping = threading.Event()
        self.requests: list[RecordedRequest] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> StubServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()  # wakes handlers sleeping in a scripted delay
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def push(self, *replies: Reply) -> None:
        with self._lock:
            self._script.extend(replies)

    def _next(self, request: RecordedRequest) -> Reply | None:
        with self._lock:
            self.requests.append(request)
            return self._script.popleft() if self._script else None

    def _wait(self, seconds: float) -> None:
        self._stopping.wait(seconds)


def _completion(model: str, content: str | None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-stub",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content, "refusal": None},
                "finish_reason": "stop",
                "logprobs": None,
            }
        ],
        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
    }


def _error_body(message: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": "server_error", "param": None, "code": None}}


def _handler_for(stub: StubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - base-class signature
            pass  # keep test output clean

        def do_POST(self) -> None:  # noqa: N802 - http.server naming
            length = int(self.headers.get("content-length", "0"))
            raw = self.rfile.read(length)
            headers = {name.lower(): value for name, value in self.headers.items()}
            body = json.loads(raw) if raw else {}
            reply = stub._next(RecordedRequest(self.path, headers, body))
            if self.path != COMPLETIONS_PATH:
                self._send(404, _error_body(f"no route {self.path}"))
            elif reply is None:
                self._send(500, _error_body("stub: no scripted reply left"))
            else:
                self._play(reply, headers, body)

        def _play(self, reply: Reply, headers: dict[str, str], body: dict[str, Any]) -> None:
            if reply.delay_s:
                stub._wait(reply.delay_s)
            if reply.status != 200:
                token = headers.get("authorization", "").removeprefix("Bearer ")
                message = f"scripted failure for key {token}" if reply.echo_key else "scripted failure"
                self._send(reply.status, _error_body(message))
            else:
                self._send(200, _completion(body.get("model", "stub"), reply.content))

        def _send(self, status: int, payload: dict[str, Any]) -> None:
            data = json.dumps(payload).encode("utf-8")
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (timeout test); nothing left to tell it

    return Handler
