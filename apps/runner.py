"""The `edge-duet run` loop's people: a console, a JSONL log, speech and a window, fed by the one driver.

::

    source, clock (open_capture) --> Assistant (runtime/assistant.py: capture thread, sampler, worker thread, Session)
                                   │ on_event (worker / capture thread)
    stdin thread --questions, /commands--> Runner.submit ──> assistant.ask / reset / cancel / finish
                                   v
                     console lines, --events JSONL, speech
    main thread: Ctrl-C, status line (assistant.status()), --display window, and the final clean-up

Operator commands start with ``/`` (``/reset``, ``/quit``, ``/stop``, ``/help``); anything else typed is a
question for the next turn (``//text`` sends text that starts with ``/``). A question ending in ``?!`` (or
every question, with ``--must-reply``) demands an answer now: the model's reply is pre-filled with
``I must reply.``.

``--events`` holds the Session's events (``event.to_dict()``: turn, reply, silence, stats, evicted; token deltas
are left out), the driver's ``frames`` records, and the runner's own records::

    {"event": "run", "source", "clock", "frame_interval_s", "frames_per_turn"}            first line
    {"event": "frames", "t", "times_s", "lag_s", "dropped_frames", "missed_samples"}     before each turn
    {"event": "source", "status": lost|retry|reconnected|corrupt|eof|error, "message", "t"}
    {"event": "command", "name": "reset", "t"}
    {"event": "end", "reason": eof|quit|interrupt|error, "exit_code", "turns", "replies", "dropped_frames",
     "missed_samples", "corrupt_frames", "reconnects", "max_lag_s", "speech_failures"}    last line
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TextIO

from edge_duet.errors import AssistantBusy, AssistantClosed, InputError
from edge_duet.runtime.assistant import Assistant, AssistantOptions
from edge_duet.runtime.clock import Clock
from edge_duet.runtime.events import Event, Evicted, Reply, Silence, TokenDelta, TurnStarted
from edge_duet.runtime.subscription import ResetDone, SourceStatus, TurnFrames

COMMANDS = {
    "reset": "forget the dialogue so far, ending a reply being written (the model stays loaded)",
    "stop": "stop the reply being written now",
    "quit": "finish the current turn and exit",
    "help": "show this list",
}
ALIASES = {"exit": "quit", "q": "quit"}
MAX_TYPED_CHARS = 100_000  # a typed (or pasted) question; the Assistant's default is 500 for network clients


@dataclass(frozen=True)
class RunOptions:
    frame_interval_s: float
    frames_per_turn: int
    questions: tuple[str, ...] = ()  # --ask: attached to the first turn
    must_reply: bool = False  # every question demands an answer now
    events_path: Path | None = None
    display: bool = False
    read_stdin: bool = True
    status_line: bool | None = None  # None: only when stdout and stderr are terminals
    join_timeout_s: float = 10.0


@dataclass(frozen=True)
class Question:
    text: str
    must_reply: bool


@dataclass(frozen=True)
class Command:
    name: str  # a key of COMMANDS, or what was typed when unknown
    known: bool = True


def parse_input(line: str, must_reply: bool = False) -> Question | Command | None:
    """One typed line -> a question for the model, an operator command, or nothing (blank)."""
    text = line.strip()
    if not text:
        return None
    if text.startswith("//"):
        text = text[1:]
    elif text.startswith("/"):
        word = text[1:].split(maxsplit=1)[0].lower() if len(text) > 1 else ""
        word = ALIASES.get(word, word)
        return Command(word, known=word in COMMANDS)
    return as_question(text, must_reply)


def as_question(text: str, must_reply: bool = False) -> Question:
    text = text.strip()
    if text.endswith("?!"):
        return Question(text[:-1], True)
    return Question(text, must_reply)


def one_line(text: str) -> str:
    """Model text made safe for a terminal: control characters (escape sequences too) become spaces."""
    return " ".join("".join(ch if ch.isprintable() else " " for ch in text).split())


def fmt_t(t: float) -> str:
    minutes, seconds = divmod(max(0.0, t), 60.0)
    return f"{int(minutes):02d}:{seconds:04.1f}"


class EventLog:
    """``--events FILE.jsonl``: one JSON object per line, flushed as written (safe to tail while running)."""

    def __init__(self, path: Path | None):
        self._lock = threading.Lock()
        self._f = None
        if path is not None:  # checked before the model loaded (apps/outputs.py); this is the rare race
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                self._f = open(path, "w", encoding="utf-8")
            except OSError as exc:
                from edge_duet.errors import OutputError

                raise OutputError(f"--events {path}: cannot write it ({exc.strerror or exc})") from None

    def write(self, record: dict[str, Any]) -> None:
        if self._f is None:
            return
        line = json.dumps(record, ensure_ascii=False, default=list)
        with self._lock:
            if self._f is not None:
                self._f.write(line + "\n")
                self._f.flush()

    def close(self) -> None:
        with self._lock:
            if self._f is not None:
                self._f.close()
                self._f = None


class Console:
    """Timestamped lines on stdout; a live status line pinned to the terminal's last row.

    The status row lives outside a scroll region, so redrawing it never overwrites what the user is typing.
    """

    def __init__(self, out: TextIO, err: TextIO, status_line: bool | None):
        self.out, self.err = out, err
        if status_line is None:
            status_line = out.isatty() and err.isatty() and os.environ.get("TERM", "dumb") != "dumb"
        self.pinned = bool(status_line)
        self._lock = threading.RLock()  # re-entrant: the Ctrl-C handler may print while the main thread draws
        self._rows = 0
        self._status = ""
        if self.pinned:
            self._set_region()

    def _set_region(self) -> None:
        rows = shutil.get_terminal_size((80, 24)).lines
        if rows != self._rows and rows > 2:
            self._rows = rows
            # make room, scroll region = rows 1..N-1, cursor at its bottom
            self.err.write(f"\n\x1b7\x1b[1;{rows - 1}r\x1b8\x1b[A")
            self.err.flush()

    def line(self, text: str, stream: TextIO | None = None) -> None:
        with self._lock:
            stream = stream or self.out
            stream.write(text + "\n")
            stream.flush()

    def note(self, text: str) -> None:
        self.line(text, self.err)

    def status(self, text: str) -> None:
        if not self.pinned:
            return
        with self._lock:
            self._set_region()
            cols = shutil.get_terminal_size((80, 24)).columns
            self._status = text[: cols - 1]
            self.err.write(f"\x1b7\x1b[{self._rows};1H\x1b[2K\x1b[7m{self._status}\x1b[0m\x1b8")
            self.err.flush()

    def close(self) -> None:
        if self.pinned:
            with self._lock:
                self.err.write(f"\x1b7\x1b[r\x1b[{self._rows};1H\x1b[2K\x1b8")
                self.err.flush()
            self.pinned = False


class LineReader(threading.Thread):
    """Reads stdin lines without blocking shutdown: ``select`` with a timeout where the stream has a file
    descriptor; otherwise (an in-memory stream) a plain daemon ``readline`` loop."""

    def __init__(self, stream: TextIO, on_line: Callable[[str], None], stop: threading.Event):
        super().__init__(name="edge-duet-stdin", daemon=True)
        self.stream, self.on_line, self.stop = stream, on_line, stop
        try:
            self.fd: int | None = stream.fileno()
            select.select([self.fd], [], [], 0)
        except (AttributeError, OSError, ValueError):
            self.fd = None
        # A background job (`edge-duet run ... &`) must not read the terminal: the shell would stop it (SIGTTIN).
        self.background = False
        if self.fd is not None and os.isatty(self.fd):
            try:
                self.background = os.tcgetpgrp(self.fd) != os.getpgrp()
            except OSError:
                pass

    def run(self) -> None:
        if self.background:
            return
        if self.fd is None:
            for line in iter(self.stream.readline, ""):
                if self.stop.is_set():
                    return
                self.on_line(line)
            return
        pending = b""
        while not self.stop.is_set():
            ready, _, _ = select.select([self.fd], [], [], 0.2)
            if not ready:
                continue
            chunk = os.read(self.fd, 4096)
            if not chunk:
                if pending:
                    self.on_line(pending.decode("utf-8", "replace"))
                return
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for raw in lines:
                self.on_line(raw.decode("utf-8", "replace"))


class Runner:
    """Plays one source through one session until the source ends, ``/quit``, or a second Ctrl-C: the console,
    JSONL and speech consumer of an :class:`~edge_duet.runtime.assistant.Assistant` that ends with its source
    and on the first model error (which :meth:`run` raises after the clean-up)."""

    def __init__(
        self,
        session,
        source,
        clock: Clock,
        options: RunOptions,
        *,
        speaker=None,
        stdin: TextIO | None = None,
        out: TextIO | None = None,
        err: TextIO | None = None,
        banner: str = "",
    ):
        self.options = options
        self.source, self.clock = source, clock  # from open_capture(): opened before the model loaded
        self.speaker = speaker
        self.stdin = stdin if stdin is not None else sys.stdin  # None when the process has no stdin
        self.console = Console(out or sys.stdout, err or sys.stderr, options.status_line)
        self.events = EventLog(options.events_path)
        self.banner = banner
        self.assistant = Assistant(options=AssistantOptions(
            frame_interval_s=options.frame_interval_s, frames_per_turn=options.frames_per_turn,
            max_question_chars=MAX_TYPED_CHARS, command_queue_size=64, reset_on_error=False, close_on_error=True,
            close_at_source_end=True,
        ), session=session)
        self.assistant.on_event(self._on_event, frames=True)
        self._stop = threading.Event()  # the main loop ends (second Ctrl-C)
        self._interrupts = 0
        self.exit_code = 0
        self.end_reason = "eof"
        # what the status line and the window show (the counters are the assistant's: status())
        self.partial = ""
        self.caption = ""
        self.source_note = ""

    @property
    def turns(self) -> int:
        return self.assistant.status()["turns"]

    # ------------------------------------------------------------------ inputs (any thread)
    def submit(self, line: str) -> None:
        """A line typed by the user: a question for the next turn, or an operator command."""
        item = parse_input(line, self.options.must_reply)
        if item is None:
            return
        if isinstance(item, Question):
            try:
                self.assistant.ask(item.text, must_reply=item.must_reply)
            except AssistantBusy:
                self.console.note("(too many questions waiting; this one was not taken)")
            except (AssistantClosed, InputError) as exc:
                self.console.note(f"({exc})")
            return
        if not item.known:
            self.console.note(f"unknown command /{item.name}; commands: " + ", ".join(f"/{c}" for c in COMMANDS)
                              + " (start a line with // to send a question that starts with /)")
        elif item.name == "help":
            self.console.note("\n".join(f"  /{c:<6} {h}" for c, h in COMMANDS.items())
                              + "\n  a question ending in ?! demands an answer now")
        elif item.name == "stop":
            self.assistant.cancel()
        elif item.name == "quit":
            self.request_quit()
        elif item.name == "reset":
            try:
                self.assistant.reset()
            except (AssistantBusy, AssistantClosed):
                pass  # resets already waiting do the same thing; a closed run has nothing to forget

    def request_quit(self, reason: str = "quit") -> None:
        """Finish the current turn, settle the dialogue, and end the run."""
        self.end_reason = reason
        self.assistant.finish()

    def interrupt(self) -> None:
        """Ctrl-C: the first stops the reply being written, the second ends the run with code 130."""
        self._interrupts += 1
        self.assistant.cancel()
        if self.speaker is not None:
            self.speaker.interrupt()
        if self._interrupts == 1:
            self.console.note("^C stopped the current reply; press Ctrl-C again to exit (or type /quit)")
            return
        self.exit_code = 130
        self.end_reason = "interrupt"
        self._stop.set()

    # ------------------------------------------------------------------ the run
    def run(self) -> int:
        self.events.write({
            "event": "run", "source": self.source.spec.describe(), "clock": self.clock.name,
            "frame_interval_s": self.options.frame_interval_s, "frames_per_turn": self.options.frames_per_turn,
        })
        if self.banner:
            self.console.note(self.banner)
        old_handler = None
        if threading.current_thread() is threading.main_thread():
            old_handler = signal.signal(signal.SIGINT, lambda signum, frame: self.interrupt())
        reader = None
        if self.options.read_stdin and self.stdin is not None and not self.stdin.closed:
            reader = LineReader(self.stdin, self.submit, self._stop)
        try:
            for text in self.options.questions:
                question = as_question(text, self.options.must_reply)
                self.assistant.ask(question.text, must_reply=question.must_reply)
            self.assistant.attach(self.source, clock=self.clock)
            if reader is not None:
                reader.start()
            window = _Window() if self.options.display else None
            while not self.assistant.wait(0.03 if window else 0.25) and not self._stop.is_set():
                if window is not None and not window.show(self):
                    self.request_quit()
                self.console.status(self._status_text())
            if window is not None:
                window.close()
        finally:
            self._stop.set()
            self.assistant.close(self.options.join_timeout_s)
            if self.assistant.error is not None:
                self.exit_code = getattr(self.assistant.error, "exit_code", 1)
            if reader is not None and reader.fd is not None:
                reader.join(1.0)
            if self.speaker is not None:
                self.speaker.close(finish=self.exit_code == 0 and self.assistant.error is None, timeout=15.0)
            corrupt = self.assistant.status()["corrupt_frames"]
            if corrupt:  # the first skip was noted as it happened; this is the count "end" holds
                self.console.note(f"({corrupt} undecodable frame(s) skipped in all)")
            self._write_end()
            self.events.close()
            self.console.close()
            if old_handler is not None:
                signal.signal(signal.SIGINT, old_handler)
        if self.assistant.error is not None:
            raise self.assistant.error
        if self.assistant.source_error is not None and self.end_reason == "eof":
            raise self.assistant.source_error
        return self.exit_code

    # ------------------------------------------------------------------ outputs (worker / capture thread)
    def _on_event(self, ev) -> None:
        if isinstance(ev, TokenDelta):
            self.partial += ev.text
            return
        if isinstance(ev, TurnFrames):
            self.events.write(ev.to_dict())
        elif isinstance(ev, SourceStatus):
            self._on_source(ev.status, ev.message)
        elif isinstance(ev, ResetDone):
            self.partial = self.caption = ""
            self.events.write({"event": "command", "name": "reset", "t": round(self._now(), 3)})
            self.console.note(f"[{fmt_t(self._now())}] (dialogue reset; the model keeps watching)")
        elif isinstance(ev, Event):  # the Session's: turn, reply, silence, stats, evicted
            self.events.write(ev.to_dict())
            self._show(ev)

    def _show(self, ev) -> None:
        if isinstance(ev, TurnStarted) and ev.question:
            mark = " (answer now)" if ev.must_reply else ""
            self.console.line(f"[{fmt_t(ev.t)}] you{mark}: {one_line(ev.question)}")
        elif isinstance(ev, Reply):
            self.partial = ""
            text = self.caption = one_line(ev.text)
            self.console.line(f"[{fmt_t(ev.t)}] assistant: {text}")
            if self.speaker is not None:
                self.speaker.say(text, t=ev.t, turn=ev.turn)
        elif isinstance(ev, Silence):
            self.partial = ""
        elif isinstance(ev, Evicted):
            self.console.note(f"[{fmt_t(ev.t)}] (context full: dropped {ev.removed_tokens} old tokens)")

    def _now(self) -> float:
        return self.clock.now()

    def _on_source(self, status: str, message: str) -> None:
        self.events.write({"event": "source", "status": status, "message": message, "t": round(self._now(), 3)})
        self.source_note = "" if status in ("reconnected", "eof") else message
        if status in ("lost", "reconnected", "error") or (status == "corrupt" and message.startswith("skipped 1 ")):
            self.console.note(f"[{fmt_t(self._now())}] ({message})")

    def _status_text(self) -> str:
        s = self.assistant.status()
        used, cap = s["context_tokens"], s["max_context_tokens"]
        fill = f"{used}/{cap} ({100 * used / cap:.0f}%)" if cap else "-"
        parts = [
            f"turn {s['turns']}", fmt_t(self._now()), f"{s['last_turn_s'] or 0.0:.2f} s/turn",
            f"lag {s['last_lag_s']:.1f} s", f"dropped {s['frames_dropped']}", f"context {fill}",
        ]
        if self.source_note:
            parts.append(self.source_note)
        elif self.partial:
            parts.append("… " + one_line(self.partial)[-60:])
        return " · ".join(parts)

    def _write_end(self) -> None:
        s, source_error = self.assistant.status(), self.assistant.source_error
        self.events.write({
            "event": "end", "reason": "error" if self.assistant.error or source_error else self.end_reason,
            "exit_code": self.exit_code if source_error is None else getattr(source_error, "exit_code", 1),
            "turns": s["turns"], "replies": s["replies"], "dropped_frames": s["frames_dropped"],
            "missed_samples": s["missed_samples"], "corrupt_frames": s["corrupt_frames"],
            "reconnects": s["reconnects"], "max_lag_s": round(s["max_lag_s"], 4),
            "speech_failures": getattr(self.speaker, "failed", 0),
        })


def display_available() -> tuple[bool, str]:
    """Whether an OpenCV window can open here. Checked first: without a display OpenCV aborts the process."""
    import cv2

    gui = next((ln.split(":", 1)[1].strip() for ln in cv2.getBuildInformation().splitlines()
                if ln.strip().startswith("GUI:")), "NONE")
    if gui.upper() == "NONE":
        return False, ("this OpenCV has no GUI support (opencv-python-headless): "
                       "`pip uninstall opencv-python-headless && pip install opencv-python` (or JetPack's OpenCV)")
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        return False, "no display: DISPLAY and WAYLAND_DISPLAY are unset (over SSH, use `ssh -X` or run on the device's desktop)"
    return True, gui


class _Window:
    """The --display window: newest frame, the last reply as a caption, the status line. Main thread only."""

    NAME = "edge-duet"

    def __init__(self) -> None:
        import cv2

        self.cv2 = cv2
        cv2.namedWindow(self.NAME, cv2.WINDOW_NORMAL)

    def show(self, runner: Runner) -> bool:
        cv2 = self.cv2
        item = runner.assistant.latest_frame()
        if item is not None:
            frame = item[1].copy()
            h, w = frame.shape[:2]
            for row, (text, scale) in enumerate(((runner.caption[-90:], 0.7), (runner._status_text()[:110], 0.45))):
                y = h - 12 - row * 30 if row == 0 else 20
                cv2.putText(frame, text, (10, y), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 4, cv2.LINE_AA)
                cv2.putText(frame, text, (10, y), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1, cv2.LINE_AA)
            cv2.imshow(self.NAME, frame)
        key = cv2.waitKey(1) & 0xFF
        return key not in (ord("q"), 27)

    def close(self) -> None:
        self.cv2.destroyWindow(self.NAME)
