"""A stub OpenAI-compatible `/v1/completions` server on loopback, for the remote-teacher tests.

It answers a scripted list of failures first (status, headers, body), then well-formed
completions in vLLM's shape (`token_id:N` tokens, `token_ids`, the sampled token first in
each top-logprobs object). Every request is recorded with its arrival time and headers.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Seen:
    at: float
    path: str
    headers: dict[str, str]
    body: dict[str, Any]


@dataclass
class StubTeacher:
    script: list[tuple[int, dict[str, str], str]] = field(default_factory=list)
    seen: list[Seen] = field(default_factory=list)
    echo_authorization: bool = False  # a careless server that puts the key in its error bodies
    tokenizer: Any = None  # for the chat endpoint, which answers token strings and bytes, never ids
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))) or b"{}")
                with stub.lock:
                    received = {k.lower(): v for k, v in self.headers.items()}
                    stub.seen.append(Seen(time.monotonic(), self.path, received, body))
                    scripted = stub.script.pop(0) if stub.script else None
                if scripted is None:
                    answer = fake_chat(body, stub.tokenizer) if self.path.endswith("/chat/completions") \
                        else fake_completion(body)
                    status, headers, text = 200, {"content-type": "application/json"}, json.dumps(answer)
                else:
                    status, headers, text = scripted
                    if stub.echo_authorization:
                        text += f" (you sent {self.headers.get('authorization')})"
                payload = text.encode()
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# Token ids the chat stub answers with: plain words, one non-ASCII word, and the three byte
# fragments of a CJK character (each decodes to U+FFFD alone; only its bytes identify it).
CHAT_ANSWER = [88, 2756, 31394, 241, 115, 40993, 267, 29989, 400]


def fake_chat(body: dict[str, Any], tokenizer: Any) -> dict[str, Any]:
    """OpenAI's chat shape as a hosted API sends it: token strings and their true bytes."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_of = {char: byte for byte, char in bytes_to_unicode().items()}

    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        piece = tokenizer.convert_ids_to_tokens(token_id)
        return {"token": tokenizer.decode([token_id]), "logprob": logprob, "bytes": [byte_of[c] for c in piece]}

    k, ids = body.get("top_logprobs") or 0, CHAT_ANSWER[: body["max_tokens"]]
    content = [{**entry(t, -0.25), "top_logprobs": [entry(t + j, -0.25 - j) for j in range(k)]} for t in ids]
    choice = {"index": 0, "finish_reason": "length", "logprobs": {"content": content},
              "message": {"role": "assistant", "content": tokenizer.decode(ids)}}
    return {"object": "chat.completion", "model": body["model"], "choices": [choice],
            "usage": {"prompt_tokens": 10, "completion_tokens": len(ids)}}


def fake_completion(body: dict[str, Any]) -> dict[str, Any]:
    """A deterministic answer: token i of sample s is 100 + (sum(prompt) + 7 i + s) % 500."""
    prompt, k = body["prompt"], body.get("logprobs") or 0
    choices = []
    for s in range(body.get("n", 1)):
        ids = [100 + (sum(prompt) + 7 * i + s) % 500 for i in range(body["max_tokens"])]
        tops = []
        for token in ids:
            top = {f"token_id:{token}": -0.5}  # sampled first, as vLLM sends it
            top.update({f"token_id:{token + j}": -0.5 - j for j in range(1, k + 1)})
            tops.append(top)
        choices.append({"index": s, "text": "", "finish_reason": "length", "token_ids": ids,
                        "logprobs": {"tokens": [f"token_id:{t}" for t in ids], "token_logprobs": [-0.5] * len(ids),
                                     "top_logprobs": tops}})
    completion = sum(len(c["token_ids"]) for c in choices)
    return {"object": "text_completion", "model": body["model"], "choices": choices,
            "usage": {"prompt_tokens": len(prompt), "completion_tokens": completion}}
