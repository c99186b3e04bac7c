"""`edge-duet run`: scheduling and drop policy (with a fake model), typed input, Ctrl-C, the CLI's errors, and
end-to-end runs on generated videos, a local RTSP server and a stream killed mid-run (with a tiny real bundle)."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from mjpeg import MjpegServer

from edge_duet.apps.cli import app
from edge_duet.apps.runner import Command, Question, Runner, RunOptions, display_available, one_line, parse_input
from edge_duet.runtime.capture import SourceSpec, as_bgr, open_source
from edge_duet.runtime.clock import LiveClock, SimulatedClock
from edge_duet.errors import UsageError
from edge_duet.protocol import PromptSpec
from edge_duet.runtime.events import Reply, Silence, TurnStarted, TurnStats

# ------------------------------------------------------------------------------------------ helpers


def make_video(path: Path, seconds: float = 6.0, fps: int = 10, size: int = 96) -> Path:
    """A moving, colour-changing disc on grey: frames differ, so a real model sees something happen."""
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (size, size))
    assert w.isOpened()
    for i in range(int(seconds * fps)):
        img = np.full((size, size, 3), 128, np.uint8)
        x = int(size * (0.2 + 0.6 * i / (seconds * fps)))
        colour = (40, 40, 225) if i < seconds * fps / 2 else (50, 190, 40)
        cv2.circle(img, (x, size // 2), size // 6, colour, -1)
        w.write(img)
    w.release()
    return path


def read_events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_for(cond, timeout=20.0, every=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(every)
    return cond()


class FakeManifest:
    prompt = PromptSpec(frame_interval_s=1.0, frames_per_turn=2)
    name = "fake"
    variant = "fp32"


class FakeSession:
    """The Session verbs with scripted behaviour, for scheduling tests only (no model). Its events are the real
    Session's: a must-reply turn's ``Reply`` holds what the model wrote after the ``I must reply.`` prefill."""

    def __init__(self, step_s: float = 0.0, reply_on_question: bool = True):
        self.step_s = step_s
        self.reply_on_question = reply_on_question
        self.manifest = FakeManifest()
        self.max_context_tokens = 1000
        self.turn = 0
        self.asked: list[tuple[str, bool]] = []
        self.frames_seen: list[tuple[float, int]] = []
        self.resets = 0
        self.cancels = 0
        self.finished = False
        self._q: tuple[str, bool] | None = None
        self._n = 0
        self._t = 0.0
        self._cancel = threading.Event()

    def ask(self, text, must_reply=False):
        assert not text.startswith("/"), f"an operator command reached the model: {text!r}"
        self.asked.append((text, must_reply))
        self._q = (text, must_reply)

    def add_frames(self, frames, t, channels="bgr"):
        assert channels == "bgr" and all(f.dtype == np.uint8 and f.ndim == 3 for f in frames)
        self._n += len(frames)
        self._t = t
        self.frames_seen.append((t, len(frames)))

    def step(self):
        turn, t, q = self.turn, self._t, self._q
        self.turn += 1
        self._q, n, self._n = None, self._n, 0
        self._cancel.clear()
        yield TurnStarted(turn, t, n, q[0] if q else None, q[1] if q else False)
        deadline = time.monotonic() + self.step_s
        while time.monotonic() < deadline and not self._cancel.is_set():
            time.sleep(0.005)
        if q and self.reply_on_question:
            yield Reply(turn, t, f"answer to {q[0]}", (1, 2), self.step_s)
        else:
            yield Silence(turn, t)
        yield TurnStats(turn, t, 0.0, 0.0, self.step_s, 1, 0, 100 * (turn + 1), self.max_context_tokens, n, 0)

    def finish(self):
        self.finished = True
        return iter(())

    def cancel(self):
        self.cancels += 1
        self._cancel.set()

    def reset(self):
        self.resets += 1


class SyntheticCamera:
    """A live source delivering ``fps`` frames a second, like a webcam."""

    def __init__(self, fps: float = 100.0):
        self.spec = SourceSpec("camera", "0")
        self.fps = fps
        self.frame_count = 0
        self.frames_grabbed = 0
        self.released = False

    def grab(self):
        time.sleep(1 / self.fps)
        self.frames_grabbed += 1
        return True

    def retrieve(self):
        return as_bgr(np.full((32, 32, 3), self.frames_grabbed % 256, np.uint8))

    def media_ts(self):
        return None

    def release(self):
        self.released = True


def capture_running() -> bool:
    return any(th.name == "edge-duet-capture" and th.is_alive() for th in threading.enumerate())


def quiet_runner(session, source, clock, tmp_path, **kw) -> tuple[Runner, io.StringIO, io.StringIO]:
    out, err = io.StringIO(), io.StringIO()
    opts = dict(frame_interval_s=1.0, frames_per_turn=2, events_path=tmp_path / "events.jsonl", read_stdin=False,
                status_line=False)
    opts.update(kw.pop("options", {}))
    runner = Runner(session, source, clock, RunOptions(**opts), out=out, err=err, **kw)
    return runner, out, err


# ------------------------------------------------------------------------------------------ typed input


@pytest.mark.parametrize(
    "line, expected",
    [
        ("what colour is it?", Question("what colour is it?", False)),
        ("what colour is it?!", Question("what colour is it?", True)),
        ("  please reset the counter  ", Question("please reset the counter", False)),  # a word, not a command
        ("how do I quit smoking?", Question("how do I quit smoking?", False)),
        ("/reset", Command("reset")),
        ("/QUIT", Command("quit")),
        ("/exit", Command("quit")),
        ("/stop now", Command("stop")),
        ("/frobnicate", Command("frobnicate", known=False)),
        ("//reset is a path", Question("/reset is a path", False)),
        ("   ", None),
    ],
)
def test_parse_input(line, expected):
    assert parse_input(line) == expected


def test_must_reply_option_applies_to_every_question():
    assert parse_input("anything new", must_reply=True) == Question("anything new", True)


# ------------------------------------------------------------------------------------------ scheduling


def test_slow_model_drops_frames_instead_of_queueing_them(tmp_path):
    """A model 4x slower than the frames: samples are dropped (newest wins), the hand-off never holds more than
    one turn, and the lag between a frame and the model seeing it stays bounded instead of growing."""
    session = FakeSession(step_s=0.4)
    runner, _, _ = quiet_runner(session, SyntheticCamera(fps=100), LiveClock(), tmp_path,
                                options=dict(frame_interval_s=0.05, frames_per_turn=2))
    threading.Timer(3.0, runner.request_quit).start()
    assert runner.run() == 0
    sampler = runner.assistant.sampler
    assert runner.turns >= 4
    assert sampler.max_buffered <= 2
    assert sampler.dropped_frames > 3 * runner.turns  # ~8 samples per 0.4 s turn, 2 used
    processed = sum(n for _, n in session.frames_seen)
    assert processed + sampler.dropped_frames + sampler.buffered >= sampler.sampled_frames - 2
    events = read_events(tmp_path / "events.jsonl")
    lags = [e["lag_s"] for e in events if e["event"] == "frames"]
    assert max(lags) < 0.3, lags  # an unbounded queue would be seconds behind by now
    assert np.mean(lags[-3:]) < np.mean(lags[:3]) + 0.15, lags  # not growing
    times = [t for t, _ in session.frames_seen]
    assert all(b - a > 0.3 for a, b in zip(times, times[1:]))  # each turn jumps to the present
    frames = [e for e in events if e["event"] == "frames"]
    assert frames[-1]["dropped_frames"] > 0
    assert events[-1]["event"] == "end" and events[-1]["dropped_frames"] == sampler.dropped_frames


def test_fast_clock_processes_every_sampled_frame_whatever_the_model_speed(tmp_path):
    video = make_video(tmp_path / "v.mp4", seconds=5.0)
    results = []
    for step_s in (0.0, 0.15):
        session = FakeSession(step_s=step_s)
        runner, _, _ = quiet_runner(session, open_source(SourceSpec("file", str(video))), SimulatedClock(), tmp_path)
        assert runner.run() == 0
        assert runner.assistant.sampler.dropped_frames == 0
        assert session.finished
        results.append(session.frames_seen)
    assert results[0] == results[1] == [(1.0, 2), (3.0, 2), (4.0, 1)]  # 0,1 | 2,3 | 4 (the last, short turn)


def test_questions_attach_to_the_next_turn_and_commands_never_reach_the_model(tmp_path):
    session = FakeSession(step_s=0.05)
    runner, out, err = quiet_runner(session, SyntheticCamera(fps=50), LiveClock(), tmp_path,
                                    options=dict(frame_interval_s=0.05, frames_per_turn=1, questions=("what is here?",)))

    def typist():
        assert wait_for(lambda: session.turn >= 2, 10)
        runner.submit("what colour is it?!")
        assert wait_for(lambda: len(session.asked) >= 2, 10)
        runner.submit("/reset")
        runner.submit("please reset the view")  # a question that mentions reset
        runner.submit("/bogus")
        runner.submit("/help")
        assert wait_for(lambda: session.resets == 1 and len(session.asked) >= 3, 10)
        runner.submit("/quit")

    th = threading.Thread(target=typist)
    th.start()
    assert runner.run() == 0
    th.join(5)
    assert session.asked == [("what is here?", False), ("what colour is it?", True), ("please reset the view", False)]
    assert session.resets == 1 and session.finished
    text = out.getvalue()
    assert "you: what is here?" in text
    assert "you (answer now): what colour is it?" in text
    assert "assistant: answer to what colour is it?" in text and "I must reply" not in text
    notes = err.getvalue()
    assert "unknown command /bogus" in notes and "/reset" in notes and "dialogue reset" in notes
    events = read_events(tmp_path / "events.jsonl")
    assert any(e["event"] == "command" and e["name"] == "reset" for e in events)
    assert events[-1]["event"] == "end" and events[-1]["reason"] == "quit"
    assert [e["question"] for e in events if e["event"] == "turn" and e["question"]] == [
        "what is here?", "what colour is it?", "please reset the view"]


def test_stdin_lines_are_read_and_stdin_end_does_not_stop_a_live_run(tmp_path):
    session = FakeSession(step_s=0.02)
    r, w = os.pipe()
    stdin = os.fdopen(r, "r")
    runner, _, _ = quiet_runner(session, SyntheticCamera(fps=50), LiveClock(), tmp_path, stdin=stdin,
                                options=dict(frame_interval_s=0.05, frames_per_turn=1, read_stdin=True))

    def typist():
        os.write(w, "hello there\n".encode())
        os.close(w)  # stdin ends: the camera keeps running
        assert wait_for(lambda: session.asked, 10)
        time.sleep(0.3)
        runner.request_quit()

    th = threading.Thread(target=typist)
    th.start()
    assert runner.run() == 0
    th.join(5)
    stdin.close()
    assert session.asked == [("hello there", False)]
    assert runner.turns > 5


def test_ctrl_c_first_cancels_the_reply_then_exits_130(tmp_path):
    session = FakeSession(step_s=5.0)  # a long "reply" that only cancel() shortens
    runner, _, err = quiet_runner(session, SyntheticCamera(fps=50), LiveClock(), tmp_path,
                                  options=dict(frame_interval_s=0.05, frames_per_turn=1))
    pid = os.getpid()

    def press():
        assert wait_for(lambda: session.turn >= 1, 10)
        os.kill(pid, signal.SIGINT)  # handled by the runner, not KeyboardInterrupt
        assert wait_for(lambda: session.turn >= 2, 10)  # the run went on with the next turn
        os.kill(pid, signal.SIGINT)

    th = threading.Thread(target=press)
    before = signal.getsignal(signal.SIGINT)
    th.start()
    t0 = time.monotonic()
    assert runner.run() == 130
    th.join(5)
    assert time.monotonic() - t0 < 8  # neither 5 s step ran to its end
    assert session.cancels >= 2
    assert "press Ctrl-C again" in err.getvalue()
    assert signal.getsignal(signal.SIGINT) is before  # restored
    events = read_events(tmp_path / "events.jsonl")
    assert events[-1]["event"] == "end" and events[-1]["reason"] == "interrupt" and events[-1]["exit_code"] == 130
    assert not capture_running()


def test_events_file_is_flushed_while_running(tmp_path):
    session = FakeSession(step_s=0.02)
    runner, _, _ = quiet_runner(session, SyntheticCamera(fps=50), LiveClock(), tmp_path,
                                options=dict(frame_interval_s=0.05, frames_per_turn=1, questions=("hi?",)))
    seen = []

    def reader():
        assert wait_for(lambda: session.turn >= 3, 10)
        seen.extend(read_events(tmp_path / "events.jsonl"))  # while the file is still open
        runner.request_quit()

    th = threading.Thread(target=reader)
    th.start()
    runner.run()
    th.join(5)
    kinds = [e["event"] for e in seen]
    assert kinds[0] == "run" and "frames" in kinds and "turn" in kinds and "reply" in kinds and "stats" in kinds


def test_model_error_ends_the_run_and_is_raised_after_cleanup(tmp_path):
    class Broken(FakeSession):
        def step(self):
            raise RuntimeError("decoder exploded")
            yield  # pragma: no cover

    runner, _, _ = quiet_runner(Broken(), SyntheticCamera(fps=50), LiveClock(), tmp_path,
                                options=dict(frame_interval_s=0.05, frames_per_turn=1))
    with pytest.raises(RuntimeError, match="decoder exploded"):
        runner.run()
    assert not capture_running()
    assert read_events(tmp_path / "events.jsonl")[-1]["reason"] == "error"


def test_speech_gets_final_replies_without_the_must_reply_prefix(tmp_path):
    said = []

    class Speaker:
        def say(self, text, t=0.0, turn=0):
            said.append((text, t))

        def close(self, timeout=5.0, finish=False):
            said.append(("<closed>", finish))

    video = make_video(tmp_path / "v.mp4", seconds=3.0)
    runner, _, _ = quiet_runner(FakeSession(), open_source(SourceSpec("file", str(video))), SimulatedClock(), tmp_path,
                                speaker=Speaker(), options=dict(questions=("what is it?!",)))
    assert runner.run() == 0
    assert said == [("answer to what is it?", 1.0), ("<closed>", True)]


# ------------------------------------------------------------------------------------------ CLI without a model


cli = CliRunner()


def invoke(args, **kw):
    return cli.invoke(app, ["run", *args], **kw)


def test_cli_needs_exactly_one_source(tmp_path):
    r = invoke([])
    assert r.exit_code == 2 and "no source" in r.output and "--demo" in r.output
    r = invoke(["--camera", "0", "--video", "x.mp4"])
    assert r.exit_code == 2 and "one source" in r.output
    r = invoke(["--demo", "--camera", "0"])
    assert r.exit_code == 2


def test_library_errors_name_options_and_the_cli_shows_flags():
    from edge_duet.apps.common import cli_text
    from edge_duet.errors import SourceError
    from edge_duet.runtime.capture import SourceSpec

    with pytest.raises(UsageError) as info:  # the API names its own option, not a flag
        SourceSpec("camera", "front")
    assert "--" not in str(info.value) and "`camera` takes a device index" in str(info.value)
    assert cli_text(info.value).startswith("--camera takes a device index")
    assert cli_text(SourceError("raise `max_context_tokens`, set `ServerOptions.url`; `ffprobe x` is no option")) == (
        "raise --max-context, set --server; `ffprobe x` is no option")


def test_cli_fast_is_for_files_only():
    r = invoke(["--camera", "0", "--fast", "--model", "/nonexistent"])
    assert r.exit_code == 2 and "--fast plays files only" in r.output


def test_cli_missing_camera_lists_what_to_try(tmp_path):
    r = invoke(["--camera", "63", "--model", str(tmp_path / "bundle")])
    assert r.exit_code == 7, r.output
    for hint in ("camera 63", "--gst", "--url", "--video FILE", "--demo"):
        assert hint in r.output


def test_cli_missing_video_file(tmp_path):
    r = invoke(["--video", str(tmp_path / "nope.mp4"), "--model", str(tmp_path / "bundle")])
    assert r.exit_code == 7 and "no video file" in r.output


def test_cli_display_without_a_display_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    ok, why = display_available()
    assert not ok and why
    r = invoke(["--video", str(make_video(tmp_path / "v.mp4", 1.0)), "--display", "--model", str(tmp_path / "b")])
    assert r.exit_code == 2 and "--display cannot open a window" in r.output


def test_cli_missing_model_says_which_bundle_to_pass(tmp_path):
    r = invoke(["--video", str(make_video(tmp_path / "v.mp4", 1.0)), "--model", str(tmp_path / "no-bundle")])
    assert r.exit_code == 4 and "edge-duet export" in r.output


def test_cli_demo_without_the_demo_model_is_a_clear_error(tmp_path, monkeypatch):
    from edge_duet.apps import common

    if (common.default_model_dir() / "manifest.json").is_file():
        pytest.skip("the demo model is installed")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    r = invoke(["--demo"])
    assert r.exit_code == 4 and "demo model is missing" in r.output


def test_demo_scene_renders_a_playable_video(tmp_path):
    from edge_duet.apps.demo_scene import write_demo_video

    path = write_demo_video(tmp_path / "demo.mp4", duration_s=3.0, fps=5)
    src = open_source(SourceSpec("file", str(path)))
    n = 1
    while src.grab():
        n += 1
    src.release()
    assert n - 1 == 15


# ------------------------------------------------------------------------------------------ end to end, tiny real bundle


def run_fast(bundle: Path, video: Path, events: Path, *extra: str):
    r = invoke(["--video", str(video), "--fast", "--events", str(events), "--model", str(bundle), *extra])
    assert r.exit_code == 0, r.output
    return r, read_events(events)


def test_e2e_fast_run_on_a_generated_video(tiny_bundle, tmp_path):
    video = make_video(tmp_path / "scene.mp4", seconds=6.0)
    r, events = run_fast(tiny_bundle, video, tmp_path / "a.jsonl", "--ask", "what is moving?")
    kinds = [e["event"] for e in events]
    assert kinds[0] == "run" and events[0]["clock"] == "fast"
    assert kinds[-1] == "end" and events[-1]["reason"] == "eof" and events[-1]["exit_code"] == 0
    turns = [e for e in events if e["event"] == "turn"]
    assert [(e["turn"], e["t"], e["n_frames"]) for e in turns] == [(0, 1.0, 2), (1, 3.0, 2), (2, 5.0, 2)]
    assert turns[0]["question"] == "what is moving?" and turns[1]["question"] is None
    assert [e["times_s"] for e in events if e["event"] == "frames"] == [[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]]
    assert len([e for e in events if e["event"] == "stats"]) == 3
    # every turn ends with exactly one decision (a late reply may replace a provisional silence)
    decided = {e["turn"] for e in events if e["event"] in ("reply", "silence")}
    assert decided == {0, 1, 2}
    assert all(e["dropped_frames"] == 0 for e in events if e["event"] == "frames")
    assert "token" not in kinds  # deltas stay out of the file
    # the console shows every reply of the file, and nothing else as the assistant's (silences stay quiet)
    said = [line.split("assistant: ", 1)[1] for line in r.stdout.splitlines() if "] assistant: " in line]
    assert said == [one_line(e["text"]) for e in events if e["event"] == "reply"]
    # deterministic: the same file gives the same dialogue
    _, again = run_fast(tiny_bundle, video, tmp_path / "b.jsonl", "--ask", "what is moving?")
    strip = lambda evs: [(e["event"], e.get("turn"), e.get("text")) for e in evs if e["event"] in ("turn", "reply", "silence")]
    assert strip(events) == strip(again)


def test_e2e_must_reply_and_sampling_options(tiny_bundle, tmp_path):
    video = make_video(tmp_path / "scene.mp4", seconds=3.0)
    r, events = run_fast(tiny_bundle, video, tmp_path / "e.jsonl", "--ask", "what colour is it?!",
                         "--frame-interval", "0.5", "--frames-per-turn", "1", "--max-new-tokens", "8")
    turns = [e for e in events if e["event"] == "turn"]
    assert [e["t"] for e in turns] == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]
    assert turns[0]["must_reply"] and turns[0]["question"] == "what colour is it?"
    first = [e for e in events if e["event"] in ("reply", "silence") and e["turn"] == 0]
    assert [e["event"] for e in first] == ["reply"]  # a must-reply turn is answered in that turn, never silent
    assert "you (answer now): what colour is it?" in r.stdout
    assert f"assistant: {one_line(first[0]['text'])}" in r.stdout
    assert "I must reply" not in r.stdout  # the prefill is the model's cue, not something to show
    replies = [e for e in events if e["event"] == "reply"]
    assert all(0 < len(e["token_ids"]) <= 8 for e in replies)  # --max-new-tokens 8, the prefill not counted



def test_e2e_corrupt_frames_are_skipped_and_the_run_ends_normally(tiny_bundle, tmp_path):
    video = make_video(tmp_path / "scene.mp4", seconds=6.0)
    data = bytearray(video.read_bytes())
    rng = np.random.default_rng(0)
    for start in range(int(len(data) * 0.3), int(len(data) * 0.6), 400):  # garble the middle of the stream
        data[start:start + 100] = rng.integers(0, 256, 100, dtype=np.uint8).tobytes()
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(bytes(data))
    _, events = run_fast(tiny_bundle, broken, tmp_path / "c.jsonl", "--max-new-tokens", "2")
    end = events[-1]
    assert end["event"] == "end" and end["reason"] == "eof" and end["exit_code"] == 0
    assert end["corrupt_frames"] > 0 and end["turns"] >= 2
    assert any(e["event"] == "source" and e["status"] == "corrupt" for e in events)

@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed (apt install espeak-ng)")
def test_e2e_spoken_replies_are_written_as_wavs(tiny_bundle, tmp_path):
    from edge_duet.runtime.speech import find_player

    video = make_video(tmp_path / "scene.mp4", seconds=2.0)
    r, events = run_fast(tiny_bundle, video, tmp_path / "s.jsonl", "--ask", "say something?!", "--speak",
                         "--audio-dir", str(tmp_path / "speech"), "--max-new-tokens", "12")
    replies = [e for e in events if e["event"] == "reply"]
    assert replies
    wavs = sorted((tmp_path / "speech").glob("*.wav"))
    assert wavs and wavs[-1].stat().st_size > 1000
    if find_player()[0] is None:
        assert r.stderr.count("no audio device") == 1


def _cli_process(args: list[str], **kw) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "edge_duet.apps.cli", "run", *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, **kw)


def _events_so_far(path: Path) -> list[dict]:
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    return [json.loads(line) for line in lines if line.endswith("}")]


RTSP_SERVER = r'''
import sys
import gi
gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer
Gst.init(None)
server = GstRtspServer.RTSPServer()
server.set_address("127.0.0.1")
server.set_service(sys.argv[1])
factory = GstRtspServer.RTSPMediaFactory()
factory.set_launch("( videotestsrc is-live=true pattern=ball ! video/x-raw,width=160,height=120,framerate=10/1 ! "
                   "videoconvert ! x264enc tune=zerolatency speed-preset=ultrafast key-int-max=10 ! "
                   "rtph264pay name=pay0 pt=96 config-interval=1 )")
factory.set_shared(True)
server.get_mount_points().add_factory("/cam", factory)
if server.attach(None) == 0:
    sys.exit("cannot bind")
print("READY", flush=True)
GLib.MainLoop().run()
'''


def _rtsp_server_python() -> str | None:
    """A Python with GStreamer's RTSP server bindings and an H.264 encoder (Debian: python3-gi,
    gir1.2-gst-rtsp-server-1.0, gstreamer1.0-plugins-ugly), or None."""
    for exe in ("/usr/bin/python3", shutil.which("python3"), sys.executable):
        if not exe or not os.path.exists(exe):
            continue
        probe = ("import gi; gi.require_version('Gst','1.0'); gi.require_version('GstRtspServer','1.0'); "
                 "from gi.repository import Gst, GstRtspServer; Gst.init(None); "
                 "assert Gst.ElementFactory.find('x264enc') and Gst.ElementFactory.find('videotestsrc')")
        if subprocess.run([exe, "-c", probe], capture_output=True, timeout=30).returncode == 0:
            return exe
    return None


def test_e2e_rtsp_stream_from_a_local_gstreamer_server(tiny_bundle, tmp_path):
    python = _rtsp_server_python()
    if python is None:
        pytest.skip("no GStreamer RTSP server: apt install python3-gi gir1.2-gst-rtsp-server-1.0 "
                    "gstreamer1.0-plugins-base gstreamer1.0-plugins-good gstreamer1.0-plugins-ugly")
    (tmp_path / "rtsp.py").write_text(RTSP_SERVER)
    port = free_port()
    server = subprocess.Popen([python, str(tmp_path / "rtsp.py"), str(port)], stdout=subprocess.PIPE, text=True)
    events = tmp_path / "rtsp.jsonl"
    proc = None
    try:
        assert server.stdout.readline().strip() == "READY"
        proc = _cli_process(["--url", f"rtsp://127.0.0.1:{port}/cam", "--model", str(tiny_bundle), "--events",
                             str(events), "--frame-interval", "0.25", "--frames-per-turn", "1",
                             "--max-new-tokens", "4", "--ask", "what is bouncing?"])
        assert wait_for(lambda: sum(e["event"] == "turn" for e in _events_so_far(events)) >= 3, 60), (
            proc.poll(), _events_so_far(events))
        proc.stdin.write(b"/quit\n")
        proc.stdin.flush()
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err.decode()
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
        server.terminate()
        server.wait(10)
    evs = read_events(events)
    assert evs[0]["event"] == "run" and evs[0]["clock"] == "live"
    assert evs[-1]["event"] == "end" and evs[-1]["reason"] == "quit"
    assert [e for e in evs if e["event"] == "turn"][0]["question"] == "what is bouncing?"




def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_e2e_source_killed_mid_run_recovers_and_ctrl_c_exits_130(tiny_bundle, tmp_path):
    """The stream dies mid-run: the run says so, keeps the dialogue, reconnects when the stream is back;
    then Ctrl-C twice ends it with 130 and a complete events file."""
    server = MjpegServer(free_port()).start()
    events = tmp_path / "kill.jsonl"
    proc = _cli_process(["--url", f"http://127.0.0.1:{server.port}/cam.mjpg", "--model", str(tiny_bundle),
                         "--events", str(events), "--frame-interval", "0.2", "--frames-per-turn", "1",
                         "--max-new-tokens", "4"])
    try:
        turns = lambda: [e for e in _events_so_far(events) if e["event"] == "turn"]
        statuses = lambda: [e["status"] for e in _events_so_far(events) if e["event"] == "source"]
        assert wait_for(lambda: len(turns()) >= 3, 60), proc.poll()
        server.stop()
        assert wait_for(lambda: "lost" in statuses(), 30), statuses()
        turns_before = len(turns())
        time.sleep(1.5)  # down for a while: retries with backoff
        assert proc.poll() is None  # still running, dialogue kept
        server.start()
        assert wait_for(lambda: "reconnected" in statuses(), 30), statuses()
        assert wait_for(lambda: len(turns()) >= turns_before + 3, 60)
        proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
        assert proc.poll() is None  # the first Ctrl-C only stops the current reply
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        server.stop()
    assert proc.returncode == 130, err.decode()
    evs = read_events(events)
    t_indices = [e["turn"] for e in evs if e["event"] == "turn"]
    assert t_indices == list(range(len(t_indices)))  # one dialogue across the outage: no reset
    assert evs[-1]["event"] == "end" and evs[-1]["reason"] == "interrupt" and evs[-1]["reconnects"] == 1
    assert evs[-1]["missed_samples"] > 0
    err_text = err.decode()
    assert "reconnecting (the dialogue is kept)" in err_text and "is back" in err_text
    assert "press Ctrl-C again" in err_text


def test_demo_scene_without_the_benchmark_renderer(tmp_path, monkeypatch):
    from edge_duet.apps import demo_scene

    import edge_duet.eval

    monkeypatch.setitem(sys.modules, "edge_duet.eval.scenes", None)  # import fails
    monkeypatch.delattr(edge_duet.eval, "scenes", raising=False)
    kind, render = demo_scene._renderer()
    assert kind == "plain"
    early, late = render(1.0), render(14.0)
    assert early.shape == (demo_scene.DEMO_SIZE, demo_scene.DEMO_SIZE, 3)
    assert np.abs(early.astype(int) - late.astype(int)).sum() > 0  # shapes appear and move
