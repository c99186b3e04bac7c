"""The remote client's own logic, without vLLM: retries and backoff on a closed port, the bearer token on the
wire, HTTP errors mapped to messages that name the fix, a stalled server timing out, and the event stream
parser. A few-line HTTP server on loopback answers with canned responses (the real-engine tests are
tests/test_remote.py)."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from edge_duet.errors import ServerModelMismatch, ServerRejected, ServerTimeout, ServerUnavailable
from edge_duet.runtime.remote_client import Client, ServerOptions


class Canned(BaseHTTPRequestHandler):
    """Answers every request with the server's ``reply(handler)`` -> (status, body bytes, content type)."""

    def do_GET(self):
        self._answer()

    def do_POST(self):
        n = int(self.headers.get("Content-Length") or 0)
        self.server.bodies.append(json.loads(self.rfile.read(n) or b"null"))
        self._answer()

    def _answer(self):
        self.server.headers_seen.append(dict(self.headers))
        status, body, ctype = self.server.reply(self)
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def canned():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Canned)
    server.daemon_threads = True
    server.headers_seen, server.bodies = [], []
    server.reply = lambda h: (200, b'{"data": [{"id": "m", "max_model_len": 4096}]}', "application/json")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def options(port: int, **kw) -> ServerOptions:
    return ServerOptions(f"http://127.0.0.1:{port}/v1", "m", **kw)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_server_is_retried_with_backoff_then_named():
    client = Client(options(closed_port(), retries=2, backoff_s=0.2))
    t0 = time.monotonic()
    with pytest.raises(ServerUnavailable, match=r"cannot reach the server at .*/v1/models .*3 attempts.*vLLM is running"):
        client.models()
    assert time.monotonic() - t0 >= 0.2 + 0.4  # waits 0.2 s, then 0.4 s


def test_bearer_token_is_sent_and_a_401_names_the_option(canned):
    client = Client(options(canned.server_port, token="s3cret"))
    assert client.check_model(4096)["id"] == "m"
    assert canned.headers_seen[-1]["Authorization"] == "Bearer s3cret"
    canned.reply = lambda h: (401, b'{"error": {"message": "Unauthorized"}}', "application/json")
    with pytest.raises(ServerRejected, match="HTTP 401: Unauthorized.*ServerOptions.token") as info:
        Client(options(canned.server_port)).models()
    assert info.value.status == 401


def test_model_name_and_context_are_checked(canned):
    with pytest.raises(ServerModelMismatch, match="serves 'm', not 'other'"):
        Client(ServerOptions(f"http://127.0.0.1:{canned.server_port}/v1", "other")).check_model()
    with pytest.raises(ServerModelMismatch, match="accepts 4096 tokens.*max_context_tokens` 4096.*--max-model-len 8192"):
        Client(options(canned.server_port)).check_model(8192)


def test_502_is_retried_and_the_token_endpoint_403_says_how_to_enable_it(canned):
    calls = []

    def reply(h):
        calls.append(h.path)
        if len(calls) == 1:
            return 502, b"bad gateway", "text/plain"
        return 403, b'{"error": {"message": "Scale-out endpoints are disabled."}}', "application/json"

    canned.reply = reply
    client = Client(options(canned.server_port, api="tokens", backoff_s=0.01))
    with pytest.raises(ServerRejected, match="disabled.*--enable-scale-out.*ServerOptions.api` chat"):
        list(client.stream({"token_ids": [1]}))
    assert calls == ["/inference/v1/generate"] * 2


def test_stream_parses_events_and_surfaces_an_error_event(canned):
    events = [{"choices": [{"delta": {"content": "Hi"}}]}, {"choices": [], "usage": {"prompt_tokens": 3}}]
    body = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
    canned.reply = lambda h: (200, body.encode(), "text/event-stream")
    client = Client(options(canned.server_port))
    assert list(client.stream({"messages": []})) == events
    assert canned.bodies[-1]["stream"] is True and canned.bodies[-1]["stream_options"] == {"include_usage": True}
    canned.reply = lambda h: (200, b'data: {"error": {"message": "engine died"}}\n\n', "text/event-stream")
    with pytest.raises(ServerRejected, match="failed during the request: engine died"):
        list(client.stream({"messages": []}))


def test_a_stalled_server_times_out():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)  # accepts connections (the kernel does) but never answers
    try:
        client = Client(options(listener.getsockname()[1], read_timeout_s=0.3, retries=0))
        t0 = time.monotonic()
        with pytest.raises(ServerTimeout, match="sent nothing for 0.3 s.*read_timeout_s"):
            client.models()
        assert time.monotonic() - t0 < 5
    finally:
        listener.close()


def test_the_served_models_files_read_as_the_exporter_reads_them(tiny_checkpoint, tiny_bundle):
    """--model may name the checkpoint folder instead of a bundle: tokens, pixel budget and prompt come out as in
    the manifest the exporter wrote from the same folder."""
    from edge_duet.manifest import Manifest
    from edge_duet.runtime.remote import load_remote_model

    from_ckpt, from_bundle = load_remote_model(tiny_checkpoint), load_remote_model(tiny_bundle)
    m = Manifest.load(tiny_bundle)
    for model in (from_ckpt, from_bundle):
        assert (model.tokens, model.preprocess, model.prompt) == (m.tokens, m.preprocess, m.prompt)
