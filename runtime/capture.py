"""Video sources and the capture thread.

Four kinds of source, all read through OpenCV: a camera index, a video file, a URL (``rtsp://``, ``http://``,
...) and a GStreamer pipeline ending in ``appsink`` (Jetson CSI cameras). One :class:`CaptureThread` reads a
source without pause so that OpenCV's and the driver's buffers never fill with stale frames (and asks for a
1-frame buffer where the backend allows it); the :class:`~edge_duet.runtime.clock.FrameSampler` keeps only the
frames the model will use, and :class:`LatestFrame` keeps the newest for a preview window. Nothing is queued
without bound.

Faults: a live source that stops delivering is released and reopened with exponential backoff until it comes
back or the run stops (the dialogue is kept meanwhile); undecodable frames are skipped and counted; a file's end
closes the sampler so the model loop can finish its last turn.
"""

from __future__ import annotations

import glob
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from edge_duet.errors import SourceError, UsageError

from .clock import Clock, FrameSampler

# FFmpeg writes a line per damaged packet straight to stderr ("[h264 @ 0x...] error while decoding MB ..."), dozens
# for one bad stretch of a file; edge-duet counts the frames it skips and says so itself. OpenCV reads this when it
# first opens a file or stream; a level the user sets (OPENCV_FFMPEG_LOGLEVEL=32 shows FFmpeg's messages) wins.
os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")

URL_SCHEMES = ("rtsp", "rtsps", "rtmp", "http", "https", "udp", "tcp", "srt")


@dataclass(frozen=True)
class SourceSpec:
    """What to open. ``kind`` is one of ``camera``, ``file``, ``url``, ``gst``."""

    kind: str
    target: str

    def __post_init__(self) -> None:
        if self.kind not in ("camera", "file", "url", "gst"):
            raise ValueError(f"unknown source kind {self.kind!r}")
        if self.kind == "camera" and not str(self.target).strip().isdigit():
            raise UsageError(
                f"`camera` takes a device index such as 0 (for /dev/video0), got {self.target!r}. "
                "A video file is a `file` source, a stream a `url` source."
            )

    @property
    def live(self) -> bool:
        """Live sources are paced by themselves and are reconnected when they stop; files end."""
        return self.kind != "file"

    def describe(self) -> str:
        if self.kind == "camera":
            return f"camera {self.target}"
        if self.kind == "gst":
            return "GStreamer pipeline"
        return f"{self.kind} {self.target}"


@dataclass(frozen=True)
class CaptureOptions:
    open_timeout_s: float = 10.0
    read_timeout_s: float = 5.0  # a network stream silent for this long counts as lost
    buffer_frames: int = 1  # CAP_PROP_BUFFERSIZE: newest frames, not a backlog (V4L2/GStreamer honour it)
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 8.0
    file_failures_before_eof: int = 5  # consecutive undecodable frames before a file counts as ended


def as_bgr(frame: object) -> np.ndarray | None:
    """A frame as (H, W, 3) uint8 BGR, or ``None`` when it is unusable (corrupt, empty, wrong type)."""
    if not isinstance(frame, np.ndarray) or frame.size == 0 or frame.dtype != np.uint8:
        return None
    if frame.ndim == 2:
        frame = np.repeat(frame[:, :, None], 3, axis=2)
    elif frame.ndim == 3 and frame.shape[2] == 4:
        frame = frame[:, :, :3]
    elif frame.ndim == 3 and frame.shape[2] == 1:
        frame = np.repeat(frame, 3, axis=2)
    if frame.ndim != 3 or frame.shape[2] != 3 or frame.shape[0] < 2 or frame.shape[1] < 2:
        return None
    return np.ascontiguousarray(frame)


def opencv_has_gstreamer() -> bool:
    import cv2

    for line in cv2.getBuildInformation().splitlines():
        if line.strip().startswith("GStreamer:"):
            return "YES" in line.split(":", 1)[1]
    return False


def _camera_hints(index: str) -> str:
    devices = sorted(glob.glob("/dev/video*")) if sys.platform.startswith("linux") else []
    found = f"video devices here: {', '.join(devices)}" if devices else "no /dev/video* device exists on this machine"
    return (
        f"{found}. Try: (1) another index, e.g. `camera` 1 (`v4l2-ctl --list-devices` names them); "
        "(2) check the cable and that no other program holds the camera, and that your user may read it "
        "(`sudo usermod -aG video $USER`, then log in again); (3) a Jetson CSI camera needs GStreamer: "
        "`gst` \"nvarguscamerasrc ! video/x-raw(memory:NVMM),width=1280,height=720 ! nvvidconv ! "
        "video/x-raw,format=BGRx ! videoconvert ! video/x-raw,format=BGR ! appsink drop=true max-buffers=1\"; "
        "(4) a network camera: `url` rtsp://HOST/PATH; (5) no camera at all: `file` FILE or the `demo` scene."
    )


