"""`edge-duet serve`: one :class:`~edge_duet.runtime.assistant.Assistant` behind a local HTTP/WebSocket API.

Routes (the OpenAPI description at ``/openapi.json`` is built from the same limits, see :func:`openapi_spec`)::

    GET  /                    the kiosk page (apps/static/)
    POST /api/frames          a JPEG/PNG frame (raw body, ``Content-Type: image/jpeg|image/png``, ``?t=`` seconds)
    POST /api/questions       {"text": "...", "must_reply": false}
    POST /api/reset | /api/cancel
    POST|DELETE /api/control  take or release the controller lease (one controller, many watchers); a lease taken
                              with ``X-Edge-Duet-Watcher: ID`` (the id in the "hello" event) ends when that
                              WebSocket closes, so a closed tab never locks the next one out
    GET  /api/status | /api/health | /api/frame.jpg | /api/stream.mjpeg
    WS   /api/events          JSON events (see runtime/events.py), a "hello" with the status first

(Over 500 lines: the routes, the checks every request passes and the app wiring are one API surface, described
by one OpenAPI document and tested as one; the model side is runtime/assistant.py.)

Threads: every WebSocket client is a bounded subscription of the assistant (it drops its oldest event when the
client reads slowly); the assistant's worker wakes the client's sender on the event loop with
``call_soon_threadsafe``. Nothing on the model's path awaits a client. Every refusal is a 4xx JSON body ``{"error": code, "message": text}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import io
import ipaddress
import json
import logging
import math
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.websockets import WebSocket, WebSocketDisconnect

from edge_duet.errors import AssistantBusy, AssistantClosed, EdgeDuetError, UsageError
from edge_duet.runtime.assistant import Assistant
from edge_duet.runtime.subscription import Subscription

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
CONTROLLER_HEADER = "x-edge-duet-controller"
WATCHER_HEADER = "x-edge-duet-watcher"
MIN_NETWORK_TOKEN_CHARS = 16
REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-fA-F]+>")  # what str(exc) of PIL and others may embed
CONTROLLER_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1", "[::1]")


@dataclass(frozen=True)
class ServerOptions:
    host: str = "127.0.0.1"
    port: int = 8765
    token: str | None = None  # required unless host is loopback
    max_frame_bytes: int = 4 * 1024 * 1024
    max_frame_side_px: int = 4096
    max_question_chars: int = 500
    max_json_bytes: int = 16 * 1024
    frames_per_s: float = 30.0  # rate limit per client address, token bucket
    frames_burst: int = 60
    posts_per_s: float = 2.0  # questions, reset, cancel, control
    posts_burst: int = 10
    ws_buffer_events: int = 256  # per watcher; the oldest are dropped beyond it
    max_watchers: int = 32
    max_streams: int = 8
    stream_fps: float = 10.0
    stream_max_side_px: int = 960
    controller_lease_s: float = 30.0
    allowed_origins: tuple[str, ...] = ()  # other pages allowed to call the API (same origin always is)


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def host_name(header: str) -> str:
    """The host part of a Host header ("[::1]:8765" -> "[::1]", "localhost:80" -> "localhost")."""
    if header.startswith("["):
        return header.split("]", 1)[0] + "]"
    return header.rsplit(":", 1)[0]


def check_bind(options: ServerOptions) -> None:
    """Refuse to expose the assistant beyond this machine without a token."""
    if is_loopback(options.host):
        return
    if not options.token:
        raise UsageError(
            f"binding to {options.host} exposes the camera and the assistant to the network. Pass --token "
            "(or set EDGE_DUET_TOKEN) so clients must send 'Authorization: Bearer TOKEN', or bind to 127.0.0.1."
        )
    if len(options.token) < MIN_NETWORK_TOKEN_CHARS:
        raise UsageError(
            f"--token has {len(options.token)} characters; on a network interface ({options.host}) it needs at least "
            f"{MIN_NETWORK_TOKEN_CHARS}, or anyone on the network can guess it. Make one with "
            "`openssl rand -hex 16`."
        )


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


def error_response(status: int, code: str, message: str, headers: dict | None = None) -> JSONResponse:
    """Every refusal goes out through here; a Python object repr in a message would mean nothing to a user."""
    message = REPR.sub("the data", message)
    return JSONResponse({"error": code, "message": message}, status_code=status, headers=headers)


class RateLimiter:
    """Token buckets per (client address, bucket name)."""

    def __init__(self) -> None:
        self._buckets: dict[tuple[str, str], tuple[float, float]] = {}

    def take(self, client: str, name: str, rate: float, burst: int) -> float:
        """0 when allowed, else the seconds to wait."""
        now = time.monotonic()
        tokens, last = self._buckets.get((client, name), (float(burst), now))
        tokens = min(float(burst), tokens + (now - last) * rate)
        if tokens < 1.0:
            self._buckets[(client, name)] = (tokens, now)
            return (1.0 - tokens) / rate
        self._buckets[(client, name)] = (tokens - 1.0, now)
        if len(self._buckets) > 4096:  # forget idle clients
            self._buckets = {k: v for k, v in self._buckets.items() if now - v[1] < 60}
        return 0.0


class Watcher:
    """One WebSocket client: its own bounded subscription to the assistant, woken on the event loop."""

    def __init__(self, ident: int, events: Subscription, ready: asyncio.Event):
        self.id = ident
        self.events = events  # the assistant's events and the server's own notices, in order
        self.ready = ready

    def messages(self) -> Iterator[str]:
        """The JSON messages queued now (a slow client's gap comes first, as a "dropped" event)."""
        while (event := self.events.get(timeout=0)) is not None:
            yield json.dumps(event if isinstance(event, dict) else event.to_dict(), ensure_ascii=False)


class Hub:
    """Server state shared by the handlers: watchers, the controller lease, rate limits, the frame encoder."""

    def __init__(self, assistant: Assistant, options: ServerOptions):
        self.assistant = assistant
        self.options = options
        self.watchers: dict[int, Watcher] = {}
        self.limiter = RateLimiter()
        self.controller: tuple[str, float] | None = None  # (id, expires at monotonic)
        self.controller_watcher: int | None = None  # the WebSocket whose closing ends the lease
        self.streams = 0
        self.closing = asyncio.Event()
        self._next_id = 0
        self._jpeg: tuple[int, bytes] | None = None
        self._jpeg_lock = asyncio.Lock()

    def publish(self, event: dict) -> None:
        """A server notice (``control``) to every watcher, after the events already queued for it."""
        for w in self.watchers.values():
            w.events.put(event)

    def new_watcher(self) -> Watcher:
        loop, ready = asyncio.get_running_loop(), asyncio.Event()

        def wake() -> None:  # any thread: never blocks
            try:
                loop.call_soon_threadsafe(ready.set)
            except RuntimeError:  # the loop is closed: the server is gone
                pass

        self._next_id += 1
        w = Watcher(self._next_id, self.assistant.subscribe(self.options.ws_buffer_events, on_ready=wake), ready)
        self.watchers[w.id] = w
        return w

    def controller_id(self) -> str | None:
        if self.controller and self.controller[1] < time.monotonic():
            self.release_control()
        return self.controller[0] if self.controller else None

    def release_control(self) -> None:
        """The lease ends; watchers hear it at once (the kiosk page then claims control)."""
        was = self.controller is not None
        self.controller, self.controller_watcher = None, None
        if was:
            self.publish({"event": "control", "controlled": False})

    async def latest_jpeg(self) -> tuple[int, bytes] | None:
        latest = self.assistant.latest_frame()
        if latest is None:
            return None
        async with self._jpeg_lock:
            if self._jpeg is None or self._jpeg[0] != latest[0]:
                data = await run_in_threadpool(encode_jpeg, latest[1], self.options.stream_max_side_px)
                self._jpeg = (latest[0], data)
            return self._jpeg

    def status(self) -> dict:
        data = self.assistant.status()
        data["server"] = {
            "watchers": [{"id": w.id, "queued": len(w.events), "dropped": w.events.dropped_total}
                         for w in self.watchers.values()],
            "streams": self.streams,
            "controlled": self.controller_id() is not None,
            "owns_source": self.assistant.source is not None,
            "auth": self.options.token is not None,
            "limits": {
                "max_frame_bytes": self.options.max_frame_bytes,
                "max_question_chars": self.options.max_question_chars,
            },
        }
        return data


def encode_jpeg(bgr, max_side: int, quality: int = 80) -> bytes:
    from PIL import Image

    img = Image.fromarray(bgr[..., ::-1])
    if max(img.size) > max_side:
        img.thumbnail((max_side, max_side))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def decode_image(body: bytes, content_type: str, max_side: int):
    """JPEG/PNG bytes -> (H, W, 3) uint8 RGB. Any failure is the client's input: ApiError 422."""
    import numpy as np
    from PIL import Image

    expected = {"image/jpeg": "JPEG", "image/png": "PNG"}[content_type]
    try:
        img = Image.open(io.BytesIO(body))
        if img.format != expected:
            raise ApiError(422, "bad_image", f"the body is {img.format or 'not an image'}, not {expected} as its Content-Type says.")
        w, h = img.size
        if not (1 <= w <= max_side and 1 <= h <= max_side):
            raise ApiError(422, "bad_image", f"image size {w}x{h} is outside 1..{max_side} px per side.")
        return np.asarray(img.convert("RGB"), dtype=np.uint8)
    except ApiError:
        raise
    except Exception as exc:  # PIL raises many types for hostile input (OSError, SyntaxError, ValueError, ...)
        from PIL import UnidentifiedImageError

        why = "not an image PIL recognises" if isinstance(exc, UnidentifiedImageError) else REPR.sub("it", str(exc))
        raise ApiError(422, "bad_image", f"the {expected} body could not be decoded ({why}): send a complete "
                                         f"{expected} file.") from None


# ------------------------------------------------------------------ request checks
def _hub(conn: Request | WebSocket) -> Hub:
    return conn.app.state.hub


def check_access(conn: Request | WebSocket) -> None:
    """Host (DNS rebinding), Origin (other pages in the browser) and bearer token checks."""
    hub = _hub(conn)
    opts = hub.options
    host = host_name(conn.headers.get("host") or "")
    if is_loopback(opts.host) and not is_loopback(host):
        raise ApiError(403, "bad_host", f"Host {host!r} is not allowed: this server only answers to 127.0.0.1 / localhost.")
    origin = conn.headers.get("origin")
    if origin is not None and origin not in opts.allowed_origins:
        if urlsplit(origin).netloc != conn.headers.get("host"):
            raise ApiError(403, "bad_origin", f"requests from pages at {origin} are not allowed (same origin only).")
    if opts.token:
        auth = conn.headers.get("authorization", "")
        given = auth[7:] if auth[:7].lower() == "bearer " else conn.query_params.get("access_token", "")
        if not hmac.compare_digest(given.encode(), opts.token.encode()):
            raise ApiError(401, "unauthorized", "a valid 'Authorization: Bearer TOKEN' header is required.",
                           {"WWW-Authenticate": 'Bearer realm="edge-duet"'})


def controller_header(request: Request) -> str:
    value = request.headers.get(CONTROLLER_HEADER)
    if value is None:
        return ""
    if not CONTROLLER_ID.fullmatch(value):
        raise ApiError(400, "bad_controller", "X-Edge-Duet-Controller must be the id POST /api/control returned.")
    return value


def watcher_header(request: Request) -> int | None:
    """The connected WebSocket the controller's page holds (``X-Edge-Duet-Watcher``), or None."""
    value = request.headers.get(WATCHER_HEADER)
    if value is None:
        return None
    if not value.isdigit():
        raise ApiError(400, "bad_watcher", "X-Edge-Duet-Watcher must be the id of this page's open /api/events "
                                           "connection (its 'hello' event says it).")
    if int(value) not in _hub(request).watchers:  # a state conflict, e.g. the connection closed a moment ago
        raise ApiError(409, "no_watcher", f"no /api/events connection {value} is open; reconnect and use the id "
                                          "of the new one's 'hello' event.")
    return int(value)


def check_post(request: Request, bucket: str, control: bool = True) -> None:
    check_access(request)
    given = controller_header(request)
    hub = _hub(request)
    opts = hub.options
    rate, burst = (opts.frames_per_s, opts.frames_burst) if bucket == "frames" else (opts.posts_per_s, opts.posts_burst)
    wait = hub.limiter.take(request.client.host if request.client else "?", bucket, rate, burst)
    if wait:
        what = "frames" if bucket == "frames" else "requests (questions, resets, cancels, control)"
        raise ApiError(429, "rate_limited", f"too many {what}: at most {rate:g} per second (burst {burst}); "
                                            f"retry in {max(1, math.ceil(wait))} s.",
                       {"Retry-After": str(max(1, math.ceil(wait)))})
    if control:
        current = hub.controller_id()
        if current is not None:
            if not hmac.compare_digest(given.encode(), current.encode()):
                raise ApiError(409, "not_controller", "another client controls this assistant; watch, or retry when "
                               f"its lease ends (it lasts {opts.controller_lease_s:g} s after its last request).")
            hub.controller = (current, time.monotonic() + opts.controller_lease_s)
    if not hub.assistant.alive:
        raise ApiError(503, "closed", "the assistant is shutting down.")


async def read_body(request: Request, limit: int) -> bytes:
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise ApiError(400, "bad_request", "Content-Length must be a non-negative integer.")
        if int(length) > limit:
            raise ApiError(413, "too_large", f"the body has {length} bytes; at most {limit} are allowed.")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "too_large", f"the body is over {limit} bytes.")
        chunks.append(chunk)
    return b"".join(chunks)


