"""Connection bounds of `kuberlhf serve`: uvicorn's h11 protocol with read deadlines.

uvicorn closes idle keep-alive connections (``timeout_keep_alive``) and answers 503 past ``limit_concurrency``
connections, but it waits forever for a fresh connection's first bytes, for the rest of trickled headers and
for a partial body. Here each connection must deliver a request's headers within ``header_timeout`` seconds of
connecting (or of its first byte after a response) and the body within ``body_timeout`` of the headers;
otherwise it is closed. Generation time is not bounded here: it is bounded by ``max_tokens``."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


@dataclass(frozen=True)
class ConnectionBounds:
    limit_connections: int = 64  # uvicorn limit_concurrency: more connections get 503
    keep_alive_timeout: float = 5.0
    header_timeout: float = 10.0
    body_timeout: float = 30.0


def bounded_protocol(bounds: ConnectionBounds) -> type[asyncio.Protocol]:
    """An H11Protocol class enforcing ``bounds``' header and body deadlines (uvicorn's ``http=`` takes a class)."""

    class BoundedH11Protocol(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None
        _phase: object = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm(h11.IDLE)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._follow()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._follow()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _follow(self) -> None:
            state = self.conn.their_state
            if state is h11.IDLE and self.timeout_keep_alive_task is not None:
                self._disarm()  # between requests: uvicorn's keep-alive timer runs until the next byte
            elif state in (h11.IDLE, h11.SEND_BODY):
                if self._phase is not state:
                    self._arm(state)
            else:
                self._disarm()

        def _arm(self, state: object) -> None:
            self._disarm()
            self._phase = state
            delay = bounds.header_timeout if state is h11.IDLE else bounds.body_timeout
            self._deadline = self.loop.call_later(delay, self._expired, state)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            self._deadline = None
            self._phase = None

        def _expired(self, state: object) -> None:
            if self.conn.their_state is state and not self.transport.is_closing():
                what = "headers" if state is h11.IDLE else "body"
                self.logger.info("closing a connection that did not send its request %s in time", what)
                self.transport.close()

    return BoundedH11Protocol
