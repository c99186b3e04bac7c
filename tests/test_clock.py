"""Clocks and the frame sampler: sample instants, drop policy, blocking hand-off, end of stream."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from edge_duet.runtime.clock import (
    FrameSampler,
    LiveClock,
    PlaybackClock,
    SamplerClosed,
    SimulatedClock,
)


def frame(v: int) -> np.ndarray:
    return np.full((4, 4, 3), v % 256, np.uint8)


class FakeTime:
    def __init__(self, t: float = 100.0):
        self.t = t
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.slept.append(s)
        self.t += s


def feed(sampler: FrameSampler, fps: float, seconds: float) -> None:
    for i in range(int(round(fps * seconds))):
        sampler.offer(i / fps, frame(i))


def test_sampler_takes_one_frame_per_interval_at_its_instants():
    s = FrameSampler(frame_interval_s=1.0, frames_per_turn=2, drop_when_full=False)
    got = []

    def consume():
        while True:
            try:
                turn = s.take(timeout=5)
            except SamplerClosed:
                return
            got.append(turn)

    th = threading.Thread(target=consume)
    th.start()
    feed(s, fps=30, seconds=5.0)  # frames at 0, 1/30, ...; 30/30 = 1.0 must count as the 1 s instant
    s.close()
    th.join(5)
    assert [t.times_s for t in got] == [(0.0, 1.0), (2.0, 3.0), (4.0,)]
    assert [t.t for t in got] == [1.0, 3.0, 4.0]
    assert [t.final for t in got] == [False, False, True]
    # the frames are the ones at the instants: frame i has value i
    assert [int(f[0, 0, 0]) for t in got for f in t.frames] == [0, 30, 60, 90, 120]
    assert s.dropped_frames == 0 and s.sampled_frames == 5


def test_sampler_due_tolerates_rounded_timestamps():
    s = FrameSampler(1.0, 1)
    assert s.due(0.0)
    s.offer(0.0, frame(0))
    assert not s.due(0.5)
    assert s.due(0.9999)  # a container's rounding of 1.0
    s.take(timeout=0)
    assert s.offer(0.9999, frame(1))


def test_dropping_sampler_keeps_newest_and_counts_drops():
    s = FrameSampler(0.5, 2, drop_when_full=True)
    for i in range(10):  # 10 samples, nobody taking
        s.offer(i * 0.5, frame(i))
    assert s.buffered == 2
    assert s.max_buffered == 2
    assert s.dropped_frames == 8
    turn = s.take(timeout=0)
    assert turn.times_s == (4.0, 4.5)  # the newest two
    assert [int(f[0, 0, 0]) for f in turn.frames] == [8, 9]


def test_source_gaps_are_missed_samples_not_drops():
    s = FrameSampler(1.0, 2, drop_when_full=True)
    s.offer(0.0, frame(0))
    s.offer(5.2, frame(1))  # the camera was away for 5 s: instants 1..4 never had a frame
    assert s.missed_samples == 4
    assert s.dropped_frames == 0
    turn = s.take(timeout=0)
    assert turn.times_s == (0.0, 5.0)


def test_blocking_sampler_waits_for_the_model_instead_of_dropping():
    s = FrameSampler(1.0, 1, drop_when_full=False)
    s.offer(0.0, frame(0))
    done = threading.Event()

    def writer():
        s.offer(1.0, frame(1))  # blocks: the turn at 0 s is not taken yet
        done.set()

    th = threading.Thread(target=writer)
    th.start()
    assert not done.wait(0.2)
    assert s.take(timeout=1).times_s == (0.0,)
    assert done.wait(2)
    assert s.take(timeout=1).times_s == (1.0,)
    assert s.dropped_frames == 0
    th.join(2)


def test_abort_wakes_a_blocked_writer_and_a_waiting_reader():
    s = FrameSampler(1.0, 1, drop_when_full=False)
    s.offer(0.0, frame(0))
    result = []
    th = threading.Thread(target=lambda: result.append(s.offer(1.0, frame(1))))
    th.start()
    time.sleep(0.05)
    s.abort()
    th.join(2)
    assert result == [False]
    with pytest.raises(SamplerClosed):
        s.take(timeout=1)


def test_take_times_out_with_none():
    s = FrameSampler(1.0, 2)
    t0 = time.monotonic()
    assert s.take(timeout=0.05) is None
    assert time.monotonic() - t0 < 1.0


def test_sampler_rejects_bad_settings():
    with pytest.raises(ValueError):
        FrameSampler(0.0, 2)
    with pytest.raises(ValueError):
        FrameSampler(1.0, 0)


def test_live_clock_stamps_wall_time_since_first_frame():
    ft = FakeTime(50.0)
    c = LiveClock(time_fn=ft)
    assert c.stamp(None) == 0.0
    ft.t += 2.5
    assert c.stamp(123.0) == pytest.approx(2.5)  # the source's own timestamp is ignored
    ft.t += 0.5
    assert c.now() == pytest.approx(3.0)
    assert c.lag(2.5) == pytest.approx(0.5)
    assert c.drops_frames


def test_playback_clock_waits_until_each_frame_is_due():
    ft = FakeTime(10.0)
    c = PlaybackClock(time_fn=ft, sleep_fn=ft.sleep)
    assert c.stamp(0.0) == 0.0
    c.pace(0.0)
    assert ft.slept == []
    ts = c.stamp(1.5)
    c.pace(ts)
    assert ft.slept == [pytest.approx(1.5)]
    assert c.now() == pytest.approx(1.5)
    ft.t += 3.0  # decoding fell behind: no sleeping, the lag shows it
    c.pace(c.stamp(2.0))
    assert len(ft.slept) == 1
    assert c.lag(2.0) == pytest.approx(2.5)


def test_playback_clock_pace_is_interrupted_by_stop():
    c = PlaybackClock()
    c.stamp(0.0)
    stop = threading.Event()
    stop.set()
    t0 = time.monotonic()
    c.pace(30.0, stop)
    assert time.monotonic() - t0 < 1.0


def test_simulated_clock_follows_file_time_and_never_lags():
    c = SimulatedClock()
    assert not c.drops_frames
    assert c.stamp(3.0) == 0.0  # streams start at 0
    t0 = time.monotonic()
    c.pace(c.stamp(60.0))
    assert time.monotonic() - t0 < 0.5  # no waiting
    assert c.now() == pytest.approx(57.0)
    assert c.lag(1.0) == 0.0
