"""The FastAPI app: OpenAI routes, TabbyAPI's own routes, auth, limits, errors, metrics.

Every error is an OpenAI error body (`{"error": {message, type, param, code}}`), validation errors
included (400, naming the field); nothing a client sends can produce a 5xx. Route handlers only map
schemas to the engine (runtime.server.completions) and back.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from pixtral.errors import UserError
from runtime.engine import ContextError
from runtime.server.auth import ADMIN, Keys, presented_keys
from runtime.server.completions import Run, chat_completion, chat_stream, text_completion
from runtime.server.config import ServerConfig
from runtime.server.generation import GenerationCancelled
from runtime.server.metrics import Metrics
from runtime.server.models import InlineLoadRefused, ModelHost, ModelNotFound, NoModelLoaded, QueueFull
from runtime.server.requests import chat_prompt, completion_prompts
from runtime.server.responses import sse
from runtime.server.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    ErrorBody,
    ErrorResponse,
    LoadProgress,
    ModelCard,
    ModelList,
    ModelLoadRequest,
    Props,
    TokenDecodeRequest,
    TokenDecodeResponse,
    TokenEncodeRequest,
    TokenEncodeResponse,
)

log = logging.getLogger("pixtral_exl2.server")
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.kind, self.code, self.param = status, kind, code, param


def error_response(
    status: int, message: str, kind: str, code: str | None = None, param: str | None = None
) -> JSONResponse:
    body = ErrorResponse(error=ErrorBody(message=message, type=kind, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status)


def _user_error(err: UserError) -> APIError:
    if isinstance(err, ModelNotFound):
        return APIError(404, str(err), "invalid_request_error", "model_not_found", "model")
    if isinstance(err, InlineLoadRefused):
        return APIError(401, str(err), "authentication_error", "admin_key_required", "model")
    if isinstance(err, NoModelLoaded):
        return APIError(503, str(err), "service_unavailable", "model_not_loaded")
    if isinstance(err, QueueFull):
        return APIError(429, str(err), "rate_limit_error", "queue_full")
    if isinstance(err, ContextError):
        return APIError(400, str(err), "invalid_request_error", "context_length_exceeded", "messages")
    return APIError(400, str(err), "invalid_request_error", "invalid_value")


UNION_BRANCH = re.compile(r"^(str|int|float|bool|list|dict|none|function-.*|.*\[.*\])$")


def describe_validation(errors: list[dict]) -> tuple[str | None, str]:
    """(field path, one readable line) for pydantic's errors: the deepest field at fault, with the
    alternatives of a union joined ("a valid string or a valid list") instead of one arbitrary branch."""
    if not errors:
        return None, "invalid request"
    if any(e.get("type") == "json_invalid" for e in errors):
        return None, "request body is not valid JSON"
    cleaned = [
        (tuple(p for p in e.get("loc", ()) if p != "body" and not (isinstance(p, str) and UNION_BRANCH.match(p))), e)
        for e in errors
    ]
    depth = max(len(loc) for loc, _ in cleaned)
    deepest = [(loc, e) for loc, e in cleaned if len(loc) == depth]
    where = ".".join(map(str, deepest[0][0]))
    messages = list(dict.fromkeys(str(e.get("msg", "")).removeprefix("Value error, ") for _, e in deepest))
    return where or None, f"{where or 'body'}: {' or '.join(messages)}"


class BodyLimit:
    """Refuse request bodies over `limit` bytes (413): the body is read up to the limit before the app
    sees it, then handed on, so an oversized body never reaches a handler."""

    def __init__(self, app: Any, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(send)
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return await self.app(scope, _replay([message], receive), send)
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.limit:
                return await self._refuse(send)
        await self.app(
            scope, _replay([{"type": "http.request", "body": bytes(body), "more_body": False}], receive), send
        )

    async def _refuse(self, send: Any) -> None:
        response = error_response(
            413,
            f"request body over this server's {self.limit}-byte limit (limits.max_request_bytes)",
            "invalid_request_error",
            "request_too_large",
        )
        await response({"type": "http"}, None, send)


def _replay(messages: list[dict], receive: Any) -> Any:
    """A receive() that first returns `messages`, then what the client sends (its disconnect)."""
    pending = list(messages)

    async def replayed() -> dict:
        return pending.pop(0) if pending else await receive()

    return replayed


def create_app(
    config: ServerConfig, keys: Keys | None, host: ModelHost | None = None, startup_model: str | None = None
) -> FastAPI:
    """The app; `keys` None means auth is disabled (every caller is admin)."""
    host = host or ModelHost(config)
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if startup_model:
            await host.load(startup_model)
        yield
        await host.unload()

    app = FastAPI(title="pixtral-exl2", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.host, app.state.metrics, app.state.config = host, metrics, config

    def permission(request: Request) -> str:
        if keys is None:
            return ADMIN
        level = keys.permission(presented_keys(request.headers))
        if level is None:
            raise APIError(
                401,
                "missing or invalid API key (send x-api-key or Authorization: Bearer)",
                "authentication_error",
                "invalid_api_key",
            )
        return level

    def admin(request: Request) -> str:
        if permission(request) != ADMIN:
            raise APIError(403, "this route needs the admin key", "permission_error", "admin_required")
        return ADMIN

    @app.exception_handler(APIError)
    async def _api_error(_: Request, err: APIError) -> JSONResponse:
        return error_response(err.status, str(err), err.kind, err.code, err.param)

    @app.exception_handler(UserError)
    async def _user(_: Request, err: UserError) -> JSONResponse:
        mapped = _user_error(err)
        return error_response(mapped.status, str(mapped), mapped.kind, mapped.code, mapped.param)

    @app.exception_handler(GenerationCancelled)
    async def _cancelled(_: Request, err: GenerationCancelled) -> JSONResponse:
        return error_response(503, str(err), "service_unavailable", "cancelled")

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        param, message = describe_validation(list(err.errors()))
        return error_response(400, message, "invalid_request_error", "invalid_value", param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, err: StarletteHTTPException) -> JSONResponse:
        return error_response(
            err.status_code, str(err.detail), "invalid_request_error", "not_found" if err.status_code == 404 else None
        )

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, err: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return error_response(500, f"internal error ({type(err).__name__})", "server_error")

    @app.middleware("http")
    async def count(request: Request, call_next: Any) -> Response:
        started = time.monotonic()
        response = await call_next(request)
        route = request.scope.get("route")
        label = getattr(route, "path", "unmatched")
        metrics.requests.labels(label, str(response.status_code)).inc()
        if label.endswith("completions"):
            metrics.latency.labels(label).observe(time.monotonic() - started)
        metrics.queue_depth.set(host.waiting)
        return response

    # --- OpenAI -----------------------------------------------------------------------------------

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request, level: str = Depends(permission)) -> Any:
        loaded = await host.for_request(body.model, level == ADMIN)
        # images and the template, off the loop
        prompt, forced = await asyncio.to_thread(chat_prompt, loaded, body, config)
        run = Run(host, loaded, request, config)
        if body.stream:
            return StreamingResponse(
                chat_stream(run, body, prompt, forced), media_type="text/event-stream", headers=SSE_HEADERS
            )
        return await chat_completion(run, body, prompt, forced)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request, level: str = Depends(permission)) -> Any:
        loaded = await host.for_request(body.model, level == ADMIN)
        prompts = await asyncio.to_thread(completion_prompts, loaded, body, config)
        result = await text_completion(Run(host, loaded, request, config), body, prompts)
        if body.stream:
            return StreamingResponse(result, media_type="text/event-stream", headers=SSE_HEADERS)  # type: ignore[arg-type]
        return result

    @app.get("/v1/models")
    @app.get("/v1/model/list")
    async def models(level: str = Depends(permission)) -> ModelList:
        return ModelList(data=[_card(host, name) for name in host.listed_names(level == ADMIN)])

    # --- TabbyAPI ---------------------------------------------------------------------------------

    @app.get("/v1/model", dependencies=[Depends(permission)])
    async def current_model() -> ModelCard:
        loaded = host.require()
        return _card(host, loaded.name, details=True)

    @app.post("/v1/model/load", dependencies=[Depends(admin)])
    async def load(body: ModelLoadRequest) -> StreamingResponse:
        host.path_of(body.model_name)  # refuse a bad name before the stream starts
        return StreamingResponse(_load_events(host, body), media_type="text/event-stream", headers=SSE_HEADERS)

    @app.post("/v1/model/unload", dependencies=[Depends(admin)])
    async def unload() -> dict:
        await host.unload()
        return {"status": "unloaded"}

    @app.get("/props", dependencies=[Depends(permission)])
    async def props() -> Props:
        loaded = host.require()
        template = loaded.engine.tokenizer.chat_template or ""
        slots = loaded.slots or config.limits.max_concurrent_requests
        return Props(
            total_slots=slots, chat_template=template, default_generation_settings={"n_ctx": loaded.engine.max_seq_len}
        )

    @app.post("/v1/token/encode", dependencies=[Depends(permission)])
    async def encode(body: TokenEncodeRequest) -> TokenEncodeResponse:
        tokenizer = host.require().engine.tokenizer
        if isinstance(body.text, str):
            encode = tokenizer.encode if body.encode_special_tokens else tokenizer.encode_text
            ids = ([tokenizer.bos_id] if body.add_bos_token else []) + encode(body.text)
        else:
            loaded = host.require()
            chat = ChatCompletionRequest(messages=body.text)
            prompt, _ = await asyncio.to_thread(chat_prompt, loaded, chat, config)
            ids = list(prompt.token_ids) if body.add_bos_token else list(prompt.token_ids)[1:]
        return TokenEncodeResponse(tokens=ids, length=len(ids))

    @app.post("/v1/token/decode", dependencies=[Depends(permission)])
    async def decode(body: TokenDecodeRequest) -> TokenDecodeResponse:
        tokenizer = host.require().engine.tokenizer
        if any(not 0 <= t < tokenizer.vocab_size for t in body.tokens):
            raise UserError(f"tokens: ids must be in [0, {tokenizer.vocab_size})")
        return TokenDecodeResponse(text=tokenizer.decode(body.tokens, skip_special_tokens=body.skip_special_tokens))

    @app.get("/v1/auth/permission")
    async def auth_permission(level: str = Depends(permission)) -> dict:
        return {"permission": level}

    @app.get("/health")
    async def health() -> JSONResponse:
        report = host.health()
        return JSONResponse(report.model_dump(), status_code=200 if report.status == "healthy" else 503)

    @app.get("/metrics", dependencies=[Depends(permission)])
    async def prometheus() -> Response:
        metrics.queue_depth.set(host.waiting)
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    return app  # the body limit wraps it: see `server_app`


def _card(host: ModelHost, name: str, details: bool = False) -> ModelCard:
    loaded = host.loaded
    card = ModelCard(id=name, created=loaded.created if loaded and loaded.name == name else 0)
    if loaded and loaded.name == name:
        engine = loaded.engine
        card.parameters = {
            "max_seq_len": engine.max_seq_len,
            "backend": engine.backend_name,
            "use_vision": engine.has_vision,
            "cache_mode": loaded.backend_config.cache_mode,
            "prompt_template": "chat_template.json",
            "attention": engine.attention,
            "batches_requests": engine.batches,
        }
        if details:
            card.parameters["prompt_template_content"] = loaded.engine.tokenizer.chat_template
    return card


async def _load_events(host: ModelHost, body: ModelLoadRequest) -> AsyncIterator[str]:
    """SSE progress of a load, as TabbyAPI streams it."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()

    def progress(done: int, total: int) -> None:
        loop.call_soon_threadsafe(events.put_nowait, LoadProgress(module=done, modules=total, status="processing"))

    task = asyncio.ensure_future(host.load(body.model_name, body, progress))
    try:
        while not task.done() or not events.empty():
            try:
                yield sse(await asyncio.wait_for(events.get(), 0.25))
            except asyncio.TimeoutError:
                continue
        task.result()
        total = host.loaded.engine.num_layers if host.loaded else 0
        yield sse(LoadProgress(module=total, modules=total, status="finished"))
    except UserError as err:
        yield sse(
            {"error": {"message": str(err), "type": "invalid_request_error", "param": "model_name", "code": None}}
        )
    except Exception as err:  # the load failed after the stream began
        yield sse(
            {
                "error": {
                    "message": f"load failed: {type(err).__name__}: {err}",
                    "type": "server_error",
                    "param": None,
                    "code": None,
                }
            }
        )
    yield "data: [DONE]\n\n"


def server_app(config: ServerConfig, keys: Keys | None, startup_model: str | None = None) -> Any:
    """The ASGI app uvicorn serves: the FastAPI app inside the body-size limit."""
    app = create_app(config, keys, startup_model=startup_model)
    limited = BodyLimit(app, config.limits.max_request_bytes)
    limited.state = app.state  # type: ignore[attr-defined]
    limited.fastapi = app  # type: ignore[attr-defined]
    return limited
