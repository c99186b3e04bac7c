"""The embedding API: a proactive assistant that an app feeds frames and questions, and listens to.

One worker thread owns the :class:`~edge_duet.runtime.session.Session`. Every public method only touches
thread-safe structures, so any thread (a UI loop, a camera callback, an asyncio server) may call them::

    add_frame ─────┐                    (or a CaptureThread reading a camera / file / URL, see attach())
                   v
             FrameSampler (one frame per frame_interval_s, frames_per_turn at most: newest wins)
                   │
    ask / reset ─> bounded command queue ─> worker thread: Session.add_frames / ask / step ─> events
                                                                                                │
    subscribe() <── one bounded buffer per subscriber (drops its oldest event, never blocks) <──┘
    on_event(cb) <── called on the worker thread (hand the event to your own loop and return)

Frames are never queued behind a slow model: the sampler keeps the newest ones. A question joins the next turn
(the proactive protocol, shared/PROTOCOL.md); when no frames arrive for a whole turn it is asked in a text-only
turn, so an app without a camera still gets answers.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from edge_duet.errors import AssistantBusy, AssistantClosed, EdgeDuetError, InputError, UsageError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AssistantOptions:
    """Pacing and buffering. ``None`` takes the bundle's default (``manifest.prompt``)."""

    frame_interval_s: float | None = None  # video seconds between the frames the model sees
    frames_per_turn: int | None = None
    max_new_tokens: int = 64
    max_question_chars: int = 500
    max_frame_side_px: int = 4096
    command_queue_size: int = 16
    subscriber_buffer_events: int = 256
    reply_history: int = 20  # finished replies kept for status() (a page that reconnects shows them)
    reset_on_error: bool = True  # after a model error: reset the session and keep serving


# ---------------------------------------------------------------- events added to the Session's (runtime/events.py)
@dataclass(frozen=True)
class AssistantEvent:
    @property
    def kind(self) -> str:
        return type(self).__name__

    def to_dict(self) -> dict:
        return {"event": self.EVENT, **{f.name: getattr(self, f.name) for f in fields(self)}}


@dataclass(frozen=True)
class ModelError(AssistantEvent):
    """A turn failed in the model. ``recovered``: the session was reset and the assistant goes on."""

    EVENT = "error"
    message: str
    turn: int
    recovered: bool


@dataclass(frozen=True)
class ResetDone(AssistantEvent):
    """The dialogue was forgotten (``reason``: "request" or "error"); the model stays loaded."""

    EVENT = "reset"
    reason: str


@dataclass(frozen=True)
class SourceStatus(AssistantEvent):
    """The attached source changed state: lost, retry, reconnected, corrupt, eof, looped, error."""

    EVENT = "source"
    status: str
    message: str


@dataclass(frozen=True)
class Dropped(AssistantEvent):
    """This subscriber was too slow: ``count`` of its oldest events were dropped."""

    EVENT = "dropped"
    count: int


@dataclass(frozen=True)
class Closed(AssistantEvent):
    """The assistant closed; nothing follows."""

    EVENT = "closed"


