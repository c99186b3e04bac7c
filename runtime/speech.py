"""Spoken replies that never hold up the model.

::

    model loop --say()--> [pending: 1 slot, newest wins] --> speech thread: synthesise WAV --> player process
                               (a stale pending reply        (espeak-ng or Piper,          (aplay / paplay /
                                is replaced, not queued)      a niced subprocess)          pw-play / ffplay)

``say()`` returns at once. A reply still pending when a newer one arrives is dropped; a reply being spoken is
cut when the newer one is about a moment at least ``stale_after_s`` of video later (so a chatty model never
makes the speaker lag further and further behind the picture). Engines are separate CPU processes run under
``nice``: speech does not compete with the model for the GPU, and yields the CPU to it.

Without an audio device (no playback device and no sound server, as on a headless board) the speaker says so
once and writes each reply as a WAV file to ``audio_dir`` instead.

Failures never stop the run and never escape the speech thread; each kind is reported once (``on_message``):
a reply the engine cannot say is skipped and the next one is tried; a WAV that cannot be written (the folder
gone, the disk full) or any unexpected fault turns speech off for the rest of the run. ``failed`` counts them.
A WAV appears in ``audio_dir`` whole or not at all: it is synthesised in a private folder and moved there.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from edge_duet.errors import UsageError

ENGINES = ("espeak-ng", "piper", "none")
DEFAULT_AUDIO_DIR = Path("edge-duet-speech")


@dataclass(frozen=True)
class SpeechOptions:
    engine: str = "espeak-ng"  # espeak-ng | piper | none
    voice: str | None = None  # espeak-ng voice name (en-us, en-gb+f3) or a Piper voice file (.onnx)
    audio_dir: Path | None = None  # also keep every reply as a WAV here; without an audio device, only here
    words_per_minute: int = 170  # espeak-ng only
    stale_after_s: float = 3.0  # cut a reply being spoken when a newer one is this much later in the video
    synth_timeout_s: float = 30.0


def resolve_engine(engine: str, voice: str | None) -> str:
    """``auto`` means Piper when ``voice`` is a Piper voice file, else espeak-ng. Raise when it is not installed."""
    if engine == "auto":
        engine = "piper" if voice and voice.endswith(".onnx") else "espeak-ng"
    if engine not in ENGINES:
        raise UsageError(f"`SpeechOptions.engine` must be one of auto, {', '.join(ENGINES)}; got {engine!r}.")
    if engine == "espeak-ng" and shutil.which("espeak-ng") is None:
        raise UsageError(
            "speech needs espeak-ng, which is not installed: `sudo apt install espeak-ng` "
            "(or give a Piper voice with `SpeechOptions.voice` VOICE.onnx, or turn speech off with "
            "`SpeechOptions.engine` none)."
        )
    if engine == "piper":
        if _piper_command() is None:
            raise UsageError(
                "`SpeechOptions.engine` piper needs Piper: `pip install piper-tts` (or use `SpeechOptions.engine` "
                "espeak-ng)."
            )
        if not voice or not Path(voice).is_file():
            raise UsageError(
                f"`SpeechOptions.engine` piper needs `SpeechOptions.voice` PATH to a Piper voice file (.onnx with its .onnx.json beside it); "
                f"got {voice!r}. `python -m piper.download_voices en_US-lessac-medium` fetches one."
            )
    return engine


def _piper_command() -> list[str] | None:
    exe = shutil.which("piper")
    if exe:
        return [exe]
    try:
        import importlib.util

        if importlib.util.find_spec("piper") is not None:
            return [sys.executable, "-m", "piper"]
    except (ImportError, ValueError):
        pass
    return None


def _nice(cmd: list[str]) -> list[str]:
    nice = shutil.which("nice")
    return [nice, "-n", "10", *cmd] if nice else cmd


def synthesize(text: str, out_path: str | Path, options: SpeechOptions) -> Path:
    """Write ``text`` spoken by ``options.engine`` to a WAV file; raise ``RuntimeError`` when the engine fails."""
    out_path = Path(out_path)
    if options.engine == "espeak-ng":
        cmd = ["espeak-ng", "-w", str(out_path), "-s", str(options.words_per_minute), "--stdin"]
        if options.voice:
            cmd += ["-v", options.voice]
    elif options.engine == "piper":
        base = _piper_command()
        if base is None:
            raise RuntimeError("Piper is not installed")
        cmd = [*base, "-m", str(options.voice), "-f", str(out_path)]
    else:
        raise RuntimeError(f"engine {options.engine!r} does not synthesise")
    proc = subprocess.run(
        _nice(cmd), input=text.encode("utf-8"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        timeout=options.synth_timeout_s, check=False,
    )
    if proc.returncode != 0 or not out_path.is_file() or out_path.stat().st_size <= 44:
        detail = proc.stderr.decode("utf-8", "replace").strip()[-300:]
        raise RuntimeError(f"{options.engine} failed (exit {proc.returncode}): {detail or 'no output'}")
    return out_path


def find_player() -> tuple[list[str] | None, str]:
    """A command that plays a WAV on this machine's audio output, or ``None`` and the reason there is none."""
    runtime_dir = os.environ.get("XDG_RUNTIME_DIR", "")
    pulse = bool(os.environ.get("PULSE_SERVER")) or (runtime_dir and os.path.exists(os.path.join(runtime_dir, "pulse", "native")))
    pipewire = bool(runtime_dir) and os.path.exists(os.path.join(runtime_dir, "pipewire-0"))
    alsa = bool(glob.glob("/dev/snd/pcmC*D*p"))
    if pipewire and shutil.which("pw-play"):
        return ["pw-play"], "PipeWire"
    if pulse and shutil.which("paplay"):
        return ["paplay"], "PulseAudio"
    if alsa and shutil.which("aplay"):
        return ["aplay", "-q"], "ALSA"
    if (alsa or pulse or pipewire) and shutil.which("ffplay"):
        return ["ffplay", "-nodisp", "-autoexit", "-loglevel", "error"], "ffplay"
    if alsa or pulse or pipewire:
        return None, "an audio device exists but no player is installed (`sudo apt install alsa-utils`)"
    return None, "no audio device (no ALSA playback device and no sound server)"


