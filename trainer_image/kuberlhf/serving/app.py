"""The OpenAI-compatible chat server (FastAPI). The model loads in the background at startup: `/healthz`
answers at once (process up), `/readyz` turns 200 when the model is loaded; chat requests before that get 503."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sse_starlette import EventSourceResponse
from starlette.concurrency import iterate_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from kuberlhf.contract.stage import ENV_API_KEY
from kuberlhf.serving.limits import AdmissionLimiter, BodySizeLimit
from kuberlhf.serving.metrics import ServeMetrics
from kuberlhf.serving.openapi import install_openapi
from kuberlhf.serving.params import GenerationParams, InvalidParamError, PromptTooLongError
from kuberlhf.serving.protocol import (
    DROPPED_TURNS_HEADER,
    MAX_STOP_SEQUENCES,
    ChatCompletionRequest,
    chunk_object,
    completion_object,
    error_body,
    logprobs_object,
    model_list,
    model_object,
    usage_object,
    validation_param,
)

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"


@dataclass(frozen=True)
class ServeSettings:
    model_name: str
    max_new_tokens: int = 256
    max_concurrency: int = 4
    max_queue: int = 16
    max_request_bytes: int = 1 << 20
    api_key: str | None = None


class APIError(Exception):
    """An error answered with OpenAI's error body."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = error_body(message, type_, param, code)
        self.headers = headers


