"""A scripted OpenAI-compatible endpoint for tests and benchmarks.

It stands in for a paid remote provider only where one cannot run here: its latency
and its failure modes (429 with Retry-After, 5xx, invalid answers). Answers are built
from a rule, not a model: ``answer(text) -> class index``. Real scoring is tested
against the real local model (``labelfuse llm-server``).

```python
with StubServer(classes, answer=lambda text: 0, latency_s=0.05, script=["429", "500"]) as stub:
    ...  # point a scorer at stub.base_url; the first two requests fail, then it answers
```

``script`` entries apply to successive requests: ``"429"`` (with ``Retry-After: 1``),
``"429ms"`` (with ``retry-after-ms: 50``), ``"500"``, ``"401"``, ``"badjson"`` (an answer
that fails validation), ``"ok"``. After the script runs out, a request fails with 500 with
probability ``fail_rate`` (seeded), else succeeds.
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
from collections.abc import Callable, Sequence
from typing import Any

from aiohttp import web

from fusion.llm.local import free_port


class StubServer:
    def __init__(
        self,
        classes: Sequence[str],
        answer: Callable[[str], int] = lambda text: 0,
        latency_s: float = 0.0,
        script: Sequence[str] = (),
        logprobs: bool = True,
        prompt_tokens: int | None = None,
        fail_rate: float = 0.0,
        seed: int = 0,
    ):
        self.classes = list(classes)
        self.answer = answer
        self.latency_s = latency_s
        self.script = list(script)
        self.logprobs = logprobs
        self.prompt_tokens = prompt_tokens
        self.fail_rate = fail_rate
        self._rng = random.Random(seed)
        self.requests = 0
        self.failed = 0  # requests answered 500 because of fail_rate
        self.in_flight = 0
        self.max_in_flight = 0
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._runner: web.AppRunner | None = None

    def _next_action(self) -> str:
        with self._lock:
            self.requests += 1
            if self.script:
                return self.script.pop(0)
            if self.fail_rate and self._rng.random() < self.fail_rate:
                self.failed += 1
                return "500"
            return "ok"

    def _completion(self, body: dict[str, Any], action: str) -> dict[str, Any]:
        text = body["messages"][-1]["content"]
        idx = self.answer(text)
        # like a real BPE tokenizer: about 4 bytes a token (never more tokens than bytes)
        pt = self.prompt_tokens or sum(len(m["content"].encode()) for m in body["messages"]) // 4 + 4
        usage = {"prompt_tokens": pt, "completion_tokens": 1, "total_tokens": pt + 1}
        if body.get("response_format"):
            probs = {c: (0.9 if i == idx else 0.05) for i, c in enumerate(self.classes)}
            content = '{"not": "valid"}' if action == "badjson" else json.dumps(probs)
            usage["completion_tokens"] = 20
            message = {"role": "assistant", "content": content}
            choice: dict[str, Any] = {"index": 0, "message": message, "finish_reason": "stop", "logprobs": None}
        else:
            token = self.classes[idx]
            others = [c for i, c in enumerate(self.classes) if i != idx][:3]
            if action == "badjson":  # an off-label answer: no class among the alternatives
                token, others = "Banana", ["The"]
            top = [{"token": token, "logprob": -0.1, "bytes": None}] + [
                {"token": c, "logprob": -3.0, "bytes": None} for c in others
            ]
            lp = {"content": [{"token": token, "logprob": -0.1, "bytes": None, "top_logprobs": top}]}
            message = {"role": "assistant", "content": token}
            choice = {
                "index": 0,
                "message": message,
                "finish_reason": "length",
                "logprobs": lp if self.logprobs else None,
            }
        return {
            "id": f"stub-{self.requests}",
            "object": "chat.completion",
            "created": 0,
            "model": body.get("model", "stub"),
            "choices": [choice],
            "usage": usage,
        }

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        action = self._next_action()
        with self._lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.latency_s:
                await asyncio.sleep(self.latency_s)
            if action == "429":
                return web.json_response(
                    {"error": {"message": "rate limited"}}, status=429, headers={"Retry-After": "1"}
                )
            if action == "429ms":
                return web.json_response(
                    {"error": {"message": "rate limited"}}, status=429, headers={"retry-after-ms": "50"}
                )
            if action == "500":
                return web.json_response({"error": {"message": "server error"}}, status=500)
            if action == "401":
                return web.json_response({"error": {"message": "bad key"}}, status=401)
            return web.json_response(self._completion(body, action))
        finally:
            with self._lock:
                self.in_flight -= 1

    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        self._loop.run_until_complete(site.start())
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self._runner.cleanup())
        self._loop.close()

    def __enter__(self) -> StubServer:
        self._thread = threading.Thread(target=self._run, daemon=True, name="stub-openai")
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("stub server did not start")
        return self

    def __exit__(self, *exc: Any) -> None:
        assert self._loop is not None and self._thread is not None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


def main() -> None:
    """``python tests/stub_llm.py --port P --latency 0.2 --classes a,b,c``: run until killed."""
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--latency", type=float, default=0.0, help="seconds added to every request")
    p.add_argument("--classes", required=True, help="comma-separated class names")
    args = p.parse_args()
    stub = StubServer(args.classes.split(","), latency_s=args.latency)
    stub.port, stub.base_url = args.port, f"http://127.0.0.1:{args.port}/v1"
    with stub:
        print(f"stub OpenAI endpoint at {stub.base_url}", flush=True)
        threading.Event().wait()


if __name__ == "__main__":
    main()
