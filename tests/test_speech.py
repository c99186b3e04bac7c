"""Speech: real synthesis to WAV (duration, not silence), the no-audio-device path, newest-wins and cutting."""

from __future__ import annotations

import shutil
import sys
import time
import wave
from pathlib import Path

import numpy as np
import pytest

from edge_duet.errors import UsageError
from edge_duet.runtime.speech import Speaker, SpeechOptions, find_player, resolve_engine, synthesize

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed (apt install espeak-ng)")


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    with wave.open(str(path)) as w:
        assert w.getsampwidth() == 2
        data = np.frombuffer(w.readframes(w.getnframes()), np.int16)
        return data.reshape(-1, w.getnchannels())[:, 0], w.getframerate()


def wait_for(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.02)
    return cond()


@needs_espeak
def test_espeak_synthesises_audible_speech(tmp_path):
    short, rate = read_wav(synthesize("Hi.", tmp_path / "a.wav", SpeechOptions()))
    long, _ = read_wav(synthesize("A red circle appeared in the top left corner and a blue square is moving.",
                                  tmp_path / "b.wav", SpeechOptions()))
    assert rate >= 8000
    assert 1.5 < len(long) / rate < 15.0
    assert len(long) > 2 * len(short)  # duration follows the text
    rms = np.sqrt(np.mean(long.astype(np.float64) ** 2))
    assert rms > 300  # not silence (int16 full scale is 32767)
    assert np.mean(np.abs(long) > 1000) > 0.05


@needs_espeak
def test_espeak_voice_and_text_starting_with_a_dash(tmp_path):
    data, rate = read_wav(synthesize("-5 degrees outside", tmp_path / "c.wav", SpeechOptions(voice="en-us")))
    assert len(data) / rate > 0.5


def test_resolve_engine_picks_piper_for_voice_files_and_fails_loudly():
    if shutil.which("espeak-ng"):
        assert resolve_engine("auto", None) == "espeak-ng"
        assert resolve_engine("auto", "en-us") == "espeak-ng"
    with pytest.raises(UsageError, match="SpeechOptions.engine"):
        resolve_engine("festival", None)
    with pytest.raises(UsageError, match="piper"):
        resolve_engine("auto", "/nonexistent/voice.onnx")  # a Piper voice was asked for: never a silent fallback


def test_missing_espeak_says_how_to_install(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(UsageError, match="apt install espeak-ng"):
        resolve_engine("espeak-ng", None)


def test_find_player_without_any_device(monkeypatch, tmp_path):
    monkeypatch.delenv("PULSE_SERVER", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))  # no pulse/pipewire socket in it
    import glob

    monkeypatch.setattr(glob, "glob", lambda pattern: [])
    player, why = find_player()
    assert player is None and "no audio device" in why


@needs_espeak
def test_no_audio_device_says_so_once_and_writes_wavs(tmp_path):
    messages = []
    spk = Speaker(SpeechOptions(audio_dir=tmp_path / "speech"), player=None, on_message=messages.append)
    try:
        spk.say("The red circle turned green.", t=13.0, turn=6)
        assert wait_for(lambda: spk.spoken == 1)
        spk.say("A yellow triangle appeared.", t=16.0, turn=8)
        assert wait_for(lambda: spk.spoken == 2)
    finally:
        spk.close()
    assert len(messages) == 1 and "WAV" in messages[0] and str(tmp_path / "speech") in messages[0]
    files = sorted((tmp_path / "speech").glob("*.wav"))
    assert [f.name for f in files] == ["turn00006_t00013.0s.wav", "turn00008_t00016.0s.wav"]
    for f in files:
        data, rate = read_wav(f)
        assert len(data) / rate > 0.5 and np.abs(data).max() > 1000


def _fake_player(tmp_path: Path, seconds: float) -> list[str]:
    """A 'player' that takes ``seconds`` per file and logs what it played."""
    script = tmp_path / "player.py"
    script.write_text(
        "import sys, time\n"
        f"open({str(tmp_path / 'played.log')!r}, 'a').write(sys.argv[1] + '\\n')\n"
        f"time.sleep({seconds})\n"
    )
    return [sys.executable, str(script)]


