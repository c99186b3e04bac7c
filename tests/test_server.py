"""`edge-duet serve` on loopback with the tiny bundle: round trips, auth, limits, malformed input, faults, fuzzing."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import socket
import threading
import time
from dataclasses import replace

import numpy as np
import pytest

pytest.importorskip("starlette", reason="the server needs the serve extra (starlette, uvicorn)")
pytest.importorskip("uvicorn", reason="the server needs the serve extra (starlette, uvicorn)")
httpx = pytest.importorskip("httpx", reason="the server tests need httpx")
ws_sync = pytest.importorskip("websockets.sync.client", reason="the server tests need websockets")
from websockets.exceptions import InvalidStatus  # noqa: E402

from edge_duet.runtime.assistant import Assistant, AssistantOptions  # noqa: E402
from edge_duet.apps.server import ServerOptions, check_bind, create_app, make_server, openapi_spec  # noqa: E402
from edge_duet.errors import UsageError  # noqa: E402

FAST = AssistantOptions(frame_interval_s=1.0, frames_per_turn=1, max_new_tokens=12)
ROOMY = ServerOptions(frames_per_s=1000, frames_burst=1000, posts_per_s=1000, posts_burst=1000)


# ------------------------------------------------------------------ helpers (also used by test_kiosk_page.py)
@contextlib.contextmanager
def running_server(assistant: Assistant, options: ServerOptions = ServerOptions(), sndbuf: int | None = None):
    """Serve ``assistant`` on a free loopback port in a thread; yields the base URL. ``sndbuf``: the listening
    socket's SO_SNDBUF, which accepted connections inherit (small: a slow reader pushes back at once)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if sndbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    sock.bind(("127.0.0.1", 0))
    options = replace(options, host="127.0.0.1", port=sock.getsockname()[1])
    server = make_server(create_app(assistant, options), options, log_level="error")
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{options.port}"
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()
        assert not thread.is_alive(), "the server did not stop"


def image_bytes(fmt: str = "JPEG", size=(96, 72), color=(200, 40, 40)) -> bytes:
    from PIL import Image

    img = Image.new("RGB", size, color)
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def frame(i: int) -> np.ndarray:
    img = np.zeros((72, 96, 3), np.uint8)
    img[:] = (30 + 20 * (i % 8), 80, 120)
    img[20:50, (5 * i) % 60:(5 * i) % 60 + 30] = (0, 0, 255)
    return img


def events_until(ws, predicate, timeout: float = 20.0) -> list[dict]:
    """Read events until one satisfies ``predicate``; returns all read (the last one matched)."""
    seen, deadline = [], time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no matching event within {timeout} s; saw {[e['event'] for e in seen][-30:]}")
        ev = json.loads(ws.recv(timeout=left))
        seen.append(ev)
        if predicate(ev):
            return seen


def ws_url(base: str, path: str = "/api/events") -> str:
    return base.replace("http://", "ws://") + path


@pytest.fixture
def assistant(tiny_bundle):
    with Assistant(tiny_bundle, FAST) as a:
        yield a


@pytest.fixture
def server(assistant):
    with running_server(assistant, ROOMY) as base:
        yield base


