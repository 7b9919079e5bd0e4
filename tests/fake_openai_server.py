"""A fake OpenAI-compatible teacher on loopback, for fault injection and exact call accounting.

It speaks the real protocol (chat completions, files, batches) and behaves like a provider that
honours `Idempotency-Key`: a key it has answered before is replayed, not billed again. `charged`
counts billed answers, so tests can assert that no paid call was lost or made twice.

Faults are queued with `server.faults.extend([...])`; each incoming chat request takes the next
one: "429" (with Retry-After), "500", "503", "timeout" (answers and bills, but only after
`hang_s`), "malformed" (bills, then sends a truncated JSON body). Markers inside an input steer
the answer: `[[answers:a,b,c]]` (the k-th billed call for that input answers the k-th item),
`[[garbage]]` (an answer that is no label), `[[fail]]` (always HTTP 500).

Structured output: `scripted[text] = [answer, ...]` answers any request whose last message contains
`text` with the k-th item on its k-th billed call (JSON records, long texts: anything with commas);
`response_formats` holds the `response_format` of every chat request (None when absent), and
`refuse_response_format = True` answers a request carrying one with HTTP 400 naming it, unbilled,
as endpoints without structured output do.

Paraphrase requests (stillroom's `curate augment` prompt) get a JSON array of k rewrites; in the
input, `[[para:a|b|c]]` makes the array exactly ["a", "b", "c"] (an item `x*500` is x 500 times)
and `[[garbage]]` makes it prose.
`prompts` keeps the last user message of every chat request, to check what was sent.

Run standalone for benchmarks: `python tests/fake_openai_server.py --latency-ms 200 [--lean]`
prints `ready PORT` once it listens. `--lean` serves chat completions only, from a bare asyncio
HTTP/1.1 server, so that a throughput benchmark measures the client rather than this server.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import email.parser
import itertools
import json
import math
import re
import socket
import sys
import threading
import time

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

KEYWORDS = {
    "billing": ["charge", "invoice", "card", "payment", "bill", "refund"],
    "shipping": ["package", "delivery", "tracking", "courier", "parcel", "shipment"],
}
_MARK = re.compile(r"\[\[answers:([^\]]*)\]\]")
_PARA_ASK = re.compile(r"^Rewrite the message below in (\d+) different ways")
_PARA = re.compile(r"\[\[para:([^\]]*)\]\]")
_REWRITES = ["Quick question: {t}", "{t} Can you help?", "Hello, {t}", "Please advise: {t}", "{t} Thanks!"]


def _error(status: int, message: str, kind: str = "server_error", headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": None}}, status, headers=headers)


def message_of(content: str) -> str:
    """The input inside stillroom's default teacher prompt (the label list would fool keywords)."""
    if "Message: " in content:
        content = content.rsplit("Message: ", 1)[1]
        content = content.split("\n\nAnswer with", 1)[0]
    return content