class Subscription:
    """A bounded event buffer for one consumer: iterate it or call :meth:`get`.

    A consumer that falls behind loses the oldest events and reads a :class:`Dropped` first. Iteration ends
    when the assistant closes (after its :class:`Closed` event) or after :meth:`close`.
    """

    def __init__(self, owner: "Assistant", maxsize: int):
        self._owner = owner
        self._buf: collections.deque = collections.deque(maxlen=max(1, int(maxsize)))
        self._cond = threading.Condition()
        self._unreported = 0
        self.dropped_total = 0
        self._ended = False

    def _put(self, event: Any) -> None:
        with self._cond:
            if self._ended:
                return
            if len(self._buf) == self._buf.maxlen:
                self._unreported += 1
                self.dropped_total += 1
            self._buf.append(event)
            self._cond.notify()

    def _end(self) -> None:
        with self._cond:
            self._ended = True
            self._cond.notify_all()

    def get(self, timeout: float | None = None) -> Any | None:
        """The next event; ``None`` after ``timeout`` seconds, or when ended and drained."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._buf or self._unreported or self._ended, timeout):
                return None
            if self._unreported:
                n, self._unreported = self._unreported, 0
                return Dropped(count=n)
            return self._buf.popleft() if self._buf else None

    def __iter__(self) -> Iterator[Any]:
        while (event := self.get()) is not None:
            yield event

    def close(self) -> None:
        self._owner._unsubscribe(self)
        self._end()

    def __enter__(self) -> "Subscription":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class _Capture:
    spec: Any  # runtime.capture.SourceSpec
    thread: Any  # runtime.capture.CaptureThread
    stop: threading.Event
    loop: bool
    realtime: bool
    t_offset: float = 0.0
    state: str = "running"  # running | lost | ended | error
    finished: bool = False  # its sampler closed and the end was handled


class Assistant:
    """A proactive video assistant running in its own thread (see the module docs for the data flow).

    ``model``: a bundle directory (default: the bundled demo model). ``session_options``: keyword arguments of
    :class:`~edge_duet.runtime.session.SessionOptions`. A bundle that cannot load raises here
    (:class:`~edge_duet.errors.BundleError`). ``session``: an already built Session to use instead.
    """

    def __init__(self, model: str | Path | None = None, options: AssistantOptions | None = None,
                 session_options: dict | None = None, *, session: Any = None):
        from edge_duet.runtime.clock import FrameSampler

        self.options = options or AssistantOptions()
        if session is None:
            from edge_duet.apps.common import resolve_model
            from edge_duet.runtime.session import Session, SessionOptions

            kwargs = {"max_new_tokens": self.options.max_new_tokens, **(session_options or {})}
            session = Session(resolve_model(Path(model) if model is not None else None), SessionOptions(**kwargs))
        self._session = session  # touched only by the worker thread from here on (cancel() is thread-safe)
        prompt = session.manifest.prompt
        o = self.options
        self.frame_interval_s = float(prompt.frame_interval_s if o.frame_interval_s is None else o.frame_interval_s)
        self.frames_per_turn = int(prompt.frames_per_turn if o.frames_per_turn is None else o.frames_per_turn)
        if self.frame_interval_s <= 0 or self.frames_per_turn < 1:
            raise UsageError(f"frame_interval_s must be > 0 and frames_per_turn >= 1, got {self.frame_interval_s} "
                             f"and {self.frames_per_turn}.")
        self.model_name = session.manifest.name
        self.must_reply_prefix = prompt.must_reply_prefix
        self._new_sampler = lambda drop=True: FrameSampler(self.frame_interval_s, self.frames_per_turn, drop)

        self._lock = threading.Lock()  # guards everything below that two threads touch
        self._sampler = self._new_sampler()
        self._capture: _Capture | None = None
        self._latest: tuple[int, np.ndarray, float] | None = None  # (index, BGR image, t) of the newest frame
        self._latest_key: Any = None
        self._frames_received = 0
        self._commands: queue.Queue = queue.Queue(maxsize=self.options.command_queue_size)
        self._asks_queued = 0  # in the command queue
        self._asks_applied = 0  # given to the session, not yet in a turn
        self._ask_since: float | None = None
        self._closing = threading.Event()
        self._subs: list[Subscription] = []
        self._callbacks: list[Callable[[Any], None]] = []
        self._state = "waiting"  # waiting | running | error | closed
        self._turns = self._replies = self._errors = 0
        self._last_error: str | None = None
        self._last_turn_t: float | None = None
        self._last_turn_s: float | None = None
        self._context_tokens = 0
        self._max_context_tokens = int(getattr(session, "max_context_tokens", 0) or 0)
        self._recent: collections.deque = collections.deque(maxlen=max(1, self.options.reply_history))
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
        Raises :class:`AssistantBusy` when ``command_queue_size`` commands already wait."""
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

    def attach(self, source: Any, *, loop: bool = False, realtime: bool = True) -> None:
        """Read frames from a camera, file, URL or GStreamer pipeline in a capture thread.

        ``source``: a :class:`~edge_duet.runtime.capture.SourceSpec`, a camera index (int), or a file path / URL
        (str). A file plays in real time (``realtime=False``: as fast as the model goes, every sample used) and,
        with ``loop``, starts over at its end. Raises :class:`~edge_duet.errors.SourceError` if it cannot open.
        """
        from edge_duet.runtime.capture import SourceSpec

        self._check_open()
        if not isinstance(source, SourceSpec):
            kind = "camera" if isinstance(source, int) else "url" if "://" in str(source) else "file"
            source = SourceSpec(kind, str(source))
        if self._capture is not None:
            raise UsageError(f"{self._capture.spec.describe()} is already attached; detach() it first.")
        self._start_capture(source, loop, realtime, t_offset=0.0)

    def detach(self, timeout: float = 5.0) -> None:
        """Stop the attached source (if any); frames may then be added with :meth:`add_frame` again."""
        with self._lock:
            cap, self._capture = self._capture, None
            old, self._sampler = self._sampler, self._new_sampler()
        if cap is not None:
            cap.stop.set()
            old.abort()
            cap.thread.join(timeout)

    # ------------------------------------------------------------------ outputs
    def subscribe(self, maxsize: int | None = None) -> Subscription:
        """A new bounded event buffer (events from now on)."""
        sub = Subscription(self, maxsize or self.options.subscriber_buffer_events)
        with self._lock:
            if self._state == "closed":
                sub._end()
            else:
                self._subs.append(sub)
        return sub

    def on_event(self, callback: Callable[[Any], None]) -> Callable[[], None]:
        """Call ``callback(event)`` on the worker thread for every event; it must return at once (e.g.
        ``loop.call_soon_threadsafe``). Its exceptions are logged, never raised. Returns the unsubscribe call."""
        with self._lock:
            self._callbacks.append(callback)

        def remove() -> None:
            with self._lock:
                if callback in self._callbacks:
                    self._callbacks.remove(callback)

        return remove

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
            cap, sampler = self._capture, self._sampler
            return {
                "state": self._state,
                "model": self.model_name,
                "frame_interval_s": self.frame_interval_s,
                "frames_per_turn": self.frames_per_turn,
                "must_reply_prefix": self.must_reply_prefix,
                "turns": self._turns,
                "replies": self._replies,
                "frames_received": self._frames_received + (cap.thread.frames_read if cap else 0),
                "frames_sampled": sampler.sampled_frames,
                "frames_dropped": sampler.dropped_frames,
                "last_turn_t": self._last_turn_t,
                "last_turn_s": self._last_turn_s,
                "context_tokens": self._context_tokens,
                "max_context_tokens": self._max_context_tokens,
                "pending_questions": self._asks_queued + self._asks_applied,
                "errors": self._errors,
                "last_error": self._last_error,
                "subscribers": len(self._subs) + len(self._callbacks),
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
    def alive(self) -> bool:
        return self._worker.is_alive() and not self._closing.is_set()

    # ------------------------------------------------------------------ lifetime
    def close(self, timeout: float = 10.0) -> None:
        """Stop the source and the worker (ending a reply being decoded); ends every subscription."""
        if self._closing.is_set():
            return
        self._closing.set()
        self.detach(timeout)
        self._session.cancel()
        if self._worker is not threading.current_thread():
            self._worker.join(timeout)

    def __enter__(self) -> "Assistant":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ internals
    def _check_open(self) -> None:
        if self._closing.is_set():
            raise AssistantClosed("this assistant is closed; create a new Assistant.")

    def _put(self, command: tuple) -> None:
        try:
            self._commands.put_nowait(command)
        except queue.Full:
            raise AssistantBusy(f"{self._commands.maxsize} commands already wait for the model; "
                                "retry after the next turn.") from None

    def _unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            if sub in self._subs:
                self._subs.remove(sub)

    def _emit(self, event: Any) -> None:
        with self._lock:
            subs, callbacks = list(self._subs), list(self._callbacks)
        for sub in subs:
            sub._put(event)
        for callback in callbacks:
            try:
                callback(event)
            except Exception:  # a listener's bug must not stop the model
                log.exception("event listener %r failed", callback)

    def _start_capture(self, spec: Any, loop: bool, realtime: bool, t_offset: float) -> None:
        from edge_duet.runtime.capture import CaptureThread, open_source
        from edge_duet.runtime.clock import LiveClock, PlaybackClock, SimulatedClock

        video = open_source(spec)
        clock = LiveClock() if spec.live else PlaybackClock() if realtime else SimulatedClock()
        sampler = self._new_sampler(clock.drops_frames)
        stop = threading.Event()
        cap = _Capture(spec, None, stop, loop, realtime, t_offset)

        def on_status(status: str, message: str) -> None:  # capture thread
            cap.state = {"lost": "lost", "retry": "lost", "reconnected": "running", "eof": "ended",
                         "error": "error"}.get(status, cap.state)
            self._emit(SourceStatus(status, message))

        cap.thread = CaptureThread(video, clock, sampler, stop=stop, on_status=on_status, keep_latest=True)
        with self._lock:
            self._capture, self._sampler = cap, sampler
        cap.thread.start()

    def _run(self) -> None:
        from edge_duet.runtime.clock import SamplerClosed

        try:
            while not self._closing.is_set():
                try:
                    self._drain_commands()
                except Exception as exc:  # a session that cannot even take a question: report, keep the thread
                    log.exception("applying a command failed")
                    self._emit(ModelError(f"{type(exc).__name__}: {exc}", self._turns, False))
                with self._lock:
                    sampler, cap = self._sampler, self._capture
                try:
                    turn = sampler.take(timeout=0.05)
                except SamplerClosed:
                    if cap is not None and sampler is cap.thread.sampler and not cap.finished:
                        cap.finished = True
                        self._source_ended(cap)
                    else:
                        self._closing.wait(0.01)  # detach() is swapping the sampler
                    continue
                if turn is not None:
                    self._drain_commands()  # a question that came while we waited joins this turn
                    offset = cap.t_offset if cap is not None and sampler is cap.thread.sampler else 0.0
                    self._turn(list(turn.frames), turn.t + offset)
                elif self._ask_since is not None and time.monotonic() - self._ask_since > self._question_wait_s():
                    self._turn([], self._last_turn_t or 0.0)  # no frames are coming: ask in a text-only turn
        finally:
            with self._lock:
                self._state = "closed"
                subs, self._subs = self._subs, []
                callbacks = list(self._callbacks)
            for callback in callbacks:
                try:
                    callback(Closed())
                except Exception:
                    log.exception("event listener %r failed", callback)
            for sub in subs:
                sub._put(Closed())
                sub._end()

    def _question_wait_s(self) -> float:
        return self.frame_interval_s * self.frames_per_turn + 0.5

    def _source_ended(self, cap: _Capture) -> None:
        if cap.loop and cap.thread.error is None and not self._closing.is_set():
            offset = cap.t_offset + (cap.thread.clock.now() or 0.0) + self.frame_interval_s
            with self._lock:
                self._capture = None
            try:
                self._start_capture(cap.spec, True, cap.realtime, t_offset=offset)
                self._emit(SourceStatus("looped", f"{cap.spec.describe()} started over"))
                return
            except Exception as exc:  # SourceError, or OpenCV failing in its own way
                self._emit(SourceStatus("error", f"{cap.spec.describe()} could not start over: {exc}"))
        self._turn(None, self._last_turn_t or 0.0)  # the end: settle the last provisional silence
        with self._lock:  # keep showing the last frame; text-only turns still answer; add_frame waits for detach()
            self._sampler = self._new_sampler()
        cap.state = "error" if cap.thread.error is not None else "ended"

    def _drain_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if command[0] == "ask":
                self._session.ask(command[1], must_reply=command[2])
                with self._lock:
                    self._asks_queued -= 1
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
                self._sampler = self._new_sampler()
        self._emit(ResetDone(reason))

    def _turn(self, frames: list[np.ndarray] | None, t: float) -> None:
        """One Session turn (``frames=None``: Session.finish()); a model error is reported, not raised."""
        from edge_duet.runtime import events as ev

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
                    if isinstance(event, ev.TurnStarted) and event.question is not None:
                        self._asks_applied, self._ask_since = 0, None
                    elif isinstance(event, ev.TurnStats):  # counted before anyone hears of it: status() agrees
                        self._context_tokens, self._max_context_tokens = event.context_tokens, event.max_context_tokens
                        self._turns += 1
                        self._last_turn_t, self._last_turn_s = t, time.perf_counter() - started
                    elif isinstance(event, ev.Reply):
                        self._replies += 1
                        self._recent.append({"turn": event.turn, "t": event.t, "text": event.text})
                self._emit(event)
        except Exception as exc:  # the model failed: tell everyone, then recover (or wait for a reset)
            message = f"{type(exc).__name__}: {exc}"
            log.error("turn at t=%.2f s failed: %s", t, message, exc_info=not isinstance(exc, EdgeDuetError))
            recovered = False
            if self.options.reset_on_error:
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
            self._emit(ModelError(message, turn, recovered))
            if recovered:
                self._emit(ResetDone("error"))
            return
        with self._lock:
            if self._state == "running":
                self._state = "waiting"
