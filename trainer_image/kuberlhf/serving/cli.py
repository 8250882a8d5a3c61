"""`kuberlhf serve` and `kuberlhf chat`. Module import stays light (no torch, no web framework): the heavy
imports happen inside the commands."""

from __future__ import annotations

import logging
from pathlib import Path

import typer

from kuberlhf.contract.stage import ENV_API_KEY, ENV_STORAGE_ENDPOINT


def _fail(message: str, code: int = 2) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def serve(
    model: str = typer.Option(..., "--model", help="Local Hugging Face model directory, or an s3:// / file:// URI."),
    host: str = typer.Option(
        "127.0.0.1", help="Address to listen on (loopback by default; the chat Deployment passes 0.0.0.0)."
    ),
    port: int = typer.Option(8000, help="Port to listen on."),
    max_new_tokens: int = typer.Option(256, min=1, help="Cap on max_tokens of any request (and its default)."),
    storage_endpoint: str | None = typer.Option(
        None, envvar=ENV_STORAGE_ENDPOINT, help="S3 endpoint URL for s3:// models (credentials: AWS_* env)."
    ),
    model_name: str | None = typer.Option(None, help="Model id in /v1/models (default: from the path)."),
    max_concurrency: int = typer.Option(1, min=1, help="Generations that run at once."),
    max_queue: int = typer.Option(8, min=0, help="Requests that may wait for a slot; more get 429."),
    max_request_bytes: int = typer.Option(1 << 20, min=1024, help="Largest request body; larger get 413."),
    cache_dir: Path | None = typer.Option(None, help="Where s3:// models are downloaded (default ~/.cache/kuberlhf)."),
    device: str | None = typer.Option(None, help="torch device (default: cuda when available, else cpu)."),
    log_level: str = typer.Option("info", help="uvicorn log level."),
    limit_connections: int = typer.Option(64, min=1, help="Open connections at most; requests beyond get 503."),
    keep_alive_timeout: float = typer.Option(5.0, min=0.1, help="Seconds an idle keep-alive connection stays open."),
    header_timeout: float = typer.Option(10.0, min=0.1, help="Seconds a connection has to send a request's headers."),
    body_timeout: float = typer.Option(30.0, min=0.1, help="Seconds a request has to send its body after the headers."),
) -> None:
    """Serve the model over an OpenAI-compatible HTTP API (/v1/chat/completions), with a chat page at /."""
    import os

    import uvicorn

    from kuberlhf.serving.app import ServeSettings, create_app
    from kuberlhf.serving.connections import ConnectionBounds, bounded_protocol
    from kuberlhf.serving.model_source import ModelSourceError, check_hf_model_dir, is_uri, model_display_name

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not is_uri(model):
        try:  # a wrong local path is a usage error: say so before starting anything
            check_hf_model_dir(Path(model).expanduser())
        except ModelSourceError as exc:
            raise _fail(str(exc)) from None
    settings = ServeSettings(
        model_name=model_name or model_display_name(model),
        max_new_tokens=max_new_tokens,
        max_concurrency=max_concurrency,
        max_queue=max_queue,
        max_request_bytes=max_request_bytes,
        api_key=os.environ.get(ENV_API_KEY) or None,
    )

    def load() -> object:
        from kuberlhf.serving.model_source import resolve_model

        # download and check first: a bad URI fails in seconds, before torch is imported
        model_dir = resolve_model(model, endpoint=storage_endpoint, cache_dir=cache_dir)
        from kuberlhf.serving.engine import ChatEngine

        return ChatEngine(model_dir, device=device)

    server: uvicorn.Server | None = None

    def on_load_failure(exc: BaseException) -> None:
        if server is not None:
            server.should_exit = True  # a pod that cannot load its model should restart, not idle unready

    app = create_app(settings, load, on_load_failure)
    bounds = ConnectionBounds(limit_connections, keep_alive_timeout, header_timeout, body_timeout)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        timeout_graceful_shutdown=10,
        http=bounded_protocol(bounds),
        limit_concurrency=bounds.limit_connections,
        timeout_keep_alive=bounds.keep_alive_timeout,
    )
    server = uvicorn.Server(config)
    typer.echo(
        f"serving {model} as '{settings.model_name}' on http://{host}:{port} (chat page at /, API at /v1"
        f"{', API key required' if settings.api_key else ''})",
        err=True,
    )
    server.run()
    if app.state.load_error:
        raise _fail(f"the model failed to load: {app.state.load_error}", 1)


def chat(
    model: str | None = typer.Option(None, "--model", help="Local model directory or s3:// / file:// URI."),
    endpoint: str | None = typer.Option(None, "--endpoint", help="URL of a running `kuberlhf serve`."),
    message: list[str] | None = typer.Option(
        None, "--message", "-m", help="Ask this (repeatable: one conversation), print the answers and exit."
    ),
    max_new_tokens: int = typer.Option(128, min=1, help="Most tokens per answer."),
    temperature: float = typer.Option(0.7, min=0.0, max=2.0, help="Sampling temperature (0 = greedy)."),
    top_p: float = typer.Option(0.9, min=0.01, max=1.0, help="Nucleus sampling mass."),
    seed: int | None = typer.Option(None, help="Sampling seed, for repeatable answers."),
    storage_endpoint: str | None = typer.Option(
        None, envvar=ENV_STORAGE_ENDPOINT, help="S3 endpoint for s3:// models."
    ),
    device: str | None = typer.Option(None, help="torch device for --model (default: cuda when available)."),
) -> None:
    """Chat in the terminal with a model (in process) or a server; `clear` resets, `quit` leaves."""
    from kuberlhf.serving.params import GenerationParams
    from kuberlhf.serving.repl import ChatBackendError, EndpointBackend, LocalBackend, run_messages, run_repl

    if (model is None) == (endpoint is None):
        raise _fail("pass exactly one of --model DIR_OR_URI (load it here) or --endpoint URL (a running server)")
    params = GenerationParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    if model is not None:
        from kuberlhf.serving.model_source import ModelSourceError, resolve_model

        typer.echo(f"loading {model} ...", err=True)
        try:
            model_dir = resolve_model(model, endpoint=storage_endpoint)
        except ModelSourceError as exc:
            raise _fail(str(exc)) from None
        from transformers.utils import logging as hf_logging

        from kuberlhf.serving.engine import ChatEngine

        hf_logging.disable_progress_bar()  # a loading bar per start is noise in a chat
        backend = LocalBackend(ChatEngine(model_dir, device=device))
        banner = f"Chatting with {model}."
    else:
        try:
            backend = EndpointBackend(endpoint)
        except ChatBackendError as exc:
            raise _fail(str(exc)) from None
        banner = f"Chatting with '{backend.model}' at {endpoint}."
    if message:
        raise typer.Exit(run_messages(backend, message, params))
    raise typer.Exit(run_repl(backend, params, banner=banner))


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
    app.command("chat")(chat)