class _Quiet:
    """Silence OpenCV's own warnings while probing (a missing camera prints several lines otherwise)."""

    def __enter__(self):
        try:
            import cv2.utils.logging as cvlog

            self._cvlog = cvlog
            self._level = cvlog.getLogLevel()
            cvlog.setLogLevel(cvlog.LOG_LEVEL_ERROR)
        except (ImportError, AttributeError):  # pragma: no cover - old OpenCV
            self._cvlog = None
        return self

    def __exit__(self, *exc):
        if self._cvlog is not None:
            self._cvlog.setLogLevel(self._level)
        return False


class VideoSource:
    """An opened OpenCV capture with the three calls the capture loop needs.

    ``grab()`` advances (cheap); ``retrieve()`` decodes the grabbed frame to BGR (only done for frames the
    sampler or the preview wants); ``media_ts()`` is the grabbed frame's time in the file, ``None`` for live
    sources.
    """

    def __init__(self, cap, spec: SourceSpec):
        self._cap = cap
        self.spec = spec
        self._index = -1
        self._last_ts: float | None = None
        self._ts: float | None = None
        self._pregrabbed = False
        import cv2

        fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
        self.fps = fps if 0.5 <= fps <= 1000 else 0.0
        self.frame_count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0) if spec.kind == "file" else 0

    def probe(self) -> bool:
        """Grab the first frame now (to fail at start, not mid-run); the next :meth:`grab` returns it."""
        self._pregrabbed = self.grab()
        return self._pregrabbed

    def grab(self) -> bool:
        if self._pregrabbed:
            self._pregrabbed = False
            return True
        if not self._cap.grab():
            return False
        self._index += 1
        if self.spec.kind == "file":
            self._ts = self._file_ts()
        return True

    def _file_ts(self) -> float:
        import cv2

        # Prefer the container's timestamp (variable frame rates); fall back to index/fps where it does not advance.
        pos = float(self._cap.get(cv2.CAP_PROP_POS_MSEC) or 0.0) / 1000.0
        if self._last_ts is None or pos > self._last_ts:
            ts = pos
        elif self.fps:
            ts = max(self._index / self.fps, self._last_ts + 1e-6)
        else:
            ts = self._last_ts + 1 / 30
        self._last_ts = ts
        return ts

    def retrieve(self) -> np.ndarray | None:
        ok, frame = self._cap.retrieve()
        return as_bgr(frame) if ok else None

    def media_ts(self) -> float | None:
        return self._ts

    @property
    def frames_grabbed(self) -> int:
        return self._index + 1

    def release(self) -> None:
        self._cap.release()


def open_source(spec: SourceSpec, options: CaptureOptions = CaptureOptions()) -> VideoSource:
    """Open ``spec`` and grab its first frame; raise :class:`SourceError` saying what to try when that fails."""
    import cv2

    timeouts = [
        cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, int(options.open_timeout_s * 1000),
        cv2.CAP_PROP_READ_TIMEOUT_MSEC, int(options.read_timeout_s * 1000),
    ]
    with _Quiet():
        if spec.kind == "camera":
            index = int(spec.target)  # a number: SourceSpec checked it
            if sys.platform.startswith("linux") and not os.path.exists(f"/dev/video{index}"):
                raise SourceError(f"camera {index} not found (/dev/video{index} does not exist); " + _camera_hints(spec.target))
            cap = cv2.VideoCapture(index, cv2.CAP_ANY)
            what = f"camera {index} could not be opened; " + _camera_hints(spec.target)
        elif spec.kind == "file":
            path = Path(spec.target)
            if not path.is_file():
                raise SourceError(f"no video file at {path}. Give `file` an existing video file (mp4, mkv, avi, ...).")
            cap = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG, timeouts)
            what = (f"cannot decode {path}: it is not a video OpenCV's FFmpeg backend can open (a file that is cut off, "
                    f"e.g. a recording stopped before it was finished, a corrupt file, or not a video at all). "
                    f"`ffprobe {path}` says what is wrong with it; a video that plays elsewhere can be re-encoded: "
                    f"`ffmpeg -i {path} -c:v libx264 fixed.mp4`.")
        elif spec.kind == "url":
            scheme = spec.target.split("://", 1)[0].lower() if "://" in spec.target else ""
            if scheme not in URL_SCHEMES:
                raise SourceError(f"`url` needs a stream URL ({', '.join(s + '://' for s in URL_SCHEMES)}), got {spec.target!r}.")
            if scheme.startswith("rtsp") and "OPENCV_FFMPEG_CAPTURE_OPTIONS" not in os.environ:
                # RTSP over TCP: no smeared frames from lost UDP packets. Set the variable yourself to choose.
                os.environ["OPENCV_FFMPEG_CAPTURE_OPTIONS"] = "rtsp_transport;tcp"
            cap = cv2.VideoCapture(spec.target, cv2.CAP_FFMPEG, timeouts)
            what = (
                f"cannot open {spec.target}: check the address and that the stream is up "
                f"(`ffprobe {spec.target}` shows what the server sends)."
            )
        else:
            if not opencv_has_gstreamer():
                raise SourceError(
                    "`gst` needs OpenCV built with GStreamer, and this one is not (the PyPI opencv-python wheels never "
                    "are). On Jetson use JetPack's OpenCV: `sudo apt install python3-opencv`, make the virtualenv with "
                    "--system-site-packages and `pip uninstall opencv-python-headless`. Or serve the camera over RTSP "
                    "and use `url`."
                )
            pipeline = spec.target
            if "appsink" not in pipeline:
                pipeline += " ! videoconvert ! video/x-raw,format=BGR ! appsink drop=true max-buffers=1"
            cap = cv2.VideoCapture(pipeline, cv2.CAP_GSTREAMER)
            what = (
                "the GStreamer pipeline did not start; test it with "
                f"`gst-launch-1.0 {spec.target.replace('appsink', 'fakesink')}` and read its error."
            )
        if not cap.isOpened():
            cap.release()
            raise SourceError(what)
        if spec.live:
            cap.set(cv2.CAP_PROP_BUFFERSIZE, options.buffer_frames)
        source = VideoSource(cap, spec)
        if not source.probe():
            source.release()
            if spec.kind == "file":
                raise SourceError(f"{spec.target} has no decodable video frames.")
            raise SourceError(f"{spec.describe()} opened but delivered no frame. " + (
                _camera_hints(spec.target) if spec.kind == "camera" else what))
    return source


