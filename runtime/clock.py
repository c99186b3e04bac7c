"""Clocks and frame sampling: one capture loop, three ways time passes.

The capture loop is always the same (grab a frame, stamp it, maybe sample it); the clock decides what a
frame's *stream time* is, whether the loop waits for it, and what happens when the model falls behind::

    clock          stamp(frame)           pace(ts)                     sampler full (model busy)
    -------------  ---------------------  ---------------------------  --------------------------------
    LiveClock      wall time since start  no wait (the camera paces)   drop the oldest sample
    PlaybackClock  file timestamp         sleep until it is due        drop the oldest sample
    SimulatedClock file timestamp         none; time jumps to ts       block the reader (every sample is used)

The simulated clock is deterministic: the same file gives the same turns whatever the model's speed, which is
what tests and evaluation use. The two wall clocks keep replies about *now*: a slow model makes the sampler drop
samples (newest wins), never queue them, so the lag between a frame and the model seeing it stays bounded.

A :class:`FrameSampler` takes one frame every ``frame_interval_s`` of stream time (sample ``k`` at ``k·interval``)
and hands them to the model ``frames_per_turn`` at a time. A turn's ``t`` is the sample time of its last frame.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

# Frame timestamps from containers are rounded (e.g. 0.99999 s for frame 30 at 30 fps): a sample instant counts
# as reached within this margin.
_EPS_S = 1e-3


class Clock:
    """Base of the three clocks. ``now()`` and ``stamp()`` are stream seconds (0 at the first frame)."""

    name = "clock"
    drops_frames = True  # newest wins when the model falls behind; False = the reader waits instead

    def stamp(self, media_ts: float | None) -> float:
        raise NotImplementedError

    def pace(self, ts: float, stop: threading.Event | None = None) -> None:
        """Return when the frame stamped ``ts`` is due (or at once when ``stop`` is set)."""

    def now(self) -> float:
        raise NotImplementedError

    def lag(self, ts: float) -> float:
        """How far stream time ``ts`` is behind now, in seconds (never negative)."""
        return max(0.0, self.now() - ts)


class LiveClock(Clock):
    """A camera or stream: a frame's time is when it was grabbed; the source sets the pace."""

    name = "live"

    def __init__(self, time_fn: Callable[[], float] = time.monotonic):
        self._time = time_fn
        self._start: float | None = None

    def _origin(self) -> float:
        if self._start is None:
            self._start = self._time()
        return self._start

    def stamp(self, media_ts: float | None) -> float:
        origin = self._origin()
        return self._time() - origin

    def now(self) -> float:
        origin = self._origin()
        return self._time() - origin


class PlaybackClock(Clock):
    """A file played as if live: frame ``ts`` is released ``ts`` seconds after the first one."""

    name = "realtime"

    def __init__(self, time_fn: Callable[[], float] = time.monotonic, sleep_fn: Callable[[float], None] | None = None):
        self._time = time_fn
        self._sleep = sleep_fn
        self._start: float | None = None
        self._first_ts: float | None = None

    def stamp(self, media_ts: float | None) -> float:
        if media_ts is None:
            raise ValueError("PlaybackClock needs the frame's timestamp in the file")
        if self._first_ts is None:
            self._first_ts = media_ts
            self._start = self._time()
        return media_ts - self._first_ts

    def pace(self, ts: float, stop: threading.Event | None = None) -> None:
        if self._start is None:
            return
        delay = self._start + ts - self._time()
        if delay <= 0:
            return  # decoding fell behind: no waiting, the lag shows it
        if self._sleep is not None:
            self._sleep(delay)
        elif stop is not None:
            stop.wait(delay)
        else:
            time.sleep(delay)

    def now(self) -> float:
        if self._start is None:
            return 0.0
        return self._time() - self._start


class SimulatedClock(Clock):
    """A file as fast as the model goes: time is the timestamp of the last frame read, and nothing is dropped."""

    name = "fast"
    drops_frames = False

    def __init__(self) -> None:
        self._now = 0.0
        self._first_ts: float | None = None

    def stamp(self, media_ts: float | None) -> float:
        if media_ts is None:
            raise ValueError("SimulatedClock needs the frame's timestamp in the file")
        if self._first_ts is None:
            self._first_ts = media_ts
        return media_ts - self._first_ts

    def pace(self, ts: float, stop: threading.Event | None = None) -> None:
        self._now = max(self._now, ts)

    def now(self) -> float:
        return self._now

    def lag(self, ts: float) -> float:
        return 0.0  # the model never falls behind simulated time: the reader waits for it


