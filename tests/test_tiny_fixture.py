"""The committed tests/fixtures/tiny-bundle is what the exporter writes today: the runtime-only test run
(tests/conftest.py uses it where torch is missing) must test the same model the full run exports.

When this fails, regenerate it: ``python scripts/make_tiny_bundle.py`` (needs the export extra)."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import FIXTURE_BUNDLE
from edge_duet.manifest import Manifest

pytest.importorskip("torch", reason="compares the committed bundle with a fresh export (export extra)")

REGENERATE = "the committed tiny bundle is stale: regenerate it with `python scripts/make_tiny_bundle.py`"
VOLATILE = ("export_info", "files", "provenance")  # dates, timings, versions, checksums of the ONNX files


def test_the_fixture_is_small_and_loads():
    size = sum(p.stat().st_size for p in FIXTURE_BUNDLE.iterdir())
    assert size < 2 * 1024**2, f"{size} bytes: the fixture is meant to stay small (tiny shape)"
    manifest = Manifest.load(FIXTURE_BUNDLE)
    manifest.check_files(FIXTURE_BUNDLE)


def test_the_fixture_has_the_fresh_export_s_manifest(tiny_bundle):
    fresh, committed = (Manifest.load(b).to_json() for b in (tiny_bundle, FIXTURE_BUNDLE))
    for key in VOLATILE:
        fresh.pop(key), committed.pop(key)
    assert committed == fresh, REGENERATE


def test_the_fixture_says_what_the_fresh_export_says(tiny_bundle):
    """Same weights: token for token the same dialogue over turns with frames, a question and a forced reply."""
    from edge_duet.runtime.session import Session, SessionOptions

    rng = np.random.default_rng(5)
    frames = [rng.integers(0, 256, (56 + 28 * (i % 2), 84, 3), dtype=np.uint8) for i in range(6)]

    def dialogue(bundle):
        session = Session(bundle, SessionOptions(max_new_tokens=6))
        replies = []
        for turn in range(3):
            if turn == 1:
                session.ask("What changed?", must_reply=True)
            session.add_frames(frames[2 * turn:2 * turn + 2], t=2.0 * turn + 1)
            replies += [(type(e).__name__, getattr(e, "token_ids", None)) for e in session.step()
                        if type(e).__name__ in ("Reply", "Silence")]
        replies += [(type(e).__name__, getattr(e, "token_ids", None)) for e in session.finish()]
        return session.dialogue_ids(), replies

    assert dialogue(FIXTURE_BUNDLE) == dialogue(tiny_bundle), REGENERATE
