"""`edge-duet serve` fuzzed: every request body its OpenAPI description allows, and garbage frames.

Kept apart from tests/test_server.py because schemathesis (the dev extra) is needed at import time: without it
these skip, and the server tests still run (a runtime-only install: pip install -e .[serve] plus pytest)."""

from __future__ import annotations

from dataclasses import replace

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="the fuzz test needs schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from test_server import ROOMY, httpx, image_bytes, running_server  # noqa: E402

from edge_duet.apps.server import openapi_spec  # noqa: E402
from edge_duet.runtime.assistant import Assistant, AssistantOptions  # noqa: E402


def _images(fmt: str):
    """Schema-valid frame bodies: real images of any small size and colour (garbage: see the test below)."""
    sizes = st.tuples(st.integers(1, 64), st.integers(1, 64))
    colors = st.tuples(st.integers(0, 255), st.integers(0, 255), st.integers(0, 255))
    return st.builds(lambda s, c: image_bytes(fmt, size=s, color=c), sizes, colors)


schemathesis.openapi.media_type("image/jpeg", _images("JPEG"))
schemathesis.openapi.media_type("image/png", _images("PNG"))


FUZZ_OPTIONS = replace(ROOMY, controller_lease_s=0.2)
# The description the server serves (test_openapi_describes_exactly_the_api_routes checks they are equal).
fuzz_schema = schemathesis.openapi.from_dict(openapi_spec(FUZZ_OPTIONS)).exclude(path="/api/stream.mjpeg")


@pytest.fixture(scope="module")
def fuzz_target(tiny_bundle):
    with Assistant(tiny_bundle, AssistantOptions(frame_interval_s=1.0, frames_per_turn=1, max_new_tokens=4)) as a:
        with running_server(a, FUZZ_OPTIONS) as base:
            yield a, base


@fuzz_schema.parametrize()
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_fuzz_every_endpoint_against_its_openapi_description(case, fuzz_target):
    assistant, base = fuzz_target
    case.call_and_validate(base_url=base)
    assert assistant.alive


@given(body=st.one_of(st.binary(max_size=2048), _images("PNG").map(lambda b: b[: len(b) // 2]),
                      _images("JPEG").map(lambda b: b[:20] + bytes(reversed(b[20:])))),
       fmt=st.sampled_from(["image/jpeg", "image/png"]))
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_fuzz_frame_bodies_never_break_the_server(body, fmt, fuzz_target):
    assistant, base = fuzz_target
    r = httpx.post(base + "/api/frames", content=body, headers={"Content-Type": fmt}, timeout=10)
    assert r.status_code in (202, 400, 422), r.text
    assert set(r.json()) <= {"accepted", "frame", "error", "message"}
    assert assistant.alive