def content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


# ------------------------------------------------------------------ handlers
async def post_frame(request: Request) -> Response:
    check_post(request, "frames")
    hub = _hub(request)
    ctype = content_type(request)
    if ctype not in ("image/jpeg", "image/png"):
        raise ApiError(415, "unsupported_media_type", f"Content-Type {ctype or 'none'!r}: send image/jpeg or image/png.")
    if hub.assistant.source is not None:
        raise ApiError(409, "source_owned", "the server reads its own camera/video; posted frames are not accepted.")
    t = None
    if "t" in request.query_params:
        try:
            t = float(request.query_params["t"])
        except ValueError:
            t = math.nan
        if not (math.isfinite(t) and 0 <= t <= 1e7):
            raise ApiError(422, "bad_time", "t must be a number of seconds between 0 and 1e7.")
    body = await read_body(request, hub.options.max_frame_bytes)
    if not body:
        raise ApiError(400, "empty_body", "the body must be a JPEG or PNG image.")
    image = await run_in_threadpool(decode_image, body, ctype, hub.options.max_frame_side_px)
    index = hub.assistant.add_frame(image, t=t, channels="rgb")
    return JSONResponse({"accepted": True, "frame": index}, status_code=202)


def parse_question(body: bytes, max_chars: int) -> tuple[str, bool]:
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ApiError(400, "bad_json", f"the body is not valid JSON ({exc}).") from None
    if not isinstance(data, dict):
        raise ApiError(422, "bad_question", 'the body must be an object: {"text": "...", "must_reply": false}.')
    extra = set(data) - {"text", "must_reply"}
    if extra:
        raise ApiError(422, "bad_question", f"unknown fields {sorted(extra)}; allowed: text, must_reply.")
    text, must_reply = data.get("text"), data.get("must_reply", False)
    if not isinstance(text, str) or not text.strip():
        raise ApiError(422, "bad_question", "text must be a non-empty string.")
    if len(text) > max_chars:
        raise ApiError(422, "bad_question", f"text has {len(text)} characters; at most {max_chars} are allowed.")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(422, "bad_question", "text contains unpaired surrogates (invalid Unicode).") from None
    if any(ord(c) < 32 and c not in "\n\t" or ord(c) == 127 for c in text):
        raise ApiError(422, "bad_question", "text may not contain control characters (newline and tab are fine).")
    if not isinstance(must_reply, bool):
        raise ApiError(422, "bad_question", "must_reply must be true or false.")
    return text, must_reply