class FakeOpenAI:
    def __init__(self, latency_s: float = 0.0, hang_s: float = 3.0, retry_after: str = "1",
                 batch_polls: int = 2, create_batch_delay_s: float = 0.0):
        self.latency_s = latency_s
        self.hang_s = hang_s
        self.retry_after = retry_after
        self.batch_polls = batch_polls  # polls of a batch before it completes
        self.create_batch_delay_s = create_batch_delay_s
        self.faults: collections.deque[str] = collections.deque()
        self.requests = 0  # every chat request, whatever happened to it
        self.charged = 0  # billed answers (live and batch)
        self.charged_by_key: collections.Counter = collections.Counter()
        self.replayed = 0
        self.faults_served: collections.Counter = collections.Counter()
        self.fault_keys: dict[str, list] = collections.defaultdict(list)  # fault -> keys it hit
        self.closing = False
        self.refuse_with: int | None = None  # answer every chat request with this status (401: bad key)
        self.keyless = 0  # chat requests without an Idempotency-Key
        self.seen_at: dict[str, list[float]] = collections.defaultdict(list)  # key -> request times
        self.temperatures: list = []
        self.response_formats: list = []  # the response_format of every chat request (None: none sent)
        self.refuse_response_format = False
        self.scripted: dict[str, list[str]] = {}
        self.batch_bodies: list[dict] = []  # the request bodies of every batch line
        self.prompts: list[str] = []
        self.received_create_batch = threading.Event()
        self._stored: dict[str, dict] = {}
        self._per_text: collections.Counter = collections.Counter()
        self._ids = itertools.count(1)
        self.files: dict[str, dict] = {}
        self.batches: dict[str, dict] = {}
        self._batch_keys: dict[str, str] = {}
        self._polls: collections.Counter = collections.Counter()
        self.batches_created = 0
        self.app = Starlette(routes=[
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/files", self.upload, methods=["POST"]),
            Route("/v1/files/{file_id}/content", self.file_content, methods=["GET"]),
            Route("/v1/batches", self.create_batch, methods=["POST"]),
            Route("/v1/batches", self.list_batches, methods=["GET"]),
            Route("/v1/batches/{batch_id}", self.get_batch, methods=["GET"]),
        ])

    # ---- answers ----

    def paraphrases(self, k: int, text: str) -> str:
        marked = _PARA.search(text)
        if marked:  # "word*500" stands for the word 500 times (an over-long paraphrase)
            items = [re.sub(r"^(.*)\*(\d+)$", lambda m: m.group(1) * int(m.group(2)), item)
                     for item in marked.group(1).split("|")]
            return json.dumps(items)
        if "[[garbage]]" in text:
            return "Sure! Here are some ways to say it, I hope they help."
        return json.dumps([_REWRITES[i % len(_REWRITES)].format(t=text) for i in range(k)])

    def answer(self, content: str) -> str:
        for key, answers in self.scripted.items():
            if key in content:
                nth = self._per_text[key]
                self._per_text[key] += 1
                return answers[nth % len(answers)]
        text = message_of(content)
        asked = _PARA_ASK.match(content)
        if asked:
            return self.paraphrases(int(asked.group(1)), text)
        nth = self._per_text[text]
        self._per_text[text] += 1
        marked = _MARK.search(text)
        if marked:
            answers = [a.strip() for a in marked.group(1).split(",")]
            return answers[nth % len(answers)]
        if "[[garbage]]" in text:
            return "I am not sure what you mean"
        low = text.lower()
        for label, words in KEYWORDS.items():
            if any(w in low for w in words):
                return label
        return "other"

    def completion(self, body: dict) -> dict:
        """Bill one answer to a chat request body."""
        messages = body.get("messages") or []
        content = "\n".join(str(m.get("content", "")) for m in messages if isinstance(m, dict))
        text = self.answer(str(messages[-1].get("content", "")) if messages else "")
        self.charged += 1
        return {
            "id": f"chatcmpl-{next(self._ids)}", "object": "chat.completion", "created": int(time.time()),
            "model": body.get("model", "fake"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": math.ceil(len(content) / 4), "completion_tokens": max(1, len(text.split())),
                      "total_tokens": math.ceil(len(content) / 4) + max(1, len(text.split()))},
        }

    # ---- chat ----

    async def chat(self, request: Request):
        self.requests += 1
        key = request.headers.get("idempotency-key")
        if key:
            self.seen_at[key].append(time.monotonic())
        else:
            self.keyless += 1
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "body is not JSON", "invalid_request_error")
        self.temperatures.append(body.get("temperature"))
        self.response_formats.append(body.get("response_format"))
        if self.refuse_with:
            return _error(self.refuse_with, "Incorrect API key provided", "invalid_request_error")
        if key and key in self._stored:
            self.replayed += 1
            return JSONResponse(self._stored[key], headers={"Idempotent-Replayed": "true"})
        if self.refuse_response_format and body.get("response_format") is not None:
            return _error(400, "Invalid parameter: 'response_format' of type 'json_schema' is not supported "
                               "with this model.", "invalid_request_error")
        last = str((body.get("messages") or [{}])[-1].get("content", ""))
        self.prompts.append(last)
        if "[[fail]]" in last:
            return _error(500, "this input always fails")
        fault = self.faults.popleft() if self.faults else None
        if fault:
            self.faults_served[fault] += 1
            self.fault_keys[fault].append(key)
        if fault == "429":
            return _error(429, "rate limit reached", "rate_limit_exceeded", {"Retry-After": self.retry_after})
        if fault in ("500", "503"):
            return _error(int(fault), "the server had an error")
        answer = self.completion(body)  # billed from here on
        if key:
            self.charged_by_key[key] += 1
            self._stored[key] = answer
        if fault == "timeout":
            await self._sleep(self.hang_s)
        elif self.latency_s:
            await asyncio.sleep(self.latency_s)
        if fault == "malformed":
            return Response(b'{"id": "chatcmpl-x", "choices": [{"message": {"content": "bill', 200,
                            media_type="application/json")
        return JSONResponse(answer)

    async def _sleep(self, seconds: float) -> None:
        """Sleep, but end early when the server shuts down (no cancelled-task noise)."""
        deadline = time.monotonic() + seconds
        while not self.closing and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    # ---- files and batches ----

    async def upload(self, request: Request):
        raw = await request.body()
        header = f"Content-Type: {request.headers['content-type']}\r\n\r\n".encode()
        message = email.parser.BytesParser().parsebytes(header + raw)
        fields, content, filename = {}, b"", "upload"
        for part in message.get_payload():
            name = part.get_param("name", header="content-disposition")
            if part.get_filename():
                filename, content = part.get_filename(), part.get_payload(decode=True)
            else:
                fields[name] = part.get_payload(decode=True).decode()
        file_id = f"file-{next(self._ids)}"
        self.files[file_id] = {"id": file_id, "object": "file", "bytes": len(content), "created_at": int(time.time()),
                               "filename": filename, "purpose": fields.get("purpose", ""), "content": content}
        return JSONResponse({k: v for k, v in self.files[file_id].items() if k != "content"})

    async def file_content(self, request: Request):
        f = self.files.get(request.path_params["file_id"])
        if f is None:
            return _error(404, "no such file", "invalid_request_error")
        return Response(f["content"], media_type="application/octet-stream")

    async def create_batch(self, request: Request):
        body = await request.json()
        key = request.headers.get("idempotency-key")
        self.received_create_batch.set()
        if key and key in self._batch_keys:
            return JSONResponse(self.batches[self._batch_keys[key]])
        if body.get("input_file_id") not in self.files:
            return _error(400, "input_file_id is not an uploaded file", "invalid_request_error")
        batch_id = f"batch_{next(self._ids)}"
        self.batches_created += 1
        self.batches[batch_id] = {
            "id": batch_id, "object": "batch", "endpoint": body.get("endpoint"), "errors": None,
            "input_file_id": body["input_file_id"], "completion_window": body.get("completion_window"),
            "status": "validating", "output_file_id": None, "error_file_id": None,
            "created_at": int(time.time()), "metadata": body.get("metadata"),
            "request_counts": {"total": 0, "completed": 0, "failed": 0},
        }
        if key:
            self._batch_keys[key] = batch_id
        if self.create_batch_delay_s:
            await self._sleep(self.create_batch_delay_s)
        return JSONResponse(self.batches[batch_id])

    async def list_batches(self, request: Request):
        return JSONResponse({"object": "list", "data": list(reversed(self.batches.values())), "has_more": False})

    async def get_batch(self, request: Request):
        batch = self.batches.get(request.path_params["batch_id"])
        if batch is None:
            return _error(404, "no such batch", "invalid_request_error")
        self._polls[batch["id"]] += 1
        if batch["status"] == "validating":
            batch["status"] = "in_progress"
        elif batch["status"] == "in_progress" and self._polls[batch["id"]] >= self.batch_polls:
            self._run_batch(batch)
        return JSONResponse(batch)

    def _run_batch(self, batch: dict) -> None:
        lines = self.files[batch["input_file_id"]]["content"].decode().splitlines()
        out, err = [], []
        for line in filter(None, lines):
            req = json.loads(line)
            self.batch_bodies.append(req["body"])
            last = str(req["body"]["messages"][-1].get("content", ""))
            if "[[fail]]" in last:
                err.append({"id": f"batch_req_{next(self._ids)}", "custom_id": req["custom_id"], "response": None,
                            "error": {"code": "server_error", "message": "this input always fails"}})
                continue
            answer = self.completion(req["body"])
            out.append({"id": f"batch_req_{next(self._ids)}", "custom_id": req["custom_id"],
                        "response": {"status_code": 200, "request_id": answer["id"], "body": answer}, "error": None})
        for name, rows in (("output_file_id", out), ("error_file_id", err)):
            if rows:
                file_id = f"file-{next(self._ids)}"
                content = "".join(json.dumps(r) + "\n" for r in rows).encode()
                self.files[file_id] = {"id": file_id, "object": "file", "bytes": len(content), "purpose": "batch_output",
                                       "filename": f"{batch['id']}_{name}.jsonl", "created_at": int(time.time()),
                                       "content": content}
                batch[name] = file_id
        batch["status"] = "completed"
        batch["request_counts"] = {"total": len(out) + len(err), "completed": len(out), "failed": len(err)}


