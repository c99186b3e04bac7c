"""How an :class:`~edge_duet.runtime.assistant.Assistant` hands its events out: the events it adds to the
Session's (``runtime/events.py``), one bounded :class:`Subscription` per consumer, and the :class:`Fanout`
that feeds them all.

Every consumer of the one driver reads it through here: an app's ``for event in assistant.subscribe()``, the
``edge-duet run`` console and JSONL log (callbacks on the worker thread), the ``edge-duet serve`` WebSocket
watchers (a subscription each, woken on the event loop by ``on_ready``).
"""

from __future__ import annotations

import collections
import logging
import threading
from dataclasses import dataclass, fields
from typing import Any, Callable, Iterator

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- events added to the Session's
@dataclass(frozen=True)
class AssistantEvent:
    EVENT = ""

    @property
    def kind(self) -> str:
        return type(self).__name__

    def to_dict(self) -> dict:
        return {"event": self.EVENT, **{f.name: getattr(self, f.name) for f in fields(self)}}


@dataclass(frozen=True)
class TurnFrames(AssistantEvent):
    """The frames of the turn about to start: their sample instants, how late the model takes them (``lag_s``:
    clock time minus the turn's time) and the sampler's running counts. Precedes the turn's ``TurnStarted``.
    Only listeners that ask for it get it (``frames=True``): the run log writes it, the rest read ``status()``."""

    EVENT = "frames"
    t: float
    times_s: tuple[float, ...]
    lag_s: float
    dropped_frames: int
    missed_samples: int

    def to_dict(self) -> dict:
        return {"event": self.EVENT, "t": self.t, "times_s": list(self.times_s), "lag_s": round(self.lag_s, 4),
                "dropped_frames": self.dropped_frames, "missed_samples": self.missed_samples}


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


# ---------------------------------------------------------------- consumers
class Subscription:
    """A bounded event buffer for one consumer: iterate it, call :meth:`get`, or (from an event loop) poll it with
    ``get(timeout=0)`` when ``on_ready`` says something arrived.

    A consumer that falls behind loses the oldest events and reads a :class:`Dropped` first. Iteration ends
    when the assistant closes (after its :class:`Closed` event) or after :meth:`close`. ``on_ready`` is called
    (on the emitting thread, outside the buffer's lock) after each event is queued; it must return at once.
    """

    def __init__(self, maxsize: int, on_close: Callable[["Subscription"], None] | None = None,
                 on_ready: Callable[[], None] | None = None, frames: bool = False):
        self.frames = frames  # whether it gets TurnFrames
        self._buf: collections.deque = collections.deque(maxlen=max(1, int(maxsize)))
        self._cond = threading.Condition()
        self._on_close = on_close
        self._on_ready = on_ready
        self._unreported = 0
        self.dropped_total = 0
        self._ended = False

    def put(self, event: Any) -> None:
        """Queue one event (any thread; never blocks): the assistant's, or a consumer's own (the server's
        ``control`` notices), so that it reaches this reader in order with the rest."""
        with self._cond:
            if self._ended:
                return
            if len(self._buf) == self._buf.maxlen:
                self._unreported += 1
                self.dropped_total += 1
            self._buf.append(event)
            self._cond.notify()
        if self._on_ready is not None:
            self._on_ready()

    def end(self) -> None:
        """No more events: readers drain what is queued, then iteration stops."""
        with self._cond:
            self._ended = True
            self._cond.notify_all()
        if self._on_ready is not None:
            self._on_ready()

    def __len__(self) -> int:
        """Events queued and not yet read."""
        with self._cond:
            return len(self._buf)

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
        if self._on_close is not None:
            self._on_close(self)
        self.end()

    def __enter__(self) -> "Subscription":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Fanout:
    """The assistant's listeners: bounded subscriptions and callbacks. ``emit`` never blocks on a listener and
    never raises a listener's exception (it is logged): a consumer's bug must not stop the model."""

    def __init__(self, buffer_events: int):
        self.buffer_events = buffer_events
        self._lock = threading.Lock()
        self._subs: list[Subscription] = []
        self._callbacks: list[tuple[Callable[[Any], None], bool]] = []  # (callback, gets TurnFrames)
        self._closed = False

    def subscribe(self, maxsize: int | None = None, on_ready: Callable[[], None] | None = None,
                  frames: bool = False) -> Subscription:
        sub = Subscription(maxsize or self.buffer_events, on_close=self._remove, on_ready=on_ready, frames=frames)
        with self._lock:
            if self._closed:
                sub.end()
            else:
                self._subs.append(sub)
        return sub

    def on_event(self, callback: Callable[[Any], None], frames: bool = False) -> Callable[[], None]:
        entry = (callback, frames)
        with self._lock:
            self._callbacks.append(entry)

        def remove() -> None:
            with self._lock:
                if entry in self._callbacks:
                    self._callbacks.remove(entry)

        return remove

    def __len__(self) -> int:
        with self._lock:
            return len(self._subs) + len(self._callbacks)

    def _remove(self, sub: Subscription) -> None:
        with self._lock:
            if sub in self._subs:
                self._subs.remove(sub)

    def emit(self, event: Any) -> None:
        detail = isinstance(event, TurnFrames)
        with self._lock:
            subs = [s for s in self._subs if s.frames or not detail]
            callbacks = [cb for cb, frames in self._callbacks if frames or not detail]
        for sub in subs:
            sub.put(event)
        self._call(callbacks, event)

    def close(self) -> None:
        """Emit :class:`Closed` to everyone, then end every subscription."""
        with self._lock:
            self._closed = True
            subs, self._subs = self._subs, []
            callbacks = [cb for cb, _ in self._callbacks]
        self._call(callbacks, Closed())
        for sub in subs:
            sub.put(Closed())
            sub.end()

    @staticmethod
    def _call(callbacks: list, event: Any) -> None:
        for callback in callbacks:
            try:
                callback(event)
            except Exception:
                log.exception("event listener %r failed", callback)