async def post_question(request: Request) -> Response:
    check_post(request, "posts")
    hub = _hub(request)
    if content_type(request) != "application/json":
        raise ApiError(415, "unsupported_media_type", "send the question as application/json.")
    text, must_reply = parse_question(await read_body(request, hub.options.max_json_bytes), hub.options.max_question_chars)
    hub.assistant.ask(text, must_reply=must_reply)
    return JSONResponse({"accepted": True, "text": text.strip(), "must_reply": must_reply}, status_code=202)


async def post_reset(request: Request) -> Response:
    check_post(request, "posts")
    await read_body(request, _hub(request).options.max_json_bytes)
    _hub(request).assistant.reset()
    return JSONResponse({"accepted": True}, status_code=202)


async def post_cancel(request: Request) -> Response:
    check_post(request, "posts")
    await read_body(request, _hub(request).options.max_json_bytes)
    _hub(request).assistant.cancel()
    return JSONResponse({"accepted": True}, status_code=202)


async def control(request: Request) -> Response:
    check_post(request, "posts", control=False)
    hub = _hub(request)
    await read_body(request, hub.options.max_json_bytes)
    current, given = hub.controller_id(), controller_header(request)
    mine = current is not None and hmac.compare_digest(given.encode(), current.encode())
    if request.method == "DELETE":
        if current is not None and not mine:
            raise ApiError(409, "not_controller", "only the controller can release its lease.")
        hub.release_control()
        return JSONResponse({"released": current is not None})
    if current is not None and not mine:
        raise ApiError(409, "controlled", "another client controls this assistant; you can watch. Control passes "
                                          "on when that page closes or its lease ends.")
    watcher = watcher_header(request)
    ident = current or secrets.token_urlsafe(16)
    hub.controller = (ident, time.monotonic() + hub.options.controller_lease_s)
    if watcher is not None:
        hub.controller_watcher = watcher
    return JSONResponse({"controller_id": ident, "lease_s": hub.options.controller_lease_s})