# ------------------------------------------------------------------ round trips
def test_frames_questions_and_events_round_trip(server, assistant):
    with ws_sync.connect(ws_url(server)) as ws, httpx.Client(base_url=server, timeout=10) as http:
        hello = json.loads(ws.recv(timeout=10))
        assert hello["event"] == "hello" and hello["status"]["model"] == assistant.model_name
        r = http.post("/api/questions", json={"text": "What is on the table?", "must_reply": True})
        assert r.status_code == 202 and r.json() == {"accepted": True, "text": "What is on the table?", "must_reply": True}
        r = http.post("/api/frames?t=0", content=image_bytes("JPEG"), headers={"Content-Type": "image/jpeg"})
        assert r.status_code == 202 and r.json()["accepted"] is True
        seen = events_until(ws, lambda e: e["event"] in ("reply", "silence"))
        started = [e for e in seen if e["event"] == "turn"]
        assert started[0]["question"] == "What is on the table?" and started[0]["must_reply"] is True
        assert seen[-1]["event"] == "reply" and seen[-1]["text"]  # must_reply: an answer now, nonsense or not
        events_until(ws, lambda e: e["event"] == "stats")

        r = http.post("/api/frames?t=1.0", content=image_bytes("PNG", color=(10, 200, 10)), headers={"Content-Type": "image/png"})
        assert r.status_code == 202
        events_until(ws, lambda e: e["event"] == "stats" and e["turn"] == 1)
        status = http.get("/api/status").json()
        assert status["turns"] == 2 and status["replies"] >= 1 and status["worker_alive"]
        assert status["recent_replies"][0]["text"] == seen[-1]["text"]
        assert status["server"]["watchers"][0]["dropped"] == 0

        jpg = http.get("/api/frame.jpg")
        assert jpg.status_code == 200 and jpg.headers["content-type"] == "image/jpeg" and jpg.content[:2] == b"\xff\xd8"
        with http.stream("GET", "/api/stream.mjpeg") as stream:
            assert stream.headers["content-type"].startswith("multipart/x-mixed-replace")
            head = next(stream.iter_bytes())
            assert head.startswith(b"--frame\r\nContent-Type: image/jpeg")
        assert http.get("/api/health").json() == {"ok": True, "state": "waiting"}

        assert http.post("/api/reset").status_code == 202
        events_until(ws, lambda e: e["event"] == "reset" and e["reason"] == "request")
        assert http.post("/api/cancel").status_code == 202


def test_kiosk_page_and_assets_are_served_same_origin_only(server):
    with httpx.Client(base_url=server, timeout=10) as http:
        page = http.get("/")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert "default-src 'self'" in page.headers["content-security-policy"]
        for asset in ("/static/kiosk.js", "/static/kiosk.css"):
            assert http.get(asset).status_code == 200
        assert "http://" not in page.text and "https://" not in page.text  # no CDN assets


def test_question_without_frames_gets_a_text_only_turn(tiny_bundle):
    options = AssistantOptions(frame_interval_s=0.1, frames_per_turn=1, max_new_tokens=4)
    with Assistant(tiny_bundle, options) as a, running_server(a, ROOMY) as base, ws_sync.connect(ws_url(base)) as ws:
        httpx.post(base + "/api/questions", json={"text": "anyone there?"}, timeout=10)
        turn = events_until(ws, lambda e: e["event"] == "turn")[-1]
        assert turn["n_frames"] == 0 and turn["question"] == "anyone there?"


