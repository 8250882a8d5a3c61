"""Admission control: a bound on concurrent generations with a small waiting queue (excess -> 429), and a
request-body size limit (-> 413) as ASGI middleware, so an oversized body is refused before it is parsed."""

from __future__ import annotations

import asyncio
import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kuberlhf.serving.protocol import error_body


class AdmissionLimiter:
    """``concurrency`` generations run at once; up to ``queue`` more wait for a slot; the rest are refused."""

    def __init__(self, concurrency: int, queue: int) -> None:
        if concurrency < 1 or queue < 0:
            raise ValueError(f"concurrency must be >= 1 and queue >= 0, got {concurrency} and {queue}")
        self.concurrency = concurrency
        self.capacity = concurrency + queue
        self.admitted = 0
        self._slots = asyncio.Semaphore(concurrency)

    def try_admit(self) -> bool:
        """Take a place (running or waiting) if there is one; pair with :meth:`release`."""
        if self.admitted >= self.capacity:
            return False
        self.admitted += 1
        return True

    @property
    def waiting(self) -> int:
        return max(0, self.admitted - self.concurrency)

    async def acquire(self) -> None:
        await self._slots.acquire()

    def release(self, acquired: bool) -> None:
        self.admitted -= 1
        if acquired:
            self._slots.release()


class _BodyTooLarge(Exception):
    pass


class BodySizeLimit:
    """Refuses request bodies over ``max_bytes`` with 413 and an OpenAI-style error: by Content-Length up front,
    and by counting for chunked uploads."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await self._refuse(send, int(length))
            return
        seen = 0
        too_large = False

        async def counting_receive() -> Message:
            nonlocal seen, too_large
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    too_large = True
                    raise _BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            # once the body overflowed, whatever the app answers (FastAPI turns body errors into 400s) is
            # replaced by the 413 below
            if not too_large:
                await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception:
            if not too_large:
                raise
        if too_large:
            await self._refuse(send, seen)

    async def _refuse(self, send: Send, size: int) -> None:
        body = json.dumps(
            error_body(
                f"request body is {size} bytes, over this server's limit of {self.max_bytes} bytes: send a shorter "
                "conversation (or raise `kuberlhf serve --max-request-bytes`)",
                param="messages",
                code="request_too_large",
            )
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})
