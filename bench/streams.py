"""Many cameras, one server: per-turn latency and server throughput against the number of concurrent streams.

Each stream is one :class:`~edge_duet.runtime.remote.RemoteSession` in its own thread with its own generated
camera (a moving, colour-changing square on noise, seeded per stream), asking one question in its first turn.
Streams run closed-loop: a stream sends its next turn as soon as the previous one has returned, so N streams
keep N requests in flight and the numbers show what the server gives under that load (a camera pacing turns at
its frame interval loads the server less). What a device sees is the turn latency; what the site sees is the
server's throughput (turns/s, generated tokens/s over all streams).
"""

from __future__ import annotations

import statistics
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from edge_duet.runtime.events import Reply, TurnStats
from edge_duet.runtime.remote import RemoteSession, ServerOptions
from edge_duet.runtime.session import SessionOptions


@dataclass(frozen=True)
class StreamsOptions:
    streams: tuple[int, ...] = (1, 2, 4)  # concurrent streams of each round
    turns: int = 20  # turns per stream per round
    frames_per_turn: int = 2
    frame_size: tuple[int, int] = (640, 480)  # (width, height) of the generated camera; resized on the device
    max_new_tokens: int = 16
    question: str = "What is happening? Tell me when it changes."


@dataclass
class StreamsRow:
    streams: int
    turns: int = 0  # completed turns, all streams together
    errors: list[str] = field(default_factory=list)
    latency_s: list[float] = field(default_factory=list)  # every completed turn's wall time (step, frames included)
    first_token_s: list[float] = field(default_factory=list)  # request sent -> first streamed answer
    replies: int = 0
    completion_tokens: int = 0
    cached_share: list[float] = field(default_factory=list)  # cached / prompt tokens, turns after the first
    wall_s: float = 0.0

    def summary(self) -> dict:
        lat = sorted(self.latency_s)
        return {
            "streams": self.streams, "turns": self.turns, "errors": len(self.errors),
            "latency_mean_s": statistics.fmean(lat) if lat else None,
            "latency_p50_s": _pct(lat, 50), "latency_p95_s": _pct(lat, 95),
            "first_token_p50_s": _pct(sorted(self.first_token_s), 50),
            "turns_per_s": self.turns / self.wall_s if self.wall_s else None,
            "tokens_per_s": self.completion_tokens / self.wall_s if self.wall_s else None,
            "replies": self.replies,
            "cached_share": statistics.fmean(self.cached_share) if self.cached_share else None,
        }


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def camera_frame(stream: int, index: int, size: tuple[int, int]) -> np.ndarray:
    """A BGR frame of a generated camera: noise (so JPEG has work to do) and a square crossing the view."""
    w, h = size
    rng = np.random.default_rng(stream * 100_003 + index)
    img = rng.integers(60, 100, (h, w, 3), dtype=np.uint8)
    side = max(4, min(w, h) // 5)
    x = int((w - side) * ((index * 0.05 + stream * 0.3) % 1.0))
    y = (h - side) // 2
    img[y:y + side, x:x + side] = (40, 40, 220) if (index // 20) % 2 == 0 else (50, 190, 40)
    return img


def run_streams(model, server: ServerOptions, options: StreamsOptions = StreamsOptions(),
                session_options: SessionOptions | None = None, log=lambda s: None) -> list[StreamsRow]:
    """One round per entry of ``options.streams``; each round opens fresh sessions (so no stream starts from a
    cache warmed by the previous round's same stream) and runs ``options.turns`` turns in every stream."""
    sopts = session_options or SessionOptions(max_new_tokens=options.max_new_tokens)
    rows = []
    for n in options.streams:
        row = StreamsRow(n)
        lock = threading.Lock()
        sessions = [RemoteSession(model, server, sopts) for _ in range(n)]
        go = threading.Barrier(n + 1)

        def stream(k: int, session: RemoteSession) -> None:
            go.wait()
            frame_index = 0
            try:
                for turn in range(options.turns):
                    t0 = time.perf_counter()
                    if turn == 0:
                        session.ask(options.question)
                    frames = [camera_frame(1000 * n + k, frame_index + i, options.frame_size)
                              for i in range(options.frames_per_turn)]
                    frame_index += options.frames_per_turn
                    session.add_frames(frames, t=float(frame_index))
                    first, replies = None, 0
                    for ev in session.step():
                        if isinstance(ev, TurnStats):
                            first = ev.prefill_s
                        elif isinstance(ev, Reply):
                            replies += 1
                    dt = time.perf_counter() - t0
                    usage = session.last_usage
                    with lock:
                        row.turns += 1
                        row.latency_s.append(dt)
                        row.replies += replies
                        if first is not None:
                            row.first_token_s.append(first)
                        row.completion_tokens += int(usage.get("completion_tokens") or 0)
                        if turn and usage.get("prompt_tokens"):
                            row.cached_share.append((usage.get("cached_tokens") or 0) / usage["prompt_tokens"])
            except Exception as exc:  # noqa: BLE001 - every stream's failure is reported in the table
                with lock:
                    row.errors.append(f"stream {k}: {type(exc).__name__}: {exc}")

        threads = [threading.Thread(target=stream, args=(k, s), daemon=True) for k, s in enumerate(sessions)]
        for th in threads:
            th.start()
        go.wait()
        t0 = time.perf_counter()
        for th in threads:
            th.join()
        row.wall_s = time.perf_counter() - t0
        for s in sessions:
            s.close()
        log(f"{n} stream(s): {row.turns} turns in {row.wall_s:.1f} s, {len(row.errors)} error(s)")
        rows.append(row)
    return rows


def format_streams(rows: list[StreamsRow], title: str = "") -> str:
    def f(v, fmt="{:.3f}"):
        return "-" if v is None else fmt.format(v)

    head = "| streams | turns | errors | turn latency mean / p50 / p95 (s) | first token p50 (s) | " \
           "server turns/s | server tokens/s | prompt cached |"
    lines = ([title] if title else []) + [head, "|" + "---|" * 8]
    for r in rows:
        s = r.summary()
        lines.append(
            f"| {s['streams']} | {s['turns']} | {s['errors']} | {f(s['latency_mean_s'])} / {f(s['latency_p50_s'])} "
            f"/ {f(s['latency_p95_s'])} | {f(s['first_token_p50_s'])} | {f(s['turns_per_s'], '{:.2f}')} | "
            f"{f(s['tokens_per_s'], '{:.1f}')} | {f(s['cached_share'], '{:.0%}')} |")
    for r in rows:
        lines += [f"  {e}" for e in r.errors[:5]]
    return "\n".join(lines)


def report(rows: list[StreamsRow], options: StreamsOptions, server: ServerOptions, model: str | Path) -> dict:
    return {"options": asdict(options), "server": {"url": server.api_url, "model": server.served_model,
                                                   "api": server.api, "image_format": server.image_format},
            "model": str(model), "rows": [r.summary() for r in rows],
            "errors": [e for r in rows for e in r.errors]}