async def get_status(request: Request) -> Response:
    check_access(request)
    return JSONResponse(_hub(request).status())


async def get_health(request: Request) -> Response:
    alive = _hub(request).assistant.alive
    return JSONResponse({"ok": alive, "state": _hub(request).assistant.status()["state"]}, status_code=200 if alive else 503)


async def get_frame(request: Request) -> Response:
    check_access(request)
    latest = await _hub(request).latest_jpeg()
    if latest is None:
        raise ApiError(404, "no_frame", "no frame has arrived yet.")
    return Response(latest[1], media_type="image/jpeg", headers={"Cache-Control": "no-store", "X-Frame-Index": str(latest[0])})


async def get_stream(request: Request) -> Response:
    check_access(request)
    hub = _hub(request)
    if hub.streams >= hub.options.max_streams:
        raise ApiError(503, "too_many_streams", f"at most {hub.options.max_streams} live streams at once.")
    hub.streams += 1

    async def parts():
        last = -1
        try:
            while not hub.closing.is_set():
                latest = await hub.latest_jpeg()
                if latest is not None and latest[0] != last:
                    last, data = latest
                    yield b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n%s\r\n" % (len(data), data)
                await asyncio.sleep(1.0 / hub.options.stream_fps)
        finally:
            hub.streams -= 1

    return StreamingResponse(parts(), media_type="multipart/x-mixed-replace; boundary=frame",
                             headers={"Cache-Control": "no-store"})