@dataclass
class _Utterance:
    text: str
    t: float
    turn: int


class Speaker:
    """Speaks replies on its own thread. ``player``: ``"auto"`` finds one; ``None`` forces WAV files only."""

    def __init__(
        self,
        options: SpeechOptions,
        *,
        player: list[str] | None | str = "auto",
        on_message: Callable[[str], None] | None = None,
    ):
        self.options = options
        self._say_message = on_message or (lambda msg: print(msg, file=sys.stderr, flush=True))
        if player == "auto":
            player, why = find_player()
        else:
            why = "audio playback turned off"
        self.player: list[str] | None = player  # type: ignore[assignment]
        self._no_device_reason = why
        self.audio_dir = options.audio_dir
        if self.player is None and self.audio_dir is None:
            self.audio_dir = DEFAULT_AUDIO_DIR
        self._cond = threading.Condition()
        self._pending: _Utterance | None = None
        self._current: _Utterance | None = None
        self._proc: subprocess.Popen | None = None
        self._closing = False
        self._interrupted = False
        self._told_no_device = False
        self._tmp = tempfile.TemporaryDirectory(prefix="edge-duet-speech-")
        self.spoken = 0  # finished playing (or written, without a device)
        self.dropped = 0  # replaced while pending
        self.cut = 0  # interrupted while playing
        self.failed = 0
        self.files: list[Path] = []
        self._thread = threading.Thread(target=self._run, name="edge-duet-speech", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ model-loop side: never blocks
    def say(self, text: str, t: float = 0.0, turn: int = 0) -> None:
        text = " ".join(text.split())
        if not text or self.options.engine == "none":
            return
        with self._cond:
            if self._closing:
                return
            if self._pending is not None:
                self.dropped += 1
            new = _Utterance(text, t, turn)
            self._pending = new
            cur = self._current
            if cur is not None and self._proc is not None and new.t - cur.t >= self.options.stale_after_s:
                self._stop_player()
                self.cut += 1
            self._cond.notify_all()

    def interrupt(self) -> None:
        """Be quiet now: stop the reply being spoken and forget the pending one (Ctrl-C). Never blocks long."""
        with self._cond:
            self._interrupted = True
            if self._pending is not None:
                self.dropped += 1
                self._pending = None
            if self._proc is not None and self._proc.poll() is None:
                self._stop_player()
                self.cut += 1
            self._cond.notify_all()

    def close(self, timeout: float = 5.0, finish: bool = False) -> None:
        """Stop speaking and join the thread. ``finish=True`` first lets the pending reply be spoken (up to
        ``timeout`` seconds, or until :meth:`interrupt`)."""
        with self._cond:
            if finish:
                self._interrupted = False
                while (self._pending is not None or self._current is not None) and self._thread.is_alive():
                    if not self._cond.wait(timeout) or self._interrupted:
                        break
            self._closing = True
            self._pending = None
            self._stop_player()
            self._cond.notify_all()
        self._thread.join(timeout)
        self._tmp.cleanup()

    # ------------------------------------------------------------------ speech thread
    def _stop_player(self) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.terminate()

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._pending is None and not self._closing:
                    self._cond.wait()
                if self._closing:
                    return
                item, self._pending = self._pending, None
                self._current = item
            try:
                self._speak(item)
            except Exception as exc:  # noqa: BLE001 - whatever it is, it must not end in a thread traceback
                self._turn_off(f"{type(exc).__name__}: {exc}")
            finally:
                with self._cond:
                    self._current = None
                    self._proc = None
                    self._cond.notify_all()

    def _turn_off(self, why: str) -> None:
        """Speech stops for the rest of the run; the replies stay on screen (and in --events)."""
        self.failed += 1
        with self._cond:
            self._closing = True
            self._pending = None
            self._cond.notify_all()
        self._say_message(f"speech turned off: {why}; replies stay on screen")

    def _speak(self, item: _Utterance) -> None:
        wav = Path(self._tmp.name) / "reply.wav"
        try:
            synthesize(item.text, wav, self.options)
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
            self.failed += 1
            if self.failed == 1:
                self._say_message(f"speech: {exc}; replies stay on screen")
            return
        if self.audio_dir is not None:
            kept = self.audio_dir / f"turn{item.turn:05d}_t{item.t:07.1f}s.wav"
            try:
                self.audio_dir.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(wav, kept.with_name(kept.name + ".part"))
                os.replace(kept.with_name(kept.name + ".part"), kept)
            except OSError as exc:
                with contextlib.suppress(OSError):
                    kept.with_name(kept.name + ".part").unlink()
                self._turn_off(f"cannot write {kept}: {exc.strerror or exc}")
                return
            self.files.append(kept)
            wav = kept
        if self.player is None:
            self._tell_no_device()
            self.spoken += 1
            return
        with self._cond:
            if self._closing:
                return
            newer = self._pending
            if newer is not None and newer.t - item.t >= self.options.stale_after_s:
                self.cut += 1  # went stale while it was being synthesised
                return
            try:
                self._proc = subprocess.Popen(
                    [*self.player, str(wav)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
                )
            except OSError as exc:
                self._player_failed(str(exc))
                return
            proc = self._proc
        _, err = proc.communicate()
        if proc.returncode == 0:
            self.spoken += 1
        elif proc.returncode > 0:  # a negative code is our own terminate(): a cut, already counted
            self._player_failed(err.decode("utf-8", "replace").strip()[-200:])

    def _player_failed(self, detail: str) -> None:
        self._no_device_reason = f"{self.player[0] if self.player else 'player'} failed: {detail or 'no detail'}"
        self.player = None
        if self.audio_dir is None:
            self.audio_dir = DEFAULT_AUDIO_DIR
        self._tell_no_device()

    def _tell_no_device(self) -> None:
        if not self._told_no_device:
            self._told_no_device = True
            self._say_message(
                f"speech: {self._no_device_reason}; writing spoken replies as WAV files to {self.audio_dir}/"
            )
