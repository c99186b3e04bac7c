"""The embedding API (runtime/assistant.py, the one driver) on the tiny bundle: threads, queues, sources, faults,
closing."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from edge_duet.errors import AssistantBusy, AssistantClosed, InputError, SourceError, UsageError
from edge_duet.runtime.assistant import Assistant, AssistantOptions
from edge_duet.runtime.subscription import Closed, Dropped, ModelError, ResetDone, SourceStatus
from edge_duet.runtime.events import Reply, Silence, TokenDelta, TurnStarted, TurnStats

ONE_FRAME = AssistantOptions(frame_interval_s=1.0, frames_per_turn=1, max_new_tokens=8)


def frame(i: int = 0, size=(72, 96)) -> np.ndarray:
    img = np.zeros((*size, 3), np.uint8)
    img[:] = (40 + 15 * (i % 10), 90, 140)
    img[10:40, (7 * i) % 50:(7 * i) % 50 + 30] = (0, 0, 255)
    return img


def take_until(sub, kind, timeout: float = 20.0) -> list:
    """Events from ``sub`` up to and including the first of type ``kind``."""
    seen, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        ev = sub.get(timeout=0.2)
        if ev is None:
            continue
        seen.append(ev)
        if isinstance(ev, kind):
            return seen
    raise AssertionError(f"no {kind.__name__} within {timeout} s; saw {[type(e).__name__ for e in seen]}")


def write_video(path, seconds: float = 3.0, fps: int = 10, size=(160, 120)):
    import cv2

    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, size)
    for i in range(int(round(seconds * fps))):
        writer.write(frame(i, (size[1], size[0])))
    writer.release()
    return path


def test_frames_and_a_question_make_a_turn_with_a_reply(tiny_bundle):
    with Assistant(tiny_bundle, AssistantOptions(frame_interval_s=1.0, frames_per_turn=2, max_new_tokens=8)) as a, \
            a.subscribe() as sub:
        a.ask("What is moving?", must_reply=True)
        a.add_frame(frame(0), t=0.0)
        a.add_frame(frame(1)[..., ::-1].copy(), t=1.0, channels="rgb")
        seen = take_until(sub, TurnStats)
        started = seen[0]
        assert isinstance(started, TurnStarted) and started.n_frames == 2 and started.t == 1.0
        assert started.question == "What is moving?" and started.must_reply
        reply = next(e for e in seen if isinstance(e, (Reply, Silence)))
        assert isinstance(reply, Reply) and reply.turn == 0  # must_reply: an answer in this turn
        streamed = "".join(e.text for e in seen if isinstance(e, TokenDelta))
        assert reply.text.startswith(streamed.rstrip("\ufffd"))
        status = a.status()
        assert status["turns"] == 1 and status["replies"] == 1 and status["pending_questions"] == 0
        assert status["recent_replies"] == [{"turn": 0, "t": 1.0, "text": reply.text}]
        assert status["frames_sampled"] == 2 and status["context_tokens"] > 0
        index, image, t = a.latest_frame()
        assert index == 2 and t == 1.0 and np.array_equal(image, frame(1))  # kept as BGR


def test_frames_closer_than_the_interval_are_not_sampled(tiny_bundle):
    with Assistant(tiny_bundle, ONE_FRAME) as a, a.subscribe() as sub:
        for t in (0.0, 0.3, 0.6, 0.9):
            a.add_frame(frame(int(t * 10)), t=t)
        take_until(sub, TurnStats)
        a.add_frame(frame(9), t=1.0)
        assert take_until(sub, TurnStats)[0].t == 1.0
        assert a.status()["frames_sampled"] == 2 and a.status()["frames_received"] == 5


def test_a_question_without_frames_is_asked_in_a_text_only_turn(tiny_bundle):
    with Assistant(tiny_bundle, AssistantOptions(frame_interval_s=0.1, frames_per_turn=1, max_new_tokens=4)) as a, \
            a.subscribe() as sub:
        a.ask("Is anyone there?")
        started = take_until(sub, TurnStarted, timeout=10)[-1]
        assert started.n_frames == 0 and started.question == "Is anyone there?"


def test_invalid_inputs_raise_input_errors(tiny_bundle):
    with Assistant(tiny_bundle, ONE_FRAME) as a:
        for bad in (np.zeros((4, 4), np.uint8), np.zeros((4, 4, 3), np.float32), np.zeros((4, 4, 4), np.uint8),
                    np.zeros((0, 4, 3), np.uint8), np.zeros((5000, 2, 3), np.uint8), [[1, 2, 3]]):
            with pytest.raises(InputError):
                a.add_frame(bad)
        with pytest.raises(InputError, match="channels"):
            a.add_frame(frame(), channels="bgra")
        for text in ("", "   ", "x" * 501, None):
            with pytest.raises(InputError):
                a.ask(text)
        assert a.alive and a.status()["errors"] == 0


def test_slow_subscriber_loses_oldest_events_and_is_told(tiny_bundle):
    with Assistant(tiny_bundle, ONE_FRAME) as a, a.subscribe(maxsize=4) as slow, a.subscribe() as full:
        for i in range(3):
            a.ask("Again?", must_reply=True)
            a.add_frame(frame(i), t=float(i))
            take_until(full, TurnStats)
        first = slow.get(timeout=1)
        assert isinstance(first, Dropped) and first.count > 0 and slow.dropped_total == first.count
        rest = [slow.get(timeout=1) for _ in range(4)]
        assert isinstance(rest[-1], TurnStats) and rest[-1].turn == 2  # the newest events are the ones kept
        assert slow.get(timeout=0.2) is None


def test_listener_errors_never_stop_the_model(tiny_bundle):
    def broken(event):
        raise RuntimeError("listener bug")

    with Assistant(tiny_bundle, ONE_FRAME) as a, a.subscribe() as sub:
        a.on_event(broken)
        for i in range(2):
            a.add_frame(frame(i), t=float(i))
            take_until(sub, TurnStats)
        assert a.alive and a.status()["turns"] == 2


def test_busy_command_queue_raises_instead_of_blocking(tiny_bundle):
    release = threading.Event()
    options = AssistantOptions(frame_interval_s=1.0, frames_per_turn=1, max_new_tokens=4, command_queue_size=2)
    with Assistant(tiny_bundle, options) as a:
        holding = threading.Event()

        def hold(event):  # runs on the worker thread: keeps it inside a turn
            if isinstance(event, TurnStarted):
                holding.set()
                release.wait(10)

        remove = a.on_event(hold)
        a.add_frame(frame(), t=0.0)
        assert holding.wait(10)
        a.ask("one")
        a.ask("two")
        started = time.monotonic()
        with pytest.raises(AssistantBusy, match="retry"):
            a.ask("three")
        assert time.monotonic() - started < 0.5
        assert a.status()["pending_questions"] == 2
        remove()
        release.set()


def test_cancel_and_reset(tiny_bundle):
    with Assistant(tiny_bundle, AssistantOptions(frame_interval_s=1.0, frames_per_turn=1, max_new_tokens=64)) as a, \
            a.subscribe() as sub:
        a.on_event(lambda e: a.cancel() if isinstance(e, TurnStarted) else None)
        a.ask("Tell me everything.", must_reply=True)
        a.add_frame(frame(), t=0.0)
        reply = next(e for e in take_until(sub, TurnStats) if isinstance(e, (Reply, Silence)))
        assert isinstance(reply, Reply) and len(reply.token_ids) < 64  # cut short
        a.reset()
        assert take_until(sub, ResetDone)[-1].reason == "request"
        assert a.status()["context_tokens"] == 0
        a.add_frame(frame(2), t=0.0)  # time may start over after a reset
        assert take_until(sub, TurnStats)[0].turn == 0


def test_model_error_is_reported_and_recovered(tiny_bundle, monkeypatch):
    with Assistant(tiny_bundle, ONE_FRAME) as a, a.subscribe() as sub:
        session = a._session
        real_step = session.step
        calls = []

        def flaky():
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("onnxruntime fell over")
            return real_step()

        monkeypatch.setattr(session, "step", flaky)
        a.add_frame(frame(0), t=0.0)
        seen = take_until(sub, ResetDone)
        error = next(e for e in seen if isinstance(e, ModelError))
        assert "onnxruntime fell over" in error.message and error.recovered
        assert error.to_dict()["event"] == "error" and seen[-1].reason == "error"
        assert a.status()["errors"] == 1 and a.alive
        a.ask("Still working?", must_reply=True)
        a.add_frame(frame(1), t=1.0)
        assert any(isinstance(e, Reply) for e in take_until(sub, TurnStats))


def test_many_threads_feed_it_at_once(tiny_bundle):
    errors = []
    with Assistant(tiny_bundle, AssistantOptions(frame_interval_s=0.05, frames_per_turn=2, max_new_tokens=4)) as a, \
            a.subscribe(maxsize=10_000) as sub:
        def feeder(k):
            try:
                for i in range(30):
                    a.add_frame(frame(i + k))
                    if i % 10 == k:
                        try:
                            a.ask(f"question {k}.{i}")
                        except AssistantBusy:
                            pass
                    a.status()
                    a.latest_frame()
                    time.sleep(0.005)
            except Exception as exc:  # noqa: BLE001 - collected for the assertion below
                errors.append(exc)

        threads = [threading.Thread(target=feeder, args=(k,)) for k in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(30)
        assert not errors
        deadline = time.monotonic() + 10
        while a.status()["pending_questions"] and time.monotonic() < deadline:
            time.sleep(0.05)
        status = a.status()
        assert status["frames_received"] == 120 and status["turns"] > 0 and status["errors"] == 0
        assert status["pending_questions"] == 0
        events = []
        while (ev := sub.get(timeout=0.2)) is not None:
            events.append(ev)
        turns = [e.turn for e in events if isinstance(e, TurnStarted)]
        assert turns == sorted(turns) and len(set(turns)) == len(turns)


def test_attached_file_plays_to_the_end(tiny_bundle, tmp_path):
    video = write_video(tmp_path / "clip.avi", seconds=3.0)
    with Assistant(tiny_bundle, AssistantOptions(frame_interval_s=0.5, frames_per_turn=2, max_new_tokens=4)) as a, \
            a.subscribe() as sub:
        a.attach(str(video), realtime=False)  # as fast as the model goes: every sample used
        with pytest.raises(UsageError, match="attached"):
            a.add_frame(frame())
        with pytest.raises(UsageError, match="already attached"):
            a.attach(str(video))
        seen = take_until(sub, SourceStatus)
        deadline = time.monotonic() + 20
        while not (a.status()["source_state"] == "ended" and a.status()["state"] == "waiting"):
            assert time.monotonic() < deadline, a.status()
            time.sleep(0.05)
        while (ev := sub.get(timeout=0.3)) is not None:
            seen.append(ev)
        assert any(isinstance(e, SourceStatus) and e.status == "eof" for e in seen)
        times = [e.t for e in seen if isinstance(e, TurnStarted)]
        assert times == [0.5, 1.5, 2.5]  # samples at 0, 0.5, ... 2.5 s, two per turn
        assert a.latest_frame() is not None and a.status()["source"].startswith("file")
        a.detach()
        assert a.status()["source"] is None
        a.add_frame(frame(), t=10.0)  # frames may be added again


def test_looped_file_keeps_time_moving_forward(tiny_bundle, tmp_path):
    video = write_video(tmp_path / "clip.avi", seconds=1.0)
    with Assistant(tiny_bundle, AssistantOptions(frame_interval_s=0.5, frames_per_turn=1, max_new_tokens=2)) as a, \
            a.subscribe() as sub:
        a.attach(str(video), loop=True, realtime=False)
        seen = take_until(sub, SourceStatus)
        assert seen[-1].status == "eof"
        seen += take_until(sub, SourceStatus)
        assert seen[-1].status == "looped"
        seen += take_until(sub, TurnStarted)
        times = [e.t for e in seen if isinstance(e, TurnStarted)]
        assert times == sorted(times) and times[-1] > 1.0


def test_a_missing_source_fails_at_attach(tiny_bundle, tmp_path):
    with Assistant(tiny_bundle, ONE_FRAME) as a:
        with pytest.raises(SourceError, match="no video file"):
            a.attach(str(tmp_path / "missing.mp4"))
        assert a.status()["source"] is None and a.alive


def test_close_ends_iteration_and_refuses_new_work(tiny_bundle):
    a = Assistant(tiny_bundle, ONE_FRAME)
    sub = a.subscribe()
    collected = []
    reader = threading.Thread(target=lambda: collected.extend(sub))  # plain iteration ends at close
    reader.start()
    a.add_frame(frame(), t=0.0)
    deadline = time.monotonic() + 10
    while a.status()["turns"] < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    a.close()
    a.close()  # idempotent
    reader.join(5)
    assert not reader.is_alive() and isinstance(collected[-1], Closed)
    assert not a.alive and a.status()["state"] == "closed"
    with pytest.raises(AssistantClosed):
        a.add_frame(frame())
    with pytest.raises(AssistantClosed):
        a.ask("hello?")
    assert a.subscribe().get(timeout=0.1) is None


def test_bad_pacing_options_are_refused(tiny_bundle):
    with pytest.raises(UsageError, match="frames_per_turn"):
        Assistant(tiny_bundle, AssistantOptions(frames_per_turn=0, frame_interval_s=1.0))