async def events(ws: WebSocket) -> None:
    hub = _hub(ws)
    try:
        check_access(ws)
    except ApiError as exc:
        await ws.close(code=1008, reason=exc.message[:120])
        return
    if len(hub.watchers) >= hub.options.max_watchers:
        await ws.close(code=1013, reason="too many watchers")
        return
    await ws.accept()
    watcher = hub.new_watcher()
    hello = json.dumps({"event": "hello", "watcher": watcher.id, "status": hub.status()}, ensure_ascii=False)

    async def send_loop() -> None:
        await ws.send_text(hello)
        while True:
            await watcher.ready.wait()
            watcher.ready.clear()
            for message in watcher.messages():
                await ws.send_text(message)

    sender = asyncio.create_task(send_loop())
    try:
        while True:  # clients do not send commands here; reading notices a disconnect
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                break
    except (WebSocketDisconnect, RuntimeError):
        pass
    finally:
        sender.cancel()
        hub.watchers.pop(watcher.id, None)
        watcher.events.close()
        if hub.controller_watcher == watcher.id:  # the controlling page closed: the next one may take over
            hub.release_control()


async def index(request: Request) -> Response:
    return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})


async def openapi(request: Request) -> Response:
    return JSONResponse(openapi_spec(_hub(request).options))


# ------------------------------------------------------------------ app
async def _api_error(request: Request, exc: ApiError) -> Response:
    return error_response(exc.status, exc.code, exc.message, exc.headers)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return error_response(exc.status_code, code, str(exc.detail), getattr(exc, "headers", None))


async def _edge_error(request: Request, exc: EdgeDuetError) -> Response:
    if isinstance(exc, (AssistantBusy, AssistantClosed)):
        return error_response(503, "busy" if isinstance(exc, AssistantBusy) else "closed", str(exc), {"Retry-After": "1"})
    return error_response(422, "bad_input", str(exc))


async def _unexpected(request: Request, exc: Exception) -> Response:  # a bug: say so, keep serving
    log.exception("unexpected error on %s %s", request.method, request.url.path)
    return error_response(500, "internal", f"unexpected server error ({type(exc).__name__}); see the server log.")