@needs_espeak
def test_say_never_blocks_and_newer_replies_win(tmp_path):
    spk = Speaker(SpeechOptions(audio_dir=tmp_path / "wav", stale_after_s=100.0), player=_fake_player(tmp_path, 1.0))
    try:
        spk.say("reply number 0", t=0.0, turn=0)
        assert wait_for(lambda: (tmp_path / "played.log").exists())
        t0 = time.monotonic()
        for i in range(1, 6):
            spk.say(f"reply number {i}", t=float(i), turn=i)
        assert time.monotonic() - t0 < 0.1  # the model loop is never held up
        assert wait_for(lambda: spk.spoken == 2, 15)
    finally:
        spk.close()
    played = (tmp_path / "played.log").read_text().split()
    assert len(played) == 2
    assert played[0].endswith("turn00000_t00000.0s.wav")
    assert played[1].endswith("turn00005_t00005.0s.wav")  # the newest; 1-4 went stale while waiting
    assert spk.dropped == 4


@needs_espeak
def test_a_much_newer_reply_cuts_the_one_being_spoken(tmp_path):
    spk = Speaker(SpeechOptions(stale_after_s=3.0), player=_fake_player(tmp_path, 30.0))
    try:
        spk.say("the first thing", t=1.0, turn=0)
        assert wait_for(lambda: (tmp_path / "played.log").exists())
        spk.say("a close follow-up", t=2.0, turn=1)  # 1 s later in the video: not stale, waits
        time.sleep(0.2)
        assert spk.cut == 0
        t0 = time.monotonic()
        spk.say("something much later", t=9.0, turn=4)  # 8 s later: the current one is cut
        assert wait_for(lambda: spk.cut == 1, 5)
        assert wait_for(lambda: len((tmp_path / "played.log").read_text().split()) == 2, 10)
        assert time.monotonic() - t0 < 10  # did not wait for the 30 s utterance
    finally:
        spk.close(timeout=5)
    assert spk.dropped == 1  # "a close follow-up" was replaced while pending


def test_engine_none_is_silent(tmp_path):
    spk = Speaker(SpeechOptions(engine="none", audio_dir=tmp_path), player=None, on_message=lambda m: None)
    spk.say("nothing to hear")
    time.sleep(0.1)
    spk.close()
    assert spk.spoken == 0 and not list(tmp_path.glob("*.wav"))


def test_failing_engine_reports_once_and_never_raises(tmp_path, monkeypatch):
    messages = []
    spk = Speaker(SpeechOptions(engine="piper", voice=str(tmp_path / "missing.onnx")), player=None,
                  on_message=messages.append)
    monkeypatch.setattr("edge_duet.runtime.speech._piper_command", lambda: None)
    try:
        spk.say("one", t=0.0)
        assert wait_for(lambda: spk.failed == 1)
        spk.say("two", t=5.0)
        assert wait_for(lambda: spk.failed == 2)
    finally:
        spk.close()
    assert len(messages) == 1 and "replies stay on screen" in messages[0]


def test_piper_synthesises_with_a_voice_file(tmp_path):
    import os

    voice = os.environ.get("EDGE_DUET_TEST_PIPER_VOICE")
    if not voice:
        pytest.skip("set EDGE_DUET_TEST_PIPER_VOICE=/path/voice.onnx (with piper-tts installed) to test Piper")
    engine = resolve_engine("auto", voice)
    data, rate = read_wav(synthesize("Hello from Piper.", tmp_path / "p.wav", SpeechOptions(engine=engine, voice=voice)))
    assert len(data) / rate > 0.5 and np.abs(data).max() > 1000


@needs_espeak
def test_interrupt_silences_at_once_and_ends_a_finishing_close(tmp_path):
    import threading

    spk = Speaker(SpeechOptions(), player=_fake_player(tmp_path, 30.0))
    spk.say("a long story", t=0.0)
    assert wait_for(lambda: (tmp_path / "played.log").exists())
    spk.say("and then", t=1.0)
    threading.Timer(0.3, spk.interrupt).start()  # Ctrl-C while the run waits for the last words
    t0 = time.monotonic()
    spk.close(finish=True, timeout=20)
    assert time.monotonic() - t0 < 5
    assert spk.cut == 1 and spk.dropped == 1