class LatestFrame:
    """One slot: the newest frame wins (for a preview window)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._item: tuple[float, np.ndarray] | None = None

    def put(self, ts: float, frame: np.ndarray) -> None:
        with self._lock:
            self._item = (ts, frame)

    def get(self) -> tuple[float, np.ndarray] | None:
        with self._lock:
            return self._item


StatusFn = Callable[[str, str], None]  # (status, message): lost | retry | reconnected | corrupt | eof | error


class CaptureThread(threading.Thread):
    """Reads ``source`` for as long as the run lasts, stamping frames with ``clock`` and feeding ``sampler``.

    ``reopen`` makes a fresh source after a live one is lost (default: :func:`open_source` on the same spec).
    ``on_status`` is called from this thread; keep it short.
    """

    def __init__(
        self,
        source: VideoSource,
        clock: Clock,
        sampler: FrameSampler,
        *,
        stop: threading.Event,
        on_status: StatusFn | None = None,
        reopen: Callable[[], VideoSource] | None = None,
        options: CaptureOptions = CaptureOptions(),
        keep_latest: bool = False,
    ):
        super().__init__(name="edge-duet-capture", daemon=True)
        self.source = source
        self.spec = source.spec
        self.clock = clock
        self.sampler = sampler
        self.stop_event = stop
        self.on_status = on_status or (lambda status, message: None)
        self.reopen = reopen or (lambda: open_source(self.spec, options))
        self.options = options
        self.latest = LatestFrame() if keep_latest else None
        self.frames_read = 0
        self.corrupt_frames = 0
        self.reconnects = 0
        self.connected = True
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # reported to the model loop, which ends the run with it
            self.error = exc
            self.on_status("error", f"capture failed: {type(exc).__name__}: {exc}")
        finally:
            try:
                if self.source is not None:
                    self.source.release()
            finally:
                self.sampler.close()

    def _loop(self) -> None:
        failures = 0
        while not self.stop_event.is_set():
            if not self.source.grab():
                failures += 1
                if self.spec.live:
                    if not self._reconnect():
                        return
                    failures = 0
                    continue
                count = self.source.frame_count
                if count and self.source.frames_grabbed < count and failures < self.options.file_failures_before_eof:
                    self._corrupt()
                    continue
                self.on_status("eof", f"end of {self.spec.describe()}")
                return
            failures = 0
            self.frames_read += 1
            ts = self.clock.stamp(self.source.media_ts())
            self.clock.pace(ts, self.stop_event)
            wanted = self.sampler.due(ts)
            if not (wanted or self.latest is not None):
                continue
            frame = self.source.retrieve()
            if frame is None:
                self._corrupt()
                continue
            if self.latest is not None:
                self.latest.put(ts, frame)
            if wanted:
                self.sampler.offer(ts, frame)

    def _corrupt(self) -> None:
        self.corrupt_frames += 1
        if self.corrupt_frames == 1 or self.corrupt_frames % 100 == 0:
            self.on_status("corrupt", f"skipped {self.corrupt_frames} undecodable frame(s) from {self.spec.describe()}")

    def _reconnect(self) -> bool:
        """Reopen a lost live source with exponential backoff; ``False`` when the run stopped meanwhile."""
        self.connected = False
        self.source.release()
        self.source = None
        delay = self.options.backoff_initial_s
        self.on_status("lost", f"{self.spec.describe()} stopped delivering frames; reconnecting (the dialogue is kept)")
        while not self.stop_event.wait(delay):
            try:
                self.source = self.reopen()
            except SourceError:
                delay = min(delay * 2, self.options.backoff_max_s)
                self.on_status("retry", f"{self.spec.describe()} still unavailable; next try in {delay:.1f} s")
                continue
            self.connected = True
            self.reconnects += 1
            self.on_status("reconnected", f"{self.spec.describe()} is back")
            return True
        return False