class SecurityHeaders:
    """Adds nosniff / no-referrer / CSP headers to every HTTP response (pure ASGI: streams stay streams)."""

    HEADERS = [
        (b"x-content-type-options", b"nosniff"),
        (b"referrer-policy", b"no-referrer"),
        (b"x-frame-options", b"DENY"),
        (b"content-security-policy", b"default-src 'self'; img-src 'self' blob: data:; connect-src 'self'; "
                                     b"style-src 'self'; script-src 'self'; frame-ancestors 'none'"),
    ]

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": list(message.get("headers", [])) + self.HEADERS}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def create_app(assistant: Assistant, options: ServerOptions | None = None, *, close_assistant: bool = True) -> Starlette:
    """The ASGI app around an existing assistant. ``close_assistant``: close it when the app shuts down."""
    options = options or ServerOptions()
    check_bind(options)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        hub = app.state.hub = Hub(assistant, options)
        try:
            yield
        finally:
            hub.closing.set()
            if close_assistant:
                await run_in_threadpool(assistant.close)

    routes = [
        Route("/", index),
        Route("/openapi.json", openapi),
        Route("/api/frames", post_frame, methods=["POST"]),
        Route("/api/questions", post_question, methods=["POST"]),
        Route("/api/reset", post_reset, methods=["POST"]),
        Route("/api/cancel", post_cancel, methods=["POST"]),
        Route("/api/control", control, methods=["POST", "DELETE"]),
        Route("/api/status", get_status),
        Route("/api/health", get_health),
        Route("/api/frame.jpg", get_frame),
        Route("/api/stream.mjpeg", get_stream),
        WebSocketRoute("/api/events", events),
        Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={ApiError: _api_error, HTTPException: _http_error, EdgeDuetError: _edge_error,
                            Exception: _unexpected},
    )
    app.add_middleware(SecurityHeaders)
    return app


def make_server(app: Starlette, options: ServerOptions, log_level: str = "warning"):
    """A uvicorn server for ``app`` whose shutdown first ends the endless MJPEG streams (uvicorn waits for
    running responses before it lets the app shut down; WebSockets it closes itself)."""
    import uvicorn

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None):
            hub = getattr(app.state, "hub", None)
            if hub is not None:
                hub.closing.set()
            await super().shutdown(sockets=sockets)

    return Server(uvicorn_config(app, options, log_level))


def uvicorn_config(app: Starlette, options: ServerOptions, log_level: str = "warning"):
    import uvicorn

    return uvicorn.Config(
        app, host=options.host, port=options.port, log_level=log_level, access_log=log_level in ("info", "debug"),
        proxy_headers=False,  # X-Forwarded-For from a local client must not dodge the rate limits
        ws_max_size=64 * 1024, ws_per_message_deflate=False, timeout_graceful_shutdown=2,
        limit_concurrency=128, server_header=False,
    )


def openapi_spec(options: ServerOptions) -> dict:
    """The hand-written description (static/openapi.json) with this server's limits and auth filled in."""
    spec = json.loads((STATIC_DIR / "openapi.json").read_text())
    spec["components"]["schemas"]["Question"]["properties"]["text"]["maxLength"] = options.max_question_chars
    frames = spec["paths"]["/api/frames"]["post"]["requestBody"]
    frames["description"] = (f"A JPEG or PNG image of at most {options.max_frame_bytes} bytes and "
                             f"{options.max_frame_side_px} px per side.")
    if not options.token:
        spec.pop("security", None)
        spec["components"].pop("securitySchemes", None)
    return spec


def check_port_free(host: str, port: int) -> None:
    """Fail early with a clear message (uvicorn only logs a bind error and exits)."""
    import socket

    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host.strip("[]"), port))
        except OSError as exc:
            raise UsageError(f"cannot listen on {host}:{port} ({exc.strerror}); pass another --port, "
                             "or stop the program using it.") from None


def run_server(assistant: Assistant, options: ServerOptions, log_level: str = "warning") -> None:
    """Serve ``assistant`` until Ctrl-C / SIGTERM, then close it. Blocks."""
    check_bind(options)
    check_port_free(options.host, options.port)
    try:
        make_server(create_app(assistant, options), options, log_level).run()
    finally:
        assistant.close()