# ------------------------------------------------------------------ malformed requests: 4xx JSON, never 500, session lives
BIG_PNG = image_bytes("PNG", size=(5000, 8), color=(0, 0, 0))
MALFORMED = [
    ("frames: wrong content type", "POST", "/api/frames", {"Content-Type": "text/plain"}, b"hello", 415),
    ("frames: no content type", "POST", "/api/frames", {}, image_bytes(), 415),
    ("frames: empty body", "POST", "/api/frames", {"Content-Type": "image/jpeg"}, b"", 400),
    ("frames: garbage", "POST", "/api/frames", {"Content-Type": "image/jpeg"}, os.urandom(2000), 422),
    ("frames: truncated jpeg", "POST", "/api/frames", {"Content-Type": "image/jpeg"}, image_bytes()[:300], 422),
    ("frames: png labelled jpeg", "POST", "/api/frames", {"Content-Type": "image/jpeg"}, image_bytes("PNG"), 422),
    ("frames: too wide", "POST", "/api/frames", {"Content-Type": "image/png"}, BIG_PNG, 422),
    ("frames: negative t", "POST", "/api/frames?t=-1", {"Content-Type": "image/jpeg"}, image_bytes(), 422),
    ("frames: t not a number", "POST", "/api/frames?t=soon", {"Content-Type": "image/jpeg"}, image_bytes(), 422),
    ("frames: t infinite", "POST", "/api/frames?t=inf", {"Content-Type": "image/jpeg"}, image_bytes(), 422),
    ("question: not json", "POST", "/api/questions", {"Content-Type": "application/json"}, b"{'text': 1", 400),
    ("question: not utf-8", "POST", "/api/questions", {"Content-Type": "application/json"}, b'{"text": "\xff\xfe"}', 400),
    ("question: deep nesting", "POST", "/api/questions", {"Content-Type": "application/json"}, b"[" * 5000 + b"]" * 5000, 400),
    ("question: array", "POST", "/api/questions", {"Content-Type": "application/json"}, b'["hi"]', 422),
    ("question: no text", "POST", "/api/questions", {"Content-Type": "application/json"}, b'{"must_reply": true}', 422),
    ("question: text number", "POST", "/api/questions", {"Content-Type": "application/json"}, b'{"text": 5}', 422),
    ("question: blank", "POST", "/api/questions", {"Content-Type": "application/json"}, b'{"text": "  \\n "}', 422),
    ("question: too long", "POST", "/api/questions", {"Content-Type": "application/json"},
     json.dumps({"text": "x" * 501}).encode(), 422),
    ("question: control chars", "POST", "/api/questions", {"Content-Type": "application/json"}, b'{"text": "hi\\u0000"}', 422),
    ("question: lone surrogate", "POST", "/api/questions", {"Content-Type": "application/json"}, b'{"text": "\\ud800?"}', 422),
    ("question: must_reply string", "POST", "/api/questions", {"Content-Type": "application/json"},
     b'{"text": "hi", "must_reply": "yes"}', 422),
    ("question: extra field", "POST", "/api/questions", {"Content-Type": "application/json"}, b'{"text": "hi", "x": 1}', 422),
    ("question: form encoded", "POST", "/api/questions", {"Content-Type": "application/x-www-form-urlencoded"}, b"text=hi", 415),
    ("question: body too large", "POST", "/api/questions", {"Content-Type": "application/json"},
     json.dumps({"text": "\u2603" * 400, "pad": "y" * 20000}).encode(), 413),
    ("reset: body too large", "POST", "/api/reset", {"Content-Type": "application/json"}, b"{" + b" " * 20000 + b"}", 413),
    ("control: watcher not a number", "POST", "/api/control", {"X-Edge-Duet-Watcher": "first"}, b"", 400),
    ("control: watcher not connected", "POST", "/api/control", {"X-Edge-Duet-Watcher": "9999"}, b"", 409),
    ("unknown path", "GET", "/api/nothing", {}, b"", 404),
    ("wrong method", "DELETE", "/api/status", {}, b"", 405),
    ("GET on a POST route", "GET", "/api/questions", {}, b"", 405),
]


