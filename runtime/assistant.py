"""The one threaded driver: a proactive assistant that an app feeds frames and questions, and listens to.

(Over 500 lines: the public methods and the worker that serves them share one lock and one set of counters;
split in two, the counters would be held in two places again.)

One worker thread owns the :class:`~edge_duet.runtime.session.Session` (or a remote session). Every public
method only touches thread-safe structures, so any thread (a UI loop, a camera callback, an asyncio server)
may call them::

    add_frame ─────┐             attach(source): open_capture() picks the source and its clock, a CaptureThread
                   v                             reads it (camera / file / URL / GStreamer)
             FrameSampler (one frame per frame_interval_s, frames_per_turn at most: newest wins)
                   │
    ask / reset ─> bounded command queue ─> worker thread: Session.add_frames / ask / step ─> events
                                                                                                │
    subscribe() <── one bounded buffer per subscriber (drops its oldest event, never blocks) <──┘
    on_event(cb) <── called on the emitting thread (hand the event on and return)

Frames are never queued behind a slow model: the sampler keeps the newest ones. A question joins the next turn
(the proactive protocol, shared/PROTOCOL.md); when no frames arrive for a whole turn (no source, or the source
ended or is lost) it is asked in a text-only turn, so an app without a camera still gets answers.

The counters (turns, replies, context fill, pending questions, frames sampled/dropped, lag) live here and only
here: :meth:`Assistant.status` is what every consumer reads. ``edge-duet run`` (apps/runner.py) and
``edge-duet serve`` (apps/server.py) are consumers of this driver's events; see runtime/DESIGN.md.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edge_duet.errors import AssistantBusy, AssistantClosed, EdgeDuetError, InputError, UsageError

from .capture import CaptureThread, SourceSpec, open_source
from .clock import Clock, FrameSampler, LiveClock, PlaybackClock, SamplerClosed, SimulatedClock
from .events import Reply, TurnStarted, TurnStats
from .subscription import Fanout, ModelError, ResetDone, SourceStatus, Subscription, TurnFrames

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AssistantOptions:
    """Pacing, buffering and what ends the stream. ``None`` takes the bundle's default (``manifest.prompt``)."""

    frame_interval_s: float | None = None  # video seconds between the frames the model sees
    frames_per_turn: int | None = None
    max_new_tokens: int = 64
    max_question_chars: int = 500
    max_frame_side_px: int = 4096
    command_queue_size: int = 16
    subscriber_buffer_events: int = 256
    reply_history: int = 20  # finished replies kept for status() (a page that reconnects shows them)
    reset_on_error: bool = True  # after a model error: reset the session and keep serving
    close_on_error: bool = False  # after a model error: close (``error`` holds it); `edge-duet run` ends so
    close_at_source_end: bool = False  # when the attached source ends (unlooped): settle the dialogue and close


def as_source_spec(source: Any) -> SourceSpec:
    """A camera index (int), a file path or URL (str), or a :class:`SourceSpec` as it is."""
    if isinstance(source, SourceSpec):
        return source
    kind = "camera" if isinstance(source, int) else "url" if "://" in str(source) else "file"
    return SourceSpec(kind, str(source))


def open_capture(source: Any, realtime: bool = True) -> tuple[Any, Clock]:
    """The one place a source and its clock are chosen: ``(opened source, clock)``.

    ``source``: a :class:`SourceSpec`, a camera index, a file path / URL, or an already opened source (anything
    with a ``spec`` and ``grab``). A live source (camera, stream, GStreamer) runs on the wall clock; a file plays
    in real time, or with ``realtime=False`` as fast as the model goes with every sample used (the simulated
    clock: deterministic, what tests and evaluation use). Raises :class:`~edge_duet.errors.SourceError`.
    """
    video = source if hasattr(source, "grab") and hasattr(source, "spec") else open_source(as_source_spec(source))
    if not realtime and video.spec.live:
        video.release()
        raise UsageError(f"realtime=False plays files only; {video.spec.describe()} runs on the wall clock.")
    clock = LiveClock() if video.spec.live else PlaybackClock() if realtime else SimulatedClock()
    return video, clock