class FakeServer:
    """`with FakeServer(FakeOpenAI(...)) as s:` serves it on 127.0.0.1:s.port in a thread."""

    def __init__(self, fake: FakeOpenAI, port: int = 0):
        self.fake = fake
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.server = uvicorn.Server(uvicorn.Config(fake.app, log_level="error", timeout_graceful_shutdown=1,
                                                    backlog=2048))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "FakeServer":
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("fake OpenAI server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.fake.closing = True
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


class _LeanChat(asyncio.Protocol):
    """Keep-alive HTTP/1.1 that answers every POST with a chat completion after a fixed delay."""

    def __init__(self, fake: FakeOpenAI):
        self.fake = fake
        self.buffer = b""

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            head, rest = self.buffer.split(b"\r\n\r\n", 1)
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if len(rest) < length:
                return
            body, self.buffer = rest[:length], rest[length:]
            asyncio.get_running_loop().create_task(self.answer(body))

    async def answer(self, body: bytes) -> None:
        self.fake.requests += 1
        payload = json.dumps(self.fake.completion(json.loads(body))).encode()
        await asyncio.sleep(self.fake.latency_s)
        if not self.transport.is_closing():
            self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
                                 + str(len(payload)).encode() + b"\r\n\r\n" + payload)


def serve_lean(fake: FakeOpenAI, port: int) -> None:
    async def run() -> None:
        server = await asyncio.get_running_loop().create_server(lambda: _LeanChat(fake), "127.0.0.1", port,
                                                                backlog=2048)
        print(f"ready {server.sockets[0].getsockname()[1]}", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until stdin closes

    asyncio.run(run())


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description="fake OpenAI-compatible teacher")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--lean", action="store_true", help="chat completions only, minimal HTTP server")
    args = parser.parse_args(argv)
    if args.lean:
        serve_lean(FakeOpenAI(latency_s=args.latency_ms / 1000), args.port)
        return
    with FakeServer(FakeOpenAI(latency_s=args.latency_ms / 1000), args.port) as server:
        print(f"ready {server.port}", flush=True)
        try:
            for line in sys.stdin:  # stops when stdin closes
                if line.strip() == "stats":
                    f = server.fake
                    print(json.dumps({"requests": f.requests, "charged": f.charged, "replayed": f.replayed}), flush=True)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main(sys.argv[1:])