@pytest.mark.parametrize("case", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_requests_get_4xx_json(server, assistant, case):
    _, method, path, headers, body, status = case
    r = httpx.request(method, server + path, headers=headers, content=body, timeout=10)
    assert r.status_code == status, r.text
    data = r.json()
    assert set(data) == {"error", "message"} and data["message"]
    assert " object at 0x" not in data["message"]  # a Python repr means nothing to the user
    assert assistant.alive and httpx.get(server + "/api/health", timeout=10).json()["ok"]


def test_broken_http_is_refused_by_the_protocol_layer(server, assistant):
    port = int(server.rsplit(":", 1)[1])
    for raw in (b"POST /api/frames HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/jpeg\r\nContent-Length: -5\r\n\r\n",
                b"GARBAGE\r\n\r\n", b"GET / HTTP/1.1\r\n" + b"X: " + b"y" * 70000 + b"\r\n\r\n"):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(raw)
            reply = s.recv(4096)
        assert reply.startswith(b"HTTP/1.1 4"), reply[:80]
    assert assistant.alive and httpx.get(server + "/api/health", timeout=10).json()["ok"]


def test_body_over_limit_without_content_length_is_refused(tiny_bundle):
    with Assistant(tiny_bundle, FAST) as a, running_server(a, replace(ROOMY, max_frame_bytes=10_000)) as base:
        def chunks():  # chunked transfer: no Content-Length to check up front
            for _ in range(30):
                yield b"\xff" * 1000

        r = httpx.post(base + "/api/frames", content=chunks(), headers={"Content-Type": "image/jpeg"}, timeout=10)
        assert r.status_code == 413 and r.json()["error"] == "too_large"
        ok = httpx.post(base + "/api/frames", content=image_bytes(), headers={"Content-Type": "image/jpeg"}, timeout=10)
        assert ok.status_code == 202


def test_session_survives_a_malformed_burst_and_still_answers(server, assistant):
    with httpx.Client(base_url=server, timeout=10) as http, ws_sync.connect(ws_url(server)) as ws:
        for _, method, path, headers, body, _ in MALFORMED:
            http.request(method, path, headers=headers, content=body)
        http.post("/api/questions", json={"text": "still there?", "must_reply": True})
        http.post("/api/frames?t=5", content=image_bytes(), headers={"Content-Type": "image/jpeg"})
        assert events_until(ws, lambda e: e["event"] in ("reply", "silence"))[-1]["event"] == "reply"
        assert http.get("/api/status").json()["errors"] == 0


# ------------------------------------------------------------------ safety: bind, token, host, origin, rate limits, control
def test_binding_beyond_loopback_requires_a_token():
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        check_bind(ServerOptions(host=host))
    for host in ("0.0.0.0", "192.168.1.20", "::"):
        with pytest.raises(UsageError, match="--token"):
            check_bind(ServerOptions(host=host))
        with pytest.raises(UsageError, match="at least 16"):
            check_bind(ServerOptions(host=host, token="abc"))
        check_bind(ServerOptions(host=host, token="s3cret-s3cret-16"))
    check_bind(ServerOptions(host="127.0.0.1", token="abc"))  # loopback: any token is the user's choice


def test_cli_refuses_network_bind_without_token(monkeypatch):
    from typer.testing import CliRunner

    from edge_duet.apps.cli import app

    monkeypatch.delenv("EDGE_DUET_TOKEN", raising=False)
    result = CliRunner().invoke(app, ["serve", "--host", "0.0.0.0", "--model", "/nonexistent"])
    assert result.exit_code == 2
    assert "--token" in result.output and "0.0.0.0" in result.output


def test_token_auth(tiny_bundle):
    token = "k1osk-t0ken"
    with Assistant(tiny_bundle, FAST) as a, running_server(a, replace(ROOMY, token=token)) as base:
        with httpx.Client(base_url=base, timeout=10) as http:
            r = http.get("/api/status")
            assert r.status_code == 401 and r.json()["error"] == "unauthorized"
            assert r.headers["www-authenticate"].startswith("Bearer")
            assert http.get("/api/status", headers={"Authorization": "Bearer wrong"}).status_code == 401
            assert http.post("/api/questions", json={"text": "hi"}).status_code == 401
            assert http.post("/api/frames", content=image_bytes(), headers={"Content-Type": "image/jpeg"}).status_code == 401
            good = {"Authorization": f"Bearer {token}"}
            assert http.get("/api/status", headers=good).json()["server"]["auth"] is True
            assert http.post("/api/questions", json={"text": "hi"}, headers=good).status_code == 202
            assert http.get("/api/health").status_code == 200  # liveness probes need no token
            spec = http.get("/openapi.json").json()
            assert spec["security"] == [{"bearer": []}] and "bearer" in spec["components"]["securitySchemes"]
        with pytest.raises(InvalidStatus) as refused:
            ws_sync.connect(ws_url(base), open_timeout=5)
        assert refused.value.response.status_code == 403
        with ws_sync.connect(ws_url(base, f"/api/events?access_token={token}")) as ws:  # browsers cannot set headers
            assert json.loads(ws.recv(timeout=10))["event"] == "hello"
        with ws_sync.connect(ws_url(base), additional_headers={"Authorization": f"Bearer {token}"}) as ws:
            assert json.loads(ws.recv(timeout=10))["event"] == "hello"


def test_foreign_host_and_origin_are_refused(server):
    with httpx.Client(base_url=server, timeout=10) as http:
        r = http.get("/api/status", headers={"Host": "attacker.example"})  # DNS rebinding
        assert r.status_code == 403 and r.json()["error"] == "bad_host"
        r = http.post("/api/reset", headers={"Origin": "http://attacker.example"})  # another page in the browser
        assert r.status_code == 403 and r.json()["error"] == "bad_origin"
        host = server.split("//")[1]
        assert http.post("/api/reset", headers={"Origin": f"http://{host}"}).status_code == 202
    with pytest.raises(InvalidStatus):
        ws_sync.connect(ws_url(server), origin="http://attacker.example", open_timeout=5)


def test_rate_limits_answer_429_with_retry_after(tiny_bundle):
    options = replace(ServerOptions(), posts_per_s=0.5, posts_burst=3, frames_per_s=1, frames_burst=2)
    with Assistant(tiny_bundle, FAST) as a, running_server(a, options) as base, httpx.Client(base_url=base, timeout=10) as http:
        codes = [http.post("/api/questions", json={"text": f"q{i}"}).status_code for i in range(5)]
        assert codes == [202, 202, 202, 429, 429]
        r = http.post("/api/reset")
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1 and r.json()["error"] == "rate_limited"
        assert r.json()["message"].startswith("too many requests (questions, resets")
        codes = [http.post("/api/frames", content=image_bytes(), headers={"Content-Type": "image/jpeg"}).status_code
                 for _ in range(3)]
        assert codes == [202, 202, 429]
        assert http.get("/api/status").status_code == 200  # reads are not limited


def test_one_controller_many_watchers(tiny_bundle):
    with Assistant(tiny_bundle, FAST) as a, running_server(a, replace(ROOMY, controller_lease_s=1.0)) as base:
        with httpx.Client(base_url=base, timeout=10) as alice, httpx.Client(base_url=base, timeout=10) as bob:
            lease = alice.post("/api/control").json()
            mine = {"X-Edge-Duet-Controller": lease["controller_id"]}
            assert bob.post("/api/control").status_code == 409
            r = bob.post("/api/questions", json={"text": "mine now"})
            assert r.status_code == 409 and r.json()["error"] == "not_controller"
            assert alice.post("/api/questions", json={"text": "hello"}, headers=mine).status_code == 202
            assert bob.get("/api/status").json()["server"]["controlled"] is True  # watching still works
            assert bob.delete("/api/control").status_code == 409
            assert alice.delete("/api/control", headers=mine).json() == {"released": True}
            bob_lease = bob.post("/api/control").json()
            assert bob_lease["controller_id"] != lease["controller_id"]
            time.sleep(1.2)  # the lease ends when its holder goes quiet
            assert alice.post("/api/questions", json={"text": "back"}).status_code == 202


def test_a_lease_bound_to_a_page_ends_when_the_page_closes(tiny_bundle):
    """Closing the controlling tab and opening a new one: the new tab controls at once, not after the lease."""
    with Assistant(tiny_bundle, FAST) as a, running_server(a, replace(ROOMY, controller_lease_s=60.0)) as base:
        with httpx.Client(base_url=base, timeout=10) as http, ws_sync.connect(ws_url(base)) as new_tab:
            assert json.loads(new_tab.recv(timeout=10))["event"] == "hello"
            with ws_sync.connect(ws_url(base)) as old_tab:
                hello = json.loads(old_tab.recv(timeout=10))
                lease = http.post("/api/control", headers={"X-Edge-Duet-Watcher": str(hello["watcher"])}).json()
                assert http.post("/api/control").status_code == 409
            seen = events_until(new_tab, lambda e: e["event"] == "control")
            assert seen[-1] == {"event": "control", "controlled": False}
            assert http.get("/api/status").json()["server"]["controlled"] is False
            again = http.post("/api/control")
            assert again.status_code == 200 and again.json()["controller_id"] != lease["controller_id"]


def test_decode_errors_name_no_python_objects():
    """PIL's own message for this input holds '<_io.BytesIO object at 0x...>'."""
    from edge_duet.apps.server import ApiError, decode_image

    with pytest.raises(ApiError) as info:
        decode_image(b"\xff\xd8 not really a jpeg", "image/jpeg", 4096)
    assert info.value.status == 422 and " at 0x" not in info.value.message and "JPEG" in info.value.message


def test_posted_frames_are_refused_while_the_server_owns_a_source(tiny_bundle, tmp_path):
    video = write_video(tmp_path / "clip.avi", seconds=3)
    with Assistant(tiny_bundle, FAST) as a:
        a.attach(str(video), loop=True)
        with running_server(a, ROOMY) as base:
            r = httpx.post(base + "/api/frames", content=image_bytes(), headers={"Content-Type": "image/jpeg"}, timeout=10)
            assert r.status_code == 409 and r.json()["error"] == "source_owned"
            status = httpx.get(base + "/api/status", timeout=10).json()
            assert status["server"]["owns_source"] and status["source"].startswith("file")


def write_video(path, seconds: float = 3.0, fps: int = 10, size=(160, 120)):
    import cv2

    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, size)
    for i in range(int(seconds * fps)):
        img = np.full((size[1], size[0], 3), (90, 60, 30), np.uint8)
        x = int((i / (seconds * fps)) * (size[0] - 40))
        cv2.rectangle(img, (x, 40), (x + 40, 80), (40, 40, 230), -1)
        writer.write(img)
    writer.release()
    return path


