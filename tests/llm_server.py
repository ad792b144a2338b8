"""A small real OpenAI-compatible chat server for tests: `POST /v1/chat/completions` answered by a `LocalChat`.

A marker in the last message picks a misbehaving mode: `[slow]` sleeps before answering, `[not-json]` answers a body
that is not JSON, `[no-choices]` answers `{"choices": []}`. The server counts the requests it receives.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from modelrecon.explain.llm import LocalChat

SLOW_SECONDS = 3.0


class ChatServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # a slow handler must not hold up the test's teardown

    def __init__(self, chat: LocalChat) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.chat = chat
        self.requests = 0
        self._count_lock = threading.Lock()
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def count(self) -> None:
        with self._count_lock:
            self.requests += 1

    def __enter__(self) -> ChatServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    server: ChatServer

    def log_message(self, *args) -> None:  # keep the test output clean
        pass

    def _send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (a timeout test)

    def do_POST(self) -> None:
        self.server.count()
        if self.path != "/v1/chat/completions":
            self._send(404, json.dumps({"error": {"message": f"no route {self.path}"}}).encode())
            return
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        last = request["messages"][-1]["content"]
        if "[slow]" in last:
            time.sleep(SLOW_SECONDS)
        if "[not-json]" in last:
            self._send(200, b"<html>this is not json</html>")
            return
        if "[no-choices]" in last:
            self._send(200, b'{"choices": []}')
            return
        answer = self.server.chat.chat(
            request["messages"],
            max_tokens=request.get("max_tokens", 256),
            temperature=request.get("temperature", 0.0),
            logprobs=bool(request.get("logprobs")),
        )
        choice = {"index": 0, "message": {"role": "assistant", "content": answer.text}, "finish_reason": "stop"}
        if answer.logprobs is not None:
            top = [{"token": t, "logprob": v, "bytes": list(t.encode())} for t, v in answer.logprobs.items()]
            first = max(top, key=lambda e: e["logprob"])
            choice["logprobs"] = {"content": [{**first, "top_logprobs": top}]}
        body = {
            "id": f"chatcmpl-{self.server.requests}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": request["model"],
            "choices": [choice],
            "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
        }
        self._send(200, json.dumps(body).encode())