@dataclass
class _Capture:
    spec: SourceSpec
    thread: CaptureThread
    stop: threading.Event
    loop: bool
    realtime: bool
    t_offset: float = 0.0
    state: str = "running"  # running | lost | ended | error
    finished: bool = False  # its sampler closed and the end was handled

    @property
    def clock(self) -> Clock:
        return self.thread.clock


class Assistant:
    """A proactive video assistant running in its own thread (see the module docs for the data flow).

    ``model``: a bundle directory (default: the bundled demo model). ``session_options``: keyword arguments of
    :class:`~edge_duet.runtime.session.SessionOptions`. A bundle that cannot load raises here
    (:class:`~edge_duet.errors.BundleError`). ``session``: an already built session to use instead (a
    :class:`~edge_duet.runtime.remote.RemoteSession`, say).
    """

    def __init__(self, model: str | Path | None = None, options: AssistantOptions | None = None,
                 session_options: dict | None = None, *, session: Any = None):
        self.options = o = options or AssistantOptions()
        if session is None:
            from edge_duet.bundle_io import demo_model

            from .session import Session, SessionOptions

            kwargs = {"max_new_tokens": o.max_new_tokens, **(session_options or {})}
            session = Session(Path(model) if model is not None else demo_model(), SessionOptions(**kwargs))
        self._session = session  # touched only by the worker thread from here on (cancel() is thread-safe)
        prompt = session.manifest.prompt
        self.frame_interval_s = float(prompt.frame_interval_s if o.frame_interval_s is None else o.frame_interval_s)
        self.frames_per_turn = int(prompt.frames_per_turn if o.frames_per_turn is None else o.frames_per_turn)
        if self.frame_interval_s <= 0 or self.frames_per_turn < 1:
            raise UsageError(f"frame_interval_s must be > 0 and frames_per_turn >= 1, got {self.frame_interval_s} "
                             f"and {self.frames_per_turn}.")
        self.model_name = session.manifest.name
        self.must_reply_prefix = prompt.must_reply_prefix
        self.error: BaseException | None = None  # the model error that closed it (close_on_error)

        self._lock = threading.Lock()  # guards everything below that two threads touch
        self._fanout = Fanout(o.subscriber_buffer_events)
        self._sampler = self._new_sampler()
        self._retired = collections.Counter()  # counts of samplers replaced (reset, detach, source end)
        self._capture: _Capture | None = None
        self._latest: tuple[int, np.ndarray, float] | None = None  # (index, BGR image, t) of the newest frame
        self._latest_key: Any = None
        self._frames_received = 0
        self._commands: queue.Queue = queue.Queue(maxsize=o.command_queue_size)
        self._asks_queued = 0  # in the command queue
        self._asks_applied = 0  # given to the session, not yet in a turn
        self._ask_since: float | None = None
        self._closing = threading.Event()
        self._finish = threading.Event()  # finish(): end the stream after the current turn
        self._done = threading.Event()  # the worker has ended
        self._state = "waiting"  # waiting | running | error | closed
        self._turns = self._replies = self._errors = 0
        self._last_error: str | None = None
        self._last_turn_t: float | None = None
        self._last_turn_s: float | None = None
        self._last_lag_s = self._max_lag_s = 0.0
        self._context_tokens = 0
        self._max_context_tokens = int(session.max_context_tokens)
        self._recent: collections.deque = collections.deque(maxlen=max(1, o.reply_history))
        self._t0 = time.monotonic()
        self._worker = threading.Thread(target=self._run, name="edge-duet-assistant", daemon=True)
        self._worker.start()

    # ------------------------------------------------------------------ inputs
    def add_frame(self, image: np.ndarray, t: float | None = None, channels: str = "bgr") -> int:
        """Offer one frame: HxWx3 uint8, "bgr" (OpenCV) or "rgb" (PIL). ``t``: video seconds, increasing
        (default: seconds since the assistant started). Never blocks. Returns the frame's index."""
        self._check_open()
        if channels not in ("bgr", "rgb"):
            raise InputError(f"channels must be 'bgr' or 'rgb', got {channels!r}.")
        if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise InputError(f"a frame must be an HxWx3 uint8 array, got {getattr(image, 'shape', type(image))} "
                             f"{getattr(image, 'dtype', '')}.")
        h, w = image.shape[:2]
        if min(h, w) < 1 or max(h, w) > self.options.max_frame_side_px:
            raise InputError(f"frame size {w}x{h} is outside 1..{self.options.max_frame_side_px} px per side.")
        bgr = image if channels == "bgr" else image[..., ::-1]
        t = time.monotonic() - self._t0 if t is None else float(t)
        with self._lock:
            if self._capture is not None:
                raise UsageError(f"{self._capture.spec.describe()} is attached; detach() it to add frames yourself.")
            self._frames_received += 1
            index = self._frames_received
            self._latest = (index, bgr, t)
            sampler = self._sampler
        sampler.offer(t, bgr)
        return index

    def ask(self, text: str, must_reply: bool = False) -> None:
        """Attach a question to the next turn; ``must_reply`` makes the model answer in it.
        Raises :class:`~edge_duet.errors.AssistantBusy` when ``command_queue_size`` commands already wait."""
        self._check_open()
        if not isinstance(text, str) or not text.strip():
            raise InputError("a question must be non-empty text.")
        if len(text) > self.options.max_question_chars:
            raise InputError(f"a question may have at most {self.options.max_question_chars} characters, "
                             f"got {len(text)}.")
        with self._lock:
            self._put(("ask", text.strip(), bool(must_reply)))
            self._asks_queued += 1

    def reset(self) -> None:
        """Forget the dialogue (the model stays loaded); ends a reply being decoded."""
        self._check_open()
        self._put(("reset", "request"))
        self._session.cancel()

    def cancel(self) -> None:
        """End the reply being decoded now."""
        self._session.cancel()

    def attach(self, source: Any, *, loop: bool = False, realtime: bool = True, clock: Clock | None = None) -> None:
        """Read frames from a camera, file, URL or GStreamer pipeline in a capture thread.

        ``source``: see :func:`open_capture` (a camera index, a file path / URL, a
        :class:`~edge_duet.runtime.capture.SourceSpec`, or an opened source). A file plays in real time
        (``realtime=False``: as fast as the model goes, every sample used) and, with ``loop``, starts over at its
        end. ``clock``: the one :func:`open_capture` chose for this opened source (an app that opened it first, to
        fail before the model loads, and names its clock). Raises :class:`~edge_duet.errors.SourceError` if it
        cannot open.
        """
        self._check_open()
        if self._capture is not None:
            raise UsageError(f"{self._capture.spec.describe()} is already attached; detach() it first.")
        self._start_capture(source, loop, realtime, t_offset=0.0, clock=clock)

    def detach(self, timeout: float = 5.0) -> None:
        """Stop the attached source (if any); frames may then be added with :meth:`add_frame` again."""
        with self._lock:
            cap, self._capture = self._capture, None
            old = self._swap_sampler()
        if cap is not None:
            cap.stop.set()
            old.abort()
            cap.thread.join(timeout)

    # ------------------------------------------------------------------ outputs
    def subscribe(self, maxsize: int | None = None, on_ready: Callable[[], None] | None = None,
                  frames: bool = False) -> Subscription:
        """A new bounded event buffer (events from now on). ``on_ready``: called after each event is queued
        (for an event loop that polls with ``get(timeout=0)``); it must return at once. ``frames``: also get a
        :class:`~edge_duet.runtime.subscription.TurnFrames` before each turn that brings frames."""
        return self._fanout.subscribe(maxsize, on_ready, frames)

    def on_event(self, callback: Callable[[Any], None], frames: bool = False) -> Callable[[], None]:
        """Call ``callback(event)`` for every event, on the thread that emits it (the worker; the capture thread
        for :class:`SourceStatus`); it must return at once (e.g. ``loop.call_soon_threadsafe``). Its exceptions
        are logged, never raised. ``frames``: as for :meth:`subscribe`. Returns the unsubscribe call."""
        return self._fanout.on_event(callback, frames)

    def latest_frame(self) -> tuple[int, np.ndarray, float] | None:
        """``(index, BGR image, t)`` of the newest frame received or captured; ``None`` before the first.
        The index changes with every new frame. Do not modify the array."""
        with self._lock:
            cap = self._capture
            if cap is not None and cap.thread.latest is not None:
                item = cap.thread.latest.get()
                if item is not None and item[1] is not self._latest_key:
                    self._latest_key = item[1]
                    index = (self._latest[0] if self._latest else 0) + 1
                    self._latest = (index, item[1], item[0] + cap.t_offset)
            return self._latest

    def status(self) -> dict:
        with self._lock:
            cap, sampler, retired = self._capture, self._sampler, self._retired
            return {
                "state": self._state,
                "model": self.model_name,
                "frame_interval_s": self.frame_interval_s,
                "frames_per_turn": self.frames_per_turn,
                "must_reply_prefix": self.must_reply_prefix,
                "turns": self._turns,
                "replies": self._replies,
                "frames_received": self._frames_received + (cap.thread.frames_read if cap else 0),
                "frames_sampled": retired["sampled"] + sampler.sampled_frames,
                "frames_dropped": retired["dropped"] + sampler.dropped_frames,
                "missed_samples": retired["missed"] + sampler.missed_samples,
                "corrupt_frames": cap.thread.corrupt_frames if cap else 0,
                "reconnects": cap.thread.reconnects if cap else 0,
                "last_turn_t": self._last_turn_t,
                "last_turn_s": self._last_turn_s,
                "last_lag_s": self._last_lag_s,
                "max_lag_s": self._max_lag_s,
                "context_tokens": self._context_tokens,
                "max_context_tokens": self._max_context_tokens,
                "pending_questions": self._asks_queued + self._asks_applied,
                "errors": self._errors,
                "last_error": self._last_error,
                "subscribers": len(self._fanout),
                "source": cap.spec.describe() if cap else None,
                "source_state": cap.state if cap else None,
                "worker_alive": self._worker.is_alive(),
                "recent_replies": list(self._recent),
            }

    @property
    def source(self) -> str | None:
        """A description of the attached source, or ``None`` when frames come from :meth:`add_frame`."""
        cap = self._capture
        return cap.spec.describe() if cap is not None else None

    @property
    def clock(self) -> Clock | None:
        """The attached source's clock (its ``now()`` is the stream's time), or ``None``."""
        cap = self._capture
        return cap.clock if cap is not None else None

    @property
    def source_error(self) -> BaseException | None:
        """Why the attached source stopped delivering (a :class:`~edge_duet.errors.SourceError`), if it did."""
        cap = self._capture
        return cap.thread.error if cap is not None else None

    @property
    def sampler(self) -> FrameSampler:
        """The frame sampler in use (its counts are this source's; :meth:`status` sums every sampler's)."""
        return self._sampler

    @property
    def alive(self) -> bool:
        return self._worker.is_alive() and not self._closing.is_set()

    # ------------------------------------------------------------------ lifetime
    def finish(self) -> None:
        """End the stream: the turn being processed completes, the last provisional silence is settled
        (``Session.finish``), then the assistant closes (its source stopped, every subscription ended)."""
        self._finish.set()
        self._sampler.abort()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the worker has ended (closed, finished, or the source ended with ``close_at_source_end``)."""
        return self._done.wait(timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Stop the source and the worker (ending a reply being decoded); ends every subscription."""
        if self._closing.is_set():
            self._join(timeout)
            return
        self._closing.set()
        self._session.cancel()
        self._join(timeout)

    def __enter__(self) -> "Assistant":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ internals
    def _join(self, timeout: float) -> None:
        with self._lock:
            cap, sampler = self._capture, self._sampler
        sampler.abort()
        if cap is not None:
            cap.stop.set()
            cap.thread.sampler.abort()
            cap.thread.join(timeout)
        if self._worker is not threading.current_thread():
            self._worker.join(timeout)

    def _check_open(self) -> None:
        if self._closing.is_set() or self._done.is_set():
            raise AssistantClosed("this assistant is closed; create a new Assistant.")

    def _put(self, command: tuple) -> None:
        try:
            self._commands.put_nowait(command)
        except queue.Full:
            raise AssistantBusy(f"{self._commands.maxsize} commands already wait for the model; "
                                "retry after the next turn.") from None

    def _new_sampler(self, drop: bool = True) -> FrameSampler:
        return FrameSampler(self.frame_interval_s, self.frames_per_turn, drop)

    def _swap_sampler(self, new: FrameSampler | None = None) -> FrameSampler:
        """Put ``new`` (default: a fresh dropping sampler) in place, keeping the old one's counts; lock held."""
        old, self._sampler = self._sampler, new or self._new_sampler()
        self._retired.update(sampled=old.sampled_frames, dropped=old.dropped_frames, missed=old.missed_samples)
        return old

    def _emit(self, event: Any) -> None:
        self._fanout.emit(event)

    def _start_capture(self, source: Any, loop: bool, realtime: bool, t_offset: float,
                       clock: Clock | None = None) -> None:
        video, chosen = open_capture(source, realtime)
        clock = clock or chosen
        spec = video.spec
        sampler = self._new_sampler(clock.drops_frames)
        stop = threading.Event()
        cap = _Capture(spec, None, stop, loop, realtime, t_offset)  # type: ignore[arg-type]

        def on_status(status: str, message: str) -> None:  # capture thread
            cap.state = {"lost": "lost", "retry": "lost", "reconnected": "running", "eof": "ended",
                         "error": "error"}.get(status, cap.state)
            self._emit(SourceStatus(status, message))

        cap.thread = CaptureThread(video, clock, sampler, stop=stop, on_status=on_status, keep_latest=True)
        with self._lock:
            self._capture = cap
            self._swap_sampler(sampler)
        cap.thread.start()

    def _run(self) -> None:
        try:
            while not self._closing.is_set():
                try:
                    self._drain_commands()
                except Exception as exc:  # a session that cannot even take a question
                    if self._failed(exc, self._turns, reset=False):
                        return
                if self._finish.is_set():
                    self._turn(None, self._last_turn_t or 0.0)  # settle the last provisional silence
                    return
                with self._lock:
                    sampler, cap = self._sampler, self._capture
                try:
                    turn = sampler.take(timeout=0.05)
                except SamplerClosed:
                    if self._finish.is_set():
                        continue
                    if cap is not None and sampler is cap.thread.sampler and not cap.finished:
                        cap.finished = True
                        if self._source_ended(cap):
                            return
                    else:
                        self._closing.wait(0.01)  # detach() is swapping the sampler, or finish() aborted it
                    continue
                if turn is not None:
                    self._drain_commands()  # a question that came while we waited joins this turn
                    own = cap is not None and sampler is cap.thread.sampler
                    offset = cap.t_offset if own else 0.0
                    lag = cap.clock.lag(turn.t) if own else 0.0
                    with self._lock:
                        self._last_lag_s, self._max_lag_s = lag, max(self._max_lag_s, lag)
                    self._emit(TurnFrames(turn.t + offset, tuple(x + offset for x in turn.times_s), lag,
                                          sampler.dropped_frames, sampler.missed_samples))
                    self._turn(list(turn.frames), turn.t + offset)
                elif (self._ask_since is not None and (cap is None or cap.state != "running")
                      and time.monotonic() - self._ask_since > self._question_wait_s()):
                    self._turn([], self._last_turn_t or 0.0)  # no frames are coming: ask in a text-only turn
        finally:
            with self._lock:
                self._state = "closed"
                cap = self._capture
            self._closing.set()
            if cap is not None:
                cap.stop.set()
                cap.thread.sampler.abort()
            self._fanout.close()
            self._done.set()

    def _question_wait_s(self) -> float:
        return self.frame_interval_s * self.frames_per_turn + 0.5

    def _source_ended(self, cap: _Capture) -> bool:
        """The attached source's sampler closed. Returns whether the assistant ends with it."""
        if self._closing.is_set():
            return True
        if cap.loop and cap.thread.error is None:
            offset = cap.t_offset + (cap.clock.now() or 0.0) + self.frame_interval_s
            with self._lock:
                self._capture = None
            try:
                self._start_capture(cap.spec, True, cap.realtime, t_offset=offset)
                self._emit(SourceStatus("looped", f"{cap.spec.describe()} started over"))
                return False
            except Exception as exc:  # SourceError, or OpenCV failing in its own way
                with self._lock:
                    self._capture = cap
                self._emit(SourceStatus("error", f"{cap.spec.describe()} could not start over: {exc}"))
        self._turn(None, self._last_turn_t or 0.0)  # the end: settle the last provisional silence
        cap.state = "error" if cap.thread.error is not None else "ended"
        if self.options.close_at_source_end or self._closing.is_set():
            return True
        with self._lock:  # keep showing the last frame; text-only turns still answer; add_frame waits for detach()
            self._swap_sampler()
        return False

    def _drain_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if command[0] == "ask":
                with self._lock:
                    self._asks_queued -= 1
                self._session.ask(command[1], must_reply=command[2])
                with self._lock:
                    self._asks_applied += 1
                    self._ask_since = self._ask_since or time.monotonic()
            else:
                self._reset_session(command[1])

    def _reset_session(self, reason: str) -> None:
        self._session.reset()
        with self._lock:
            self._asks_applied, self._ask_since, self._context_tokens = 0, None, 0
            if self._state == "error":
                self._state = "waiting"
            if self._capture is None:  # posted frames may start their clock again
                self._swap_sampler()
        self._emit(ResetDone(reason))

    def _failed(self, exc: BaseException, turn: int, reset: bool = True) -> bool:
        """Report a model error; recover (reset), wait for a reset, or close. Returns whether to close."""
        message = f"{type(exc).__name__}: {exc}"
        log.error("the model failed: %s", message, exc_info=not isinstance(exc, EdgeDuetError))
        closing = self.options.close_on_error
        recovered = False
        if reset and self.options.reset_on_error and not closing:
            try:
                self._session.reset()
                recovered = True
            except Exception:  # pragma: no cover - a runtime that cannot even reset
                log.exception("reset after the error failed too")
        with self._lock:
            self._errors += 1
            self._last_error = message
            self._state = "waiting" if recovered else "error"
            if recovered:
                self._asks_applied, self._ask_since, self._context_tokens = 0, None, 0
            if closing:
                self.error = exc
        self._emit(ModelError(message, turn, recovered))
        if recovered:
            self._emit(ResetDone("error"))
        return closing

    def _turn(self, frames: list[np.ndarray] | None, t: float) -> None:
        """One Session turn (``frames=None``: Session.finish()); a model error is reported, not raised."""
        with self._lock:
            self._state = "running"
        started, turn = time.perf_counter(), self._turns
        try:
            if frames is None:
                steps = self._session.finish()
            else:
                if frames:
                    self._session.add_frames(frames, t=t, channels="bgr")
                steps = self._session.step()
            for event in steps:
                turn = getattr(event, "turn", turn)
                with self._lock:
                    if isinstance(event, TurnStarted) and event.question is not None:
                        self._asks_applied, self._ask_since = 0, None
                    elif isinstance(event, TurnStats):  # counted before anyone hears of it: status() agrees
                        self._context_tokens, self._max_context_tokens = event.context_tokens, event.max_context_tokens
                        self._turns += 1
                        self._last_turn_t, self._last_turn_s = t, time.perf_counter() - started
                    elif isinstance(event, Reply):
                        self._replies += 1
                        self._recent.append({"turn": event.turn, "t": event.t, "text": event.text})
                self._emit(event)
        except Exception as exc:  # the model failed: tell everyone, then recover, wait for a reset, or close
            if self._failed(exc, turn):
                self._closing.set()
            return
        with self._lock:
            if self._state == "running":
                self._state = "waiting"