# ------------------------------------------------------------------ faults
def test_slow_reader_is_bounded_and_never_blocks_the_model(tiny_bundle):
    """A watcher that stops reading fills its TCP buffers; then its outbox drops old events while the model and
    a healthy watcher go on at full speed. When it reads again, it is told how many it lost."""
    options = replace(ROOMY, ws_buffer_events=128)
    assistant_options = AssistantOptions(frame_interval_s=1.0, frames_per_turn=1, max_new_tokens=64)
    with Assistant(tiny_bundle, assistant_options) as a, running_server(a, options, sndbuf=4096) as base:
        slow = raw_websocket(base, rcvbuf=4096)  # connects and never reads
        with ws_sync.connect(ws_url(base)) as healthy, httpx.Client(base_url=base, timeout=10) as http:
            json.loads(healthy.recv(timeout=10))
            received, turn_times, dropped, t = 0, [], 0, 0.0
            deadline = time.monotonic() + 60
            while dropped == 0 and time.monotonic() < deadline:
                started = time.monotonic()
                a.ask("Describe it.", must_reply=True)
                a.add_frame(frame(int(t)), t=t)
                t += 1.0
                while True:  # the healthy watcher sees every event of the turn, promptly
                    ev = json.loads(healthy.recv(timeout=10))
                    received += 1
                    assert ev["event"] != "dropped"
                    if ev["event"] == "stats":
                        break
                turn_times.append(time.monotonic() - started)
                watchers = http.get("/api/status").json()["server"]["watchers"]
                assert all(w["queued"] <= 128 for w in watchers)
                dropped = max(w["dropped"] for w in watchers)
            assert dropped > 0, "the slow reader never fell behind"
            assert sorted(turn_times)[len(turn_times) // 2] < 2.0  # median turn: the model was never held back
            slow.settimeout(5)
            messages = [json.loads(m) for m in read_ws_text_frames(slow, until=lambda m: json.loads(m)["event"] == "dropped")]
            assert messages[0]["event"] == "hello" and messages[-1]["count"] > 0
            slow.close()


def raw_websocket(base: str, rcvbuf: int | None = None) -> socket.socket:
    """A socket that did the WebSocket upgrade request of /api/events and read nothing."""
    port = int(base.rsplit(":", 1)[1])
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall((f"GET /api/events HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                  f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    return sock


def read_ws_text_frames(sock: socket.socket, until, limit: int = 5000) -> list[str]:
    """Minimal client-side reader of unmasked server frames (after skipping the HTTP upgrade response)."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        buf += sock.recv(65536)
    buf = buf.split(b"\r\n\r\n", 1)[1]
    out: list[str] = []
    while len(out) < limit:
        while len(buf) < 2:
            buf += sock.recv(65536)
        n, head = buf[1] & 0x7F, 2
        if n == 126:
            head = 4
        elif n == 127:
            head = 10
        while len(buf) < head:
            buf += sock.recv(65536)
        n = int.from_bytes(buf[2:head], "big") if head > 2 else n
        while len(buf) < head + n:
            buf += sock.recv(65536)
        payload, buf = buf[head:head + n], buf[head + n:]
        out.append(payload.decode("utf-8", "replace"))
        if until(out[-1]):
            return out
    return out


def test_client_disconnects_mid_stream_are_harmless(server, assistant):
    with httpx.Client(base_url=server, timeout=10) as http:
        for _ in range(3):
            ws = raw_websocket(server)
            ws.recv(1024)  # the upgrade response and maybe the hello
            assistant.ask("go on", must_reply=True)
            assistant.add_frame(frame(1), t=time.monotonic())
            ws.shutdown(socket.SHUT_RDWR)  # vanish without a close handshake, mid-reply
            ws.close()
            with http.stream("GET", "/api/stream.mjpeg") as stream:
                next(stream.iter_bytes())  # then drop the MJPEG viewer as well
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            server_state = http.get("/api/status").json()["server"]
            if not server_state["watchers"] and server_state["streams"] == 0:
                break
            time.sleep(0.1)
        assert server_state["watchers"] == [] and server_state["streams"] == 0
        with ws_sync.connect(ws_url(server)) as ws:
            ws.recv(timeout=10)
            http.post("/api/questions", json={"text": "ok?", "must_reply": True})
            http.post(f"/api/frames?t={time.monotonic() + 10:.3f}", content=image_bytes(), headers={"Content-Type": "image/jpeg"})
            assert events_until(ws, lambda e: e["event"] in ("reply", "silence"))[-1]["event"] == "reply"


def test_model_error_is_reported_and_the_server_recovers(server, assistant, monkeypatch):
    session = assistant._session
    real_step = session.step
    calls = {"n": 0}

    def failing_step():
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("decoder exploded")
        return real_step()

    monkeypatch.setattr(session, "step", failing_step)
    with ws_sync.connect(ws_url(server)) as ws, httpx.Client(base_url=server, timeout=10) as http:
        ws.recv(timeout=10)
        http.post("/api/frames?t=0", content=image_bytes(), headers={"Content-Type": "image/jpeg"})
        seen = events_until(ws, lambda e: e["event"] == "reset")
        error = next(e for e in seen if e["event"] == "error")
        assert "decoder exploded" in error["message"] and error["recovered"] is True
        status = http.get("/api/status").json()
        assert status["errors"] == 1 and "decoder exploded" in status["last_error"] and http.get("/api/health").json()["ok"]
        http.post("/api/questions", json={"text": "and now?", "must_reply": True})
        http.post("/api/frames?t=1", content=image_bytes(), headers={"Content-Type": "image/jpeg"})
        assert events_until(ws, lambda e: e["event"] in ("reply", "silence"))[-1]["event"] == "reply"


# ------------------------------------------------------------------ the OpenAPI description matches the server
def test_openapi_describes_exactly_the_api_routes(server):
    from starlette.routing import Route

    spec = httpx.get(server + "/openapi.json", timeout=10).json()
    app = create_app(Assistant.__new__(Assistant), ServerOptions())  # routes only; never started
    routes = {r.path: set(r.methods) - {"HEAD"} for r in app.routes if isinstance(r, Route) and r.path.startswith("/api/")}
    documented = {p: {m.upper() for m in ops} for p, ops in spec["paths"].items()}
    assert documented == routes
    assert spec["components"]["schemas"]["Question"]["properties"]["text"]["maxLength"] == ServerOptions().max_question_chars
    assert "security" not in spec  # no token configured
    assert spec == openapi_spec(ServerOptions(max_question_chars=500))


def test_serve_command_end_to_end(tiny_bundle, tmp_path):
    """`edge-duet serve --video FILE --loop` as a user runs it: serves, streams, and stops cleanly on Ctrl-C."""
    import signal
    import subprocess
    import sys

    video = write_video(tmp_path / "clip.avi", seconds=2)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "EDGE_DUET_TOKEN": ""}
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge_duet.apps.cli", "serve", "--model", str(tiny_bundle), "--port", str(port),
         "--video", str(video), "--loop", "--max-new-tokens", "4"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.communicate()[1]
            try:
                if httpx.get(base + "/api/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.2)
        status = httpx.get(base + "/api/status", timeout=5).json()
        assert status["server"]["owns_source"] and status["source"] == f"file {video}"
        deadline = time.monotonic() + 20
        while httpx.get(base + "/api/frame.jpg", timeout=5).status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        with httpx.stream("GET", base + "/api/stream.mjpeg", timeout=5) as stream:
            assert next(stream.iter_bytes()).startswith(b"--frame")
            proc.send_signal(signal.SIGINT)  # with a viewer still connected
            _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode in (0, 130), err
    assert "kiosk page: http://127.0.0.1:" in err and "Traceback" not in err