def _error_response(status: int, body: dict, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(body, status_code=status, headers=headers)


def create_app(
    settings: ServeSettings,
    load_engine: Callable[[], Any],
    on_load_failure: Callable[[BaseException], None] | None = None,
) -> FastAPI:
    """The app. ``load_engine`` (blocking; run in a thread at startup) returns an object with
    ``start(turns, GenerationParams) -> AnswerStream`` (:class:`kuberlhf.serving.engine.ChatEngine`)."""
    metrics = ServeMetrics()
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.limiter = AdmissionLimiter(settings.max_concurrency, settings.max_queue)
        task = asyncio.create_task(_load(app))
        yield
        task.cancel()

    async def _load(app: FastAPI) -> None:
        t0 = time.monotonic()
        try:
            app.state.engine = await asyncio.to_thread(load_engine)
        except Exception as exc:  # noqa: BLE001 - reported on /readyz and to the CLI, which exits non-zero
            log.error("model failed to load: %s", exc)
            app.state.load_error = str(exc)
            if on_load_failure is not None:
                on_load_failure(exc)
            return
        metrics.model_ready.set(1)
        log.info("model %s ready after %.1f s", settings.model_name, time.monotonic() - t0)

    app = FastAPI(title="kuberlhf chat", lifespan=lifespan, docs_url=None, redoc_url=None)
    install_openapi(
        app,
        settings.max_new_tokens,
        auth=bool(settings.api_key),
        vocab=lambda: getattr(app.state.engine, "vocab_size", None),
    )
    app.state.engine = None
    app.state.load_error = None
    app.state.metrics = metrics
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_request_bytes)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    # --- errors: every 4xx/5xx carries OpenAI's {"error": {...}} body ---------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return _error_response(exc.status, exc.body, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI answers 422 with its own shape; OpenAI answers 400 naming the parameter
        errors = exc.errors()
        # a failed check of ours (e.g. a lone surrogate) says more than the union branch that failed beside it
        first = next((e for e in errors if e.get("type") == "value_error"), errors[0] if errors else None)
        first = first or {"loc": (), "msg": "invalid request"}
        if first.get("type") == "json_invalid":
            return _error_response(400, error_body(f"request body is not valid JSON: {first.get('msg')}"))
        param = validation_param(first.get("loc", ()))
        where = f"'{param}'" if param else "request body"
        message = f"invalid value for {where}: {first.get('msg')}"
        if len(exc.errors()) > 1:
            message += f" (and {len(exc.errors()) - 1} more problem(s))"
        return _error_response(400, error_body(message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = str(exc.detail)
        if exc.status_code == 404:
            message = f"Unknown request URL: {request.method} {request.url.path}"
        return _error_response(exc.status_code, error_body(message), getattr(exc, "headers", None))

    @app.middleware("http")
    async def _count(request: Request, call_next: Callable) -> Response:
        try:
            response = await call_next(request)
        except Exception:
            log.exception("unhandled error on %s", request.url.path)
            response = _error_response(500, error_body("internal server error", "server_error"))
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        metrics.requests.labels(path, request.method, str(response.status_code)).inc()
        return response

    def _check_key(request: Request) -> None:
        if not settings.api_key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), settings.api_key.encode()):
            metrics.rejected.labels("auth").inc()
            raise APIError(
                401,
                "Incorrect or missing API key: send `Authorization: Bearer <key>` with the key this server was "
                f"started with ({ENV_API_KEY})",
                code="invalid_api_key",
            )

    def _engine(app: FastAPI) -> Any:
        if app.state.engine is None:
            metrics.rejected.labels("not_ready").inc()
            if app.state.load_error:
                raise APIError(
                    503, f"the model failed to load: {app.state.load_error}", "server_error", code="model_load_failed"
                )
            raise APIError(
                503,
                "the model is still loading: retry when /readyz answers 200",
                "server_error",
                code="model_not_ready",
                headers={"Retry-After": "5"},
            )
        return app.state.engine

    # --- probes, metrics, page ------------------------------------------------------------------------------
    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(request: Request) -> JSONResponse:
        if request.app.state.engine is not None:
            return JSONResponse({"status": "ready", "model": settings.model_name})
        if request.app.state.load_error:
            return JSONResponse({"status": "failed", "error": request.app.state.load_error}, status_code=503)
        return JSONResponse({"status": "loading"}, status_code=503)

    @app.get("/metrics")
    async def prometheus_metrics(request: Request) -> Response:
        # with a key, the metrics are the key holder's too (Prometheus sends it as a bearer token, e.g. a
        # ServiceMonitor's bearerTokenSecret); the probes stay open for the kubelet
        _check_key(request)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-store"})

    # --- OpenAI API -----------------------------------------------------------------------------------------
    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        _check_key(request)
        return model_list(settings.model_name, created)

    @app.get("/v1/models/{model}")
    async def model(request: Request, model: str) -> dict:
        _check_key(request)
        if model != settings.model_name:
            raise APIError(
                404,
                f"The model '{model}' does not exist: this server serves '{settings.model_name}'",
                param="model",
                code="model_not_found",
            )
        return model_object(settings.model_name, created)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: ChatCompletionRequest) -> Response:
        _check_key(request)
        params, turns = _validate(body)
        engine = _engine(request.app)
        limiter: AdmissionLimiter = request.app.state.limiter
        if not limiter.try_admit():
            metrics.rejected.labels("busy").inc()
            raise APIError(
                429,
                f"the server is busy: {limiter.concurrency} generations running and the queue is full; retry shortly",
                "rate_limit_exceeded",
                code="rate_limit_exceeded",
                headers={"Retry-After": "1"},
            )
        acquired = False
        try:
            stream = _start(engine, turns, params)
            metrics.waiting.set(limiter.waiting)
            await limiter.acquire()
            acquired = True
            metrics.waiting.set(limiter.waiting)
        except BaseException:
            limiter.release(acquired)
            raise
        t0 = time.monotonic()
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        now = int(time.time())
        headers = {DROPPED_TURNS_HEADER: str(stream.usage.dropped_turns)} if stream.usage.dropped_turns else None
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return EventSourceResponse(
                _events(stream, completion_id, now, include_usage, limiter, t0),
                sep="\n",
                ping=15,
                headers={"Cache-Control": "no-store", **(headers or {})},
            )
        metrics.in_flight.inc()
        generation = asyncio.ensure_future(asyncio.to_thread(stream.text))
        gone = asyncio.ensure_future(_client_gone(request))
        try:
            await asyncio.wait({generation, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not generation.done():
                # the client left (closed the connection or timed out): free the slot instead of finishing
                stream.cancel()
                log.info("client went away: generation %s cancelled", completion_id)
            text = await generation
        finally:
            gone.cancel()
            stream.cancel()
            metrics.in_flight.dec()
            limiter.release(acquired)
        _account(stream, "false", t0)
        u = stream.usage
        return JSONResponse(
            completion_object(
                completion_id,
                now,
                settings.model_name,
                text,
                u.finish_reason or "stop",
                u.prompt_tokens,
                u.completion_tokens,
                logprobs_object(u.logprobs) if stream.params.logprobs else None,
            ),
            headers=headers,
        )

    async def _client_gone(request: Request) -> None:
        # after the body, the next ASGI message is the disconnect (uvicorn sends it when the socket closes)
        while (await request.receive())["type"] != "http.disconnect":
            pass

    def _validate(body: ChatCompletionRequest) -> tuple[Any, list[tuple[str, str]]]:
        if body.n is not None and body.n > 1:
            raise APIError(
                400,
                f"n={body.n} is not supported: this server returns one choice per request; "
                "send n=1 (or several requests)",
                param="n",
            )
        refused = body.unsupported_field()
        if refused is not None:
            raise APIError(400, refused[1], param=refused[0], code="unsupported_parameter")
        if body.model != settings.model_name:
            raise APIError(
                404,
                f"The model '{body.model}' does not exist: this server serves '{settings.model_name}' (see /v1/models)",
                param="model",
                code="model_not_found",
            )
        stops = body.stop_list()
        if len(stops) > MAX_STOP_SEQUENCES:
            raise APIError(
                400, f"'stop' has {len(stops)} sequences: at most {MAX_STOP_SEQUENCES} are allowed", param="stop"
            )
        if not any(m.role == "user" for m in body.messages):
            raise APIError(
                400, '\'messages\' has no user message: add at least one {"role": "user", ...}', param="messages"
            )
        requested = body.requested_max_tokens()
        if requested is not None and requested > settings.max_new_tokens:
            # as OpenAI answers a max_tokens over the model's limit; the operator's cap is --max-new-tokens
            name = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
            raise APIError(
                400,
                f"'{name}' is too large: {requested}. This server generates at most {settings.max_new_tokens} "
                f"completion tokens per request (kuberlhf serve --max-new-tokens): send {name} <= "
                f"{settings.max_new_tokens}",
                param=name,
                code="invalid_value",
            )
        params = GenerationParams(
            max_new_tokens=settings.max_new_tokens if requested is None else requested,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            stop=tuple(stops),
            seed=body.seed,
            presence_penalty=body.presence_penalty or 0.0,
            frequency_penalty=body.frequency_penalty or 0.0,
            logit_bias=tuple((int(k), float(v)) for k, v in (body.logit_bias or {}).items()),
            # top_logprobs implies logprobs (OpenAI refuses it alone; answering with what was asked is as honest)
            logprobs=bool(body.logprobs or body.top_logprobs),
            top_logprobs=body.top_logprobs or 0,
        )
        return params, [(m.role, m.text()) for m in body.messages]

    def _start(engine: Any, turns: list[tuple[str, str]], params: Any) -> Any:
        try:
            return engine.start(turns, params)
        except PromptTooLongError as exc:
            raise APIError(400, str(exc), param="messages", code="context_length_exceeded") from exc
        except InvalidParamError as exc:
            raise APIError(400, str(exc), param=exc.param, code="invalid_value") from exc
        except ValueError as exc:
            raise APIError(400, str(exc), param="messages") from exc

    def _account(stream: Any, streamed: str, t0: float) -> None:
        u = stream.usage
        metrics.completions.labels(streamed, u.finish_reason or "cancelled").inc()
        metrics.prompt_tokens.inc(u.prompt_tokens)
        metrics.completion_tokens.inc(u.completion_tokens)
        metrics.latency.labels(streamed).observe(time.monotonic() - t0)

    async def _events(
        stream: Any, completion_id: str, now: int, include_usage: bool, limiter: AdmissionLimiter, t0: float
    ) -> AsyncIterator[dict]:
        def event(obj: dict | str) -> dict:
            return {"data": obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False, separators=(",", ":"))}

        name = settings.model_name
        metrics.in_flight.inc()
        try:
            yield event(
                chunk_object(completion_id, now, name, {"role": "assistant", "content": ""}, with_usage=include_usage)
            )
            first = True
            sent = 0
            try:
                async for piece in iterate_in_threadpool(iter(stream)):
                    if first:
                        metrics.first_token.observe(time.monotonic() - t0)
                        first = False
                    sent += len(piece)
                    lp = logprobs_object(stream.take_logprobs(sent)) if stream.params.logprobs else None
                    yield event(
                        chunk_object(
                            completion_id, now, name, {"content": piece}, with_usage=include_usage, logprobs=lp
                        )
                    )
            except RuntimeError as exc:
                # headers are sent: report in-band, as OpenAI does for mid-stream failures
                yield event(error_body(str(exc), "server_error"))
                return
            yield event(
                chunk_object(
                    completion_id, now, name, {}, stream.usage.finish_reason or "stop", with_usage=include_usage
                )
            )
            if include_usage:
                u = stream.usage
                yield event(
                    chunk_object(
                        completion_id, now, name, None, usage=usage_object(u.prompt_tokens, u.completion_tokens)
                    )
                )
            yield event("[DONE]")
            _account(stream, "true", t0)
        finally:
            stream.cancel()
            metrics.in_flight.dec()
            limiter.release(True)

    return app
