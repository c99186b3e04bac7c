"""Sources and the capture thread: files, URLs, errors that say what to try, corrupt frames, reconnecting."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from mjpeg import MjpegServer

from edge_duet.errors import SourceError, UsageError
from edge_duet.runtime.capture import (
    CaptureOptions,
    CaptureThread,
    SourceSpec,
    as_bgr,
    open_source,
    opencv_has_gstreamer,
)
from edge_duet.runtime.clock import FrameSampler, LiveClock, SamplerClosed, SimulatedClock


def make_video(path: Path, n_frames: int = 40, fps: int = 10, size=(64, 48)) -> Path:
    """Frame i is a flat grey of value 5*i (readable back through MPEG-4 coding to within a few levels)."""
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
    assert w.isOpened()
    for i in range(n_frames):
        w.write(np.full((size[1], size[0], 3), (5 * i) % 256, np.uint8))
    w.release()
    return path


def drain(sampler: FrameSampler, timeout: float = 10.0):
    turns = []
    while True:
        try:
            turn = sampler.take(timeout=timeout)
        except SamplerClosed:
            return turns
        assert turn is not None, "no turn within the timeout"
        turns.append(turn)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------ frames


def test_as_bgr_normalises_or_rejects_frames():
    assert as_bgr(np.zeros((4, 5), np.uint8)).shape == (4, 5, 3)
    assert as_bgr(np.zeros((4, 5, 4), np.uint8)).shape == (4, 5, 3)
    assert as_bgr(np.zeros((4, 5, 3), np.uint8)).flags["C_CONTIGUOUS"]
    assert as_bgr(None) is None
    assert as_bgr(np.zeros((0, 5, 3), np.uint8)) is None
    assert as_bgr(np.zeros((4, 5, 3), np.float32)) is None
    assert as_bgr(np.zeros((4, 5, 2), np.uint8)) is None


# ------------------------------------------------------------------------------------------ files


def test_file_source_reports_container_timestamps(tmp_path):
    src = open_source(SourceSpec("file", str(make_video(tmp_path / "v.mp4", n_frames=12, fps=10))))
    ts = []
    while src.grab():
        ts.append(round(src.media_ts(), 3))
    src.release()
    assert ts == [round(i / 10, 3) for i in range(12)]  # the probed first frame is not lost


def test_fast_file_capture_is_deterministic_and_complete(tmp_path):
    video = make_video(tmp_path / "v.mp4", n_frames=45, fps=10)  # 4.4 s
    results = []
    for _ in range(2):
        sampler = FrameSampler(1.0, 2, drop_when_full=False)
        stop = threading.Event()
        statuses = []
        cap = CaptureThread(open_source(SourceSpec("file", str(video))), SimulatedClock(), sampler, stop=stop,
                            on_status=lambda s, m: statuses.append(s))
        cap.start()
        turns = drain(sampler)
        cap.join(5)
        assert not cap.is_alive()
        assert statuses == ["eof"]
        results.append([(t.times_s, [int(f.mean()) for f in t.frames]) for t in turns])
    assert results[0] == results[1]
    assert [times for times, _ in results[0]] == [(0.0, 1.0), (2.0, 3.0), (4.0,)]
    values = [v for _, vals in results[0] for v in vals]
    assert values == pytest.approx([0, 50, 100, 150, 200], abs=4)  # the frames at 0, 1, 2, 3, 4 s


def test_missing_file_says_what_to_pass(tmp_path):
    with pytest.raises(SourceError, match="no video file at .*`file`"):
        open_source(SourceSpec("file", str(tmp_path / "nope.mp4")))


def test_undecodable_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"this is not a video" * 100)
    with pytest.raises(SourceError, match="cannot decode|no decodable"):
        open_source(SourceSpec("file", str(bad)))


# ------------------------------------------------------------------------------------------ live sources


def test_missing_camera_lists_what_to_try():
    index = 63  # no machine running these tests has 64 cameras
    with pytest.raises(SourceError) as info:
        open_source(SourceSpec("camera", str(index)))
    msg = str(info.value)
    for hint in ("`camera` 1", "video", "`gst`", "`url`", "`file` FILE", "`demo`"):
        assert hint in msg


def test_camera_index_must_be_a_number():
    with pytest.raises(UsageError, match="device index"):
        open_source(SourceSpec("camera", "front"))


def test_url_needs_a_stream_scheme():
    with pytest.raises(SourceError, match="rtsp://"):
        open_source(SourceSpec("url", "/dev/video0"))


def test_unreachable_url_is_a_clear_error():
    url = f"http://127.0.0.1:{free_port()}/nothing"
    with pytest.raises(SourceError, match="check the address"):
        open_source(SourceSpec("url", url), CaptureOptions(open_timeout_s=2, read_timeout_s=2))


def test_gstreamer_without_support_explains_the_jetson_fix():
    if opencv_has_gstreamer():
        pytest.skip("this OpenCV has GStreamer: the missing-support message cannot be shown")
    with pytest.raises(SourceError, match="--system-site-packages"):
        open_source(SourceSpec("gst", "videotestsrc ! appsink"))


def test_gstreamer_pipeline_source_reads_frames():
    if not opencv_has_gstreamer():
        pytest.skip("OpenCV is built without GStreamer (the PyPI wheels are); JetPack's OpenCV has it")
    src = open_source(SourceSpec("gst", "videotestsrc num-buffers=30 ! video/x-raw,width=64,height=48 ! "
                                        "videoconvert ! video/x-raw,format=BGR ! appsink"))
    assert src.grab() and src.retrieve().shape == (48, 64, 3)
    src.release()


def test_http_mjpeg_stream_is_read_live():
    server = MjpegServer(free_port()).start()
    try:
        src = open_source(SourceSpec("url", server.url), CaptureOptions(open_timeout_s=5, read_timeout_s=2))
        sampler = FrameSampler(0.1, 2, drop_when_full=True)
        stop = threading.Event()
        cap = CaptureThread(src, LiveClock(), sampler, stop=stop, keep_latest=True)
        cap.start()
        turn = sampler.take(timeout=5)
        assert turn is not None and turn.frames[0].shape == (48, 64, 3)
        assert cap.latest.get() is not None
        stop.set()
        sampler.abort()
        cap.join(5)
        assert not cap.is_alive()
    finally:
        server.stop()


def test_killed_stream_is_reconnected_and_sampling_resumes():
    """The source dies mid-run: the capture thread says so, retries with backoff, and frames flow again."""
    server = MjpegServer(free_port()).start()
    options = CaptureOptions(open_timeout_s=2, read_timeout_s=2, backoff_initial_s=0.2, backoff_max_s=0.4)
    statuses: list[tuple[str, float]] = []
    src = open_source(SourceSpec("url", server.url), options)
    sampler = FrameSampler(0.1, 1, drop_when_full=True)
    stop = threading.Event()
    cap = CaptureThread(src, LiveClock(), sampler, stop=stop, options=options,
                        on_status=lambda s, m: statuses.append((s, time.monotonic())))
    cap.start()
    try:
        assert sampler.take(timeout=5) is not None
        server.stop()
        deadline = time.monotonic() + 10
        while not any(s == "lost" for s, _ in statuses) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert any(s == "lost" for s, _ in statuses), statuses
        time.sleep(1.0)  # a few failed retries while it is down
        assert not cap.connected
        server.start()
        deadline = time.monotonic() + 10
        while not cap.connected and time.monotonic() < deadline:
            time.sleep(0.05)
        assert cap.connected and cap.reconnects == 1
        names = [s for s, _ in statuses]
        assert names[0] == "lost" and "retry" in names and names[-1] == "reconnected"
        retries = [t for s, t in statuses if s == "retry"]
        gaps = np.diff(retries)
        assert all(g >= 0.15 for g in gaps)  # backoff, not a busy loop
        sampler.take(timeout=0)  # whatever was buffered before the fault
        after = sampler.take(timeout=5)
        assert after is not None and after.t > 1.0  # new frames, stamped on the continuing wall clock
        assert sampler.missed_samples > 0  # the outage shows as missed samples, not model drops
    finally:
        stop.set()
        sampler.abort()
        cap.join(5)
        server.stop()
    assert not cap.is_alive()


# ------------------------------------------------------------------------------------------ faults with fakes


class FakeSource:
    """A source scripted frame by frame: ``script`` items are frames, ``None`` (corrupt) or ``"fail"`` (grab fails)."""

    def __init__(self, script, live=True):
        self.spec = SourceSpec("camera" if live else "file", "0")
        self.script = list(script)
        self.frame_count = 0
        self.frames_grabbed = 0
        self.released = False
        self._cur = None

    def grab(self):
        if not self.script:
            return False
        item = self.script.pop(0)
        if isinstance(item, str):
            return False
        self._cur = item
        self.frames_grabbed += 1
        return True

    def retrieve(self):
        return as_bgr(self._cur)

    def media_ts(self):
        return None

    def release(self):
        self.released = True


def test_corrupt_frames_are_skipped_and_counted():
    good = np.zeros((8, 8, 3), np.uint8)
    src = FakeSource([good, None, np.zeros((8, 8), np.float64), good, good])
    sampler = FrameSampler(1e-6, 1, drop_when_full=True)  # sample every frame
    statuses = []
    stop = threading.Event()
    cap = CaptureThread(src, LiveClock(), sampler, stop=stop, reopen=lambda: (_ for _ in ()).throw(SourceError("gone")),
                        on_status=lambda s, m: statuses.append(s),
                        options=CaptureOptions(backoff_initial_s=0.01, backoff_max_s=0.01))
    cap.start()
    time.sleep(0.3)
    stop.set()
    cap.join(5)
    assert cap.corrupt_frames == 2
    assert statuses[0] == "corrupt"
    assert sampler.sampled_frames == 3
    assert src.released


def test_reconnect_keeps_trying_with_growing_backoff_until_the_source_returns():
    frame = np.zeros((8, 8, 3), np.uint8)
    attempts = []

    def reopen():
        attempts.append(time.monotonic())
        if len(attempts) < 3:
            raise SourceError("still unplugged")
        return FakeSource([frame] * 3)

    statuses = []
    sampler = FrameSampler(1e-6, 1, drop_when_full=True)
    stop = threading.Event()
    cap = CaptureThread(FakeSource([frame, "fail"]), LiveClock(), sampler, stop=stop, reopen=reopen,
                        on_status=lambda s, m: statuses.append(s),
                        options=CaptureOptions(backoff_initial_s=0.05, backoff_max_s=1.0))
    cap.start()
    deadline = time.monotonic() + 5
    while cap.reconnects == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert cap.reconnects == 1
    assert statuses[:4] == ["lost", "retry", "retry", "reconnected"]
    gaps = np.diff(attempts)
    assert gaps[1] > gaps[0] * 1.5  # exponential backoff
    deadline = time.monotonic() + 5
    while cap.reconnects == 1 and time.monotonic() < deadline:  # the fake runs dry: lost again
        time.sleep(0.01)
    stop.set()
    sampler.abort()
    cap.join(5)
    assert not cap.is_alive()


def test_file_end_closes_the_sampler_with_a_final_partial_turn():
    frame = np.zeros((8, 8, 3), np.uint8)
    src = FakeSource([frame] * 3, live=False)
    src.media_ts = lambda: float(src.frames_grabbed - 1)  # 0, 1, 2 s
    sampler = FrameSampler(1.0, 2, drop_when_full=False)
    statuses = []
    cap = CaptureThread(src, SimulatedClock(), sampler, stop=threading.Event(), on_status=lambda s, m: statuses.append(s))
    cap.start()
    turns = drain(sampler)
    cap.join(5)
    assert [t.times_s for t in turns] == [(0.0, 1.0), (2.0,)]
    assert turns[-1].final
    assert statuses == ["eof"]