@dataclass(frozen=True)
class SampledTurn:
    """``frames_per_turn`` frames (fewer only for the last turn of a file) ready for ``Session.add_frames``."""

    frames: tuple[np.ndarray, ...]
    times_s: tuple[float, ...]  # sample instants (k·interval), stream seconds
    t: float  # the last sample's instant: the turn's video time
    final: bool = False  # the source ended: no turn follows


class SamplerClosed(Exception):
    """The source ended and every sampled frame was taken."""


class FrameSampler:
    """Thread-safe hand-off from the capture loop (:meth:`offer`) to the model loop (:meth:`take`).

    Holds at most ``frames_per_turn`` frames. When full and another sample is due, a dropping sampler
    discards the oldest (counted in ``dropped_frames``); a blocking one makes :meth:`offer` wait.
    Sample instants missed because the source delivered nothing (a stalled or reconnecting camera) are
    counted in ``missed_samples``, not as drops: they are the source's fault, not the model's.
    """

    def __init__(self, frame_interval_s: float, frames_per_turn: int, drop_when_full: bool = True):
        if frame_interval_s <= 0:
            raise ValueError(f"frame_interval_s must be > 0, got {frame_interval_s}")
        if frames_per_turn < 1:
            raise ValueError(f"frames_per_turn must be >= 1, got {frames_per_turn}")
        self.frame_interval_s = float(frame_interval_s)
        self.frames_per_turn = int(frames_per_turn)
        self.drop_when_full = drop_when_full
        self._cond = threading.Condition()
        self._buf: list[tuple[float, np.ndarray]] = []
        self._next_k = 0
        self._closed = False
        self._aborted = False
        self.dropped_frames = 0
        self.missed_samples = 0
        self.sampled_frames = 0
        self.max_buffered = 0

    # ------------------------------------------------------------------ capture side
    def next_instant(self) -> float:
        return self._next_k * self.frame_interval_s

    def due(self, ts: float) -> bool:
        """Whether a frame stamped ``ts`` would be sampled (the reader decodes only those)."""
        return ts + _EPS_S >= self.next_instant()

    def offer(self, ts: float, frame: np.ndarray) -> bool:
        """Give the sampler a frame stamped ``ts``; returns whether it was sampled.

        A blocking sampler waits here while a full turn is not yet taken (or until :meth:`abort`).
        """
        with self._cond:
            if not self.due(ts) or self._closed:
                return False
            k = int(np.floor((ts + _EPS_S) / self.frame_interval_s))
            if k > self._next_k:
                self.missed_samples += k - self._next_k
            instant = k * self.frame_interval_s
            if len(self._buf) >= self.frames_per_turn:
                if self.drop_when_full:
                    self._buf.pop(0)
                    self.dropped_frames += 1
                else:
                    while len(self._buf) >= self.frames_per_turn and not self._aborted:
                        self._cond.wait()
                    if self._aborted:
                        return False
            self._buf.append((instant, frame))
            self.max_buffered = max(self.max_buffered, len(self._buf))
            self._next_k = k + 1
            self.sampled_frames += 1
            self._cond.notify_all()
            return True

    def close(self) -> None:
        """The source ended: the model loop gets the remaining frames as a last, maybe short, turn."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def abort(self) -> None:
        """Stop now: wake every waiter; pending frames are discarded."""
        with self._cond:
            self._closed = True
            self._aborted = True
            self._buf.clear()
            self._cond.notify_all()

    # ------------------------------------------------------------------ model side
    @property
    def buffered(self) -> int:
        with self._cond:
            return len(self._buf)

    def take(self, timeout: float | None = None) -> SampledTurn | None:
        """The next full turn; ``None`` after ``timeout`` seconds without one.

        After :meth:`close`, returns what is left as a ``final`` turn, then raises :class:`SamplerClosed`.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while len(self._buf) < self.frames_per_turn and not self._closed:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return None
                self._cond.wait(remaining)
            if not self._buf:
                raise SamplerClosed()
            items, self._buf = self._buf, []
            final = self._closed
            self._cond.notify_all()
        times = tuple(t for t, _ in items)
        return SampledTurn(frames=tuple(f for _, f in items), times_s=times, t=times[-1], final=final)
