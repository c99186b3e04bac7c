"""A new user's first hour, as a sweep of bad input: every case ends in its exit code and a one-line message that
says what to do, never a traceback, and nothing the user already had is lost or half-written.

The CLI runs in a subprocess (what a user sees, stderr included, thread tracebacks too), on the bundled demo model
and generated videos: no camera, no GPU, no network."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_duet.apps.common import default_model_dir
from edge_duet.errors import BundleError, InputError, MissingExtraError, SourceError, UsageError

UNWRITABLE = Path("/proc/edge-duet-no-such-dir")  # not even root may create a folder here


def edge_duet(*args: str, cwd: Path, block: tuple[str, ...] = (), timeout: float = 180) -> subprocess.CompletedProcess:
    """`edge-duet ARGS` in a fresh interpreter; ``block`` makes those modules unimportable (a runtime-only install)."""
    code = ("import sys\n"
            f"for m in {list(block)!r}: sys.modules[m] = None\n"
            "from edge_duet.apps.cli import main\n"
            "sys.argv = ['edge-duet', *sys.argv[1:]]\n"
            "main()\n")
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout)


def assert_fails(proc: subprocess.CompletedProcess, code: int, *phrases: str) -> str:
    """Exit ``code``, an ``error:`` line holding every phrase, no traceback; returns that line."""
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.returncode == code, (proc.returncode, proc.stderr[-2000:])
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1, proc.stderr
    for phrase in phrases:
        assert phrase in errors[0], errors[0]
    return errors[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def write_video(path: Path, frames: int = 60, size: int = 96) -> Path:
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10, (size, size))
    for i in range(frames):
        img = np.full((size, size, 3), 128, np.uint8)
        cv2.circle(img, (10 + i, size // 2), size // 6, (40, 40, 225), -1)
        w.write(img)
    w.release()
    return path


@pytest.fixture
def home(tmp_path) -> Path:
    """A user's folder holding things they care about."""
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "old-run.jsonl").write_text('{"kept": true}\n')
    (tmp_path / "notes.txt").write_text("my notes\n")
    return tmp_path


@pytest.fixture
def examples(home) -> Path:
    """A one-example frame-input file (infer's input)."""
    from PIL import Image

    for i in range(2):
        Image.new("RGB", (64, 64), (40 * i, 100, 200)).save(home / f"f{i}.png")
    data = [{"question_id": "q0", "conversation": [
        {"role": "user", "content": [{"type": "image", "image": "f0.png"}, {"type": "image", "image": "f1.png"},
                                     {"type": "text", "text": "What is there?"}], "time": 2.0}]}]
    path = home / "examples.json"
    path.write_text(json.dumps(data))
    return path


# ------------------------------------------------------------------ output paths: checked first, nothing lost
@pytest.mark.parametrize("flag, target, phrase", [
    ("--events", "results", "is a folder; it needs a file name"),
    ("--events", "notes.txt/events.jsonl", "notes.txt is a file, not a folder"),
    ("--events", str(UNWRITABLE / "events.jsonl"), "cannot write in"),
    ("--audio-dir", "notes.txt", "is a file; it needs a folder"),
    ("--audio-dir", str(UNWRITABLE / "wavs"), "cannot write in"),
])
def test_run_output_paths_are_checked_before_the_run(home, flag, target, phrase):
    before = snapshot(home)
    extra = ["--speak"] if flag == "--audio-dir" else []
    proc = edge_duet("run", "--demo", "--fast", flag, target, *extra, cwd=home)
    assert_fails(proc, UsageError.exit_code, flag, phrase)
    assert "assistant:" not in proc.stdout  # refused before the model ran
    assert snapshot(home) == before


def test_a_checked_output_path_leaves_no_folder_behind_when_the_run_fails_later(home):
    before = snapshot(home)
    proc = edge_duet("run", "--video", "missing.mp4", "--events", "new/deeper/e.jsonl", "--audio-dir", "wavs", cwd=home)
    assert_fails(proc, SourceError.exit_code, "no video file")
    assert not (home / "new").exists() and not (home / "wavs").exists()
    assert snapshot(home) == before


def test_infer_output_is_checked_first_and_a_failed_infer_keeps_the_old_file(home, examples):
    before = snapshot(home)
    assert_fails(edge_duet("infer", str(examples), "-o", "results", cwd=home), UsageError.exit_code, "is a folder")
    assert_fails(edge_duet("infer", str(examples), "-o", str(UNWRITABLE / "p.jsonl"), cwd=home),
                 UsageError.exit_code, "cannot write in")
    # an image that breaks mid-run: the previous predictions stay, no 0-byte or .part file beside them
    (home / "f1.png").write_bytes(b"not a png")
    proc = edge_duet("infer", str(examples), "-o", "results/old-run.jsonl", cwd=home)
    assert_fails(proc, InputError.exit_code, "cannot read image")
    assert snapshot(home)["results/old-run.jsonl"] == before["results/old-run.jsonl"]
    assert sorted(p.name for p in (home / "results").iterdir()) == ["old-run.jsonl"]


def test_infer_writes_its_output_whole(home, examples):
    proc = edge_duet("infer", str(examples), "-o", "results/new/pred.jsonl", cwd=home)
    assert proc.returncode == 0, proc.stderr
    lines = (home / "results/new/pred.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["question_id"] == "q0"
    assert [p.name for p in (home / "results/new").iterdir()] == ["pred.jsonl"]


def test_eval_and_make_benchmark_outputs_are_checked_first(home):
    (home / "gold.json").write_text("[]")
    (home / "pred.jsonl").write_text("")
    assert_fails(edge_duet("eval", "gold.json", "pred.jsonl", "--json", "results", cwd=home),
                 UsageError.exit_code, "--json", "is a folder")
    assert_fails(edge_duet("make-benchmark", "notes.txt", "--examples", "1", cwd=home),
                 UsageError.exit_code, "is a file; it needs a folder")
    assert (home / "notes.txt").read_text() == "my notes\n"


# ------------------------------------------------------------------ speech: reported once, the run goes on
def test_speech_that_cannot_write_its_wav_turns_off_once_without_a_thread_traceback(tmp_path, monkeypatch):
    from edge_duet.runtime import speech

    def fake_synthesize(text, out_path, options):
        Path(out_path).write_bytes(b"RIFF" + bytes(100))
        return Path(out_path)

    monkeypatch.setattr(speech, "synthesize", fake_synthesize)
    crashes: list = []
    monkeypatch.setattr(threading, "excepthook", crashes.append)
    messages: list[str] = []
    wavs = tmp_path / "wavs"
    speaker = speech.Speaker(speech.SpeechOptions(audio_dir=wavs), player=None, on_message=messages.append)
    speaker.say("first", t=1.0, turn=0)
    for _ in range(200):
        if speaker.files:
            break
        threading.Event().wait(0.02)
    assert [p.name for p in speaker.files] == ["turn00000_t00001.0s.wav"]
    shutil.rmtree(wavs)
    wavs.write_text("the folder became a file")  # e.g. removed and replaced while the run goes on
    for i in range(1, 4):
        speaker.say(f"reply {i}", t=10.0 * i, turn=i)
        threading.Event().wait(0.1)
    speaker.close(timeout=10)
    assert crashes == []
    off = [m for m in messages if m.startswith("speech turned off")]
    assert len(off) == 1 and "cannot write" in off[0], messages
    assert speaker.failed == 1 and not list(tmp_path.glob("wavs*.part"))


# ------------------------------------------------------------------ missing extras: the extra, exit 9
@pytest.mark.parametrize("args, block, extra", [
    (["train-demo", "trained"], ("torch", "transformers"), "export"),
    (["make-checkpoint", "ckpt"], ("torch", "transformers"), "export"),
    (["serve", "--demo"], ("starlette", "uvicorn"), "serve"),
    (["eval", "gold.json", "pred.jsonl", "--plots", "plots"], ("matplotlib",), "plots"),
])
def test_a_command_without_its_extra_names_it(home, args, block, extra):
    (home / "gold.json").write_text("[]")
    (home / "pred.jsonl").write_text("")
    proc = edge_duet(*args, cwd=home, block=block)
    assert_fails(proc, MissingExtraError.exit_code, f'pip install "edge-duet[{extra}]"')


def test_export_without_torch_names_the_extra(home):
    pytest.importorskip("torch", reason="making the checkpoint to export needs the export extra")
    from edge_duet.export.checkpoint import make_checkpoint

    ckpt = make_checkpoint(home / "ckpt", "tiny", seed=0)
    proc = edge_duet("export", str(ckpt), "bundle", cwd=home, block=("torch", "transformers", "onnx", "onnxscript"))
    assert_fails(proc, MissingExtraError.exit_code, 'pip install "edge-duet[export]"')
    assert not (home / "bundle").exists()


def test_a_real_missing_module_is_not_dressed_up_as_an_extra():
    from edge_duet.apps.common import missing_extra

    assert missing_extra(ModuleNotFoundError("x", name="torch.nn"), "export") is not None
    assert missing_extra(ModuleNotFoundError("x", name="edge_duet.nothing"), "run") is None


# ------------------------------------------------------------------ sources and models
def test_camera_that_is_not_an_index_is_a_usage_error(home):
    assert_fails(edge_duet("run", "--camera", "abc", cwd=home), UsageError.exit_code, "device index", "--video")


def test_a_checkpoint_given_as_model_says_to_export_it_elsewhere(home):
    ckpt = home / "my-ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    line = assert_fails(edge_duet("run", "--video", "x.mp4", "--model", str(ckpt), cwd=home),
                        BundleError.exit_code, "Hugging Face checkpoint", "edge-duet export")
    assert f"edge-duet export {ckpt} {ckpt}`" not in line and f"{ckpt}-bundle" in line
    assert sorted(p.name for p in ckpt.iterdir()) == ["config.json"]


@pytest.mark.parametrize("damage, phrase", [
    ("newer", "version 99, made by a newer edge-duet"),
    ("manifest", "not JSON"),
    ("tokenizer", "tokenizer.json"),
    ("missing", "decoder.onnx"),
])
def test_a_damaged_bundle_is_a_bundle_error(home, damage, phrase):
    bundle = home / "bundle"
    shutil.copytree(default_model_dir(), bundle)
    write_video(home / "clip.mp4", frames=20)
    manifest = bundle / "manifest.json"
    if damage == "newer":  # made by a later edge-duet
        data = json.loads(manifest.read_text())
        data["format_version"] = 99
        manifest.write_text(json.dumps(data))
    elif damage == "manifest":
        manifest.write_text("{")
    elif damage == "tokenizer":
        (bundle / "tokenizer.json").write_text('{"version": "1.0", "trunc')
    else:
        (bundle / "decoder.onnx").unlink()
    proc = edge_duet("run", "--video", "clip.mp4", "--fast", "--model", str(bundle), cwd=home)
    assert_fails(proc, BundleError.exit_code, phrase)


def test_a_file_that_is_not_a_video(home):
    (home / "clip.mp4").write_text("this is not a video\n" * 200)
    proc = edge_duet("run", "--video", "clip.mp4", "--fast", cwd=home)
    assert_fails(proc, SourceError.exit_code, "cannot decode clip.mp4", "ffprobe clip.mp4")
    assert " @ 0x" not in proc.stderr  # no FFmpeg log lines


def test_a_folder_where_a_file_belongs(home):
    assert_fails(edge_duet("run", "--video", "results", "--fast", cwd=home), SourceError.exit_code, "results")
    assert_fails(edge_duet("infer", "results", "-o", "p.jsonl", cwd=home), InputError.exit_code, "is a folder")
    assert not (home / "p.jsonl").exists()


def test_a_truncated_video_is_one_clear_line(home):
    data = write_video(home / "full.mp4").read_bytes()
    (home / "cut.mp4").write_bytes(data[: len(data) // 2])  # a recording stopped before it was finished
    proc = edge_duet("run", "--video", "cut.mp4", "--fast", cwd=home)
    line = assert_fails(proc, SourceError.exit_code, "cut off", "ffprobe cut.mp4")
    assert "Convert it with `ffmpeg -i cut.mp4 out.mp4`" not in line  # what failed on this very file
    assert proc.stderr.count("\n") <= 2, proc.stderr


def test_damaged_frames_are_counted_once_and_agree_with_the_end_event(home):
    data = bytearray(write_video(home / "full.mp4", frames=80).read_bytes())
    mid = len(data) // 2
    data[mid:mid + 1000] = bytes(1000)
    (home / "damaged.mp4").write_bytes(bytes(data))
    proc = edge_duet("run", "--video", "damaged.mp4", "--fast", "--events", "e.jsonl", cwd=home)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert " @ 0x" not in proc.stderr, proc.stderr  # FFmpeg's own per-packet lines
    end = json.loads((home / "e.jsonl").read_text().splitlines()[-1])
    assert end["event"] == "end" and end["corrupt_frames"] > 0
    assert f"({end['corrupt_frames']} undecodable frame(s) skipped in all)" in proc.stderr


# ------------------------------------------------------------------ options the docs and the help show
def test_the_providers_example_of_run_help_is_accepted(home):
    proc = edge_duet("run", "--demo", "--fast", "--providers", "CUDAExecutionProvider,CPUExecutionProvider", cwd=home)
    assert "unknown provider" not in proc.stderr and "Traceback" not in proc.stderr
    assert proc.returncode in (0, 8), proc.stderr  # 8: this onnxruntime has no CUDA, said as such


def test_a_short_token_on_a_network_interface_is_refused(home, monkeypatch):
    pytest.importorskip("starlette", reason="serve needs the serve extra")
    proc = edge_duet("serve", "--demo", "--host", "0.0.0.0", "--token", "abc", cwd=home)
    assert_fails(proc, UsageError.exit_code, "at least 16")


def test_run_demo_fast_plays_the_whole_scene(home):
    proc = edge_duet("run", "--demo", "--fast", "--events", "e.jsonl", cwd=home, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "fast clock" in proc.stderr
    end = json.loads((home / "e.jsonl").read_text().splitlines()[-1])
    assert end["reason"] == "eof" and end["turns"] >= 10 and end["replies"] >= 3


def test_os_errors_without_a_check_are_one_line(monkeypatch):
    """A disk that fills up mid-write: the safety net of handle_errors, exit 1, no traceback."""
    import errno

    import typer
    from typer.testing import CliRunner

    from edge_duet.apps.common import handle_errors

    demo = typer.Typer()

    @demo.command()
    @handle_errors
    def write() -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/data/out.jsonl")

    result = CliRunner().invoke(demo, [])
    assert result.exit_code == 1 and not isinstance(result.exception, OSError)
    assert "error: /data/out.jsonl: No space left on device" in result.output


def test_make_checkpoint_never_replaces_what_it_should_not(home):
    pytest.importorskip("torch", reason="make-checkpoint needs the export extra")
    from edge_duet.errors import UsageError

    # a folder of the user's that is not a checkpoint: refused, untouched, nothing left beside it
    proc = edge_duet("make-checkpoint", "results", cwd=home)
    assert_fails(proc, UsageError.exit_code, "not a checkpoint")
    assert (home / "results" / "old-run.jsonl").read_text() == '{"kept": true}\n'
    assert not [p for p in home.iterdir() if p.name.startswith(".")]
    # a checkpoint: written whole, then replaced only with --overwrite
    assert edge_duet("make-checkpoint", "ckpt", cwd=home).returncode == 0
    config = (home / "ckpt" / "config.json").read_text()
    assert_fails(edge_duet("make-checkpoint", "ckpt", "--seed", "1", cwd=home), UsageError.exit_code, "--overwrite")
    assert (home / "ckpt" / "config.json").read_text() == config
    assert edge_duet("make-checkpoint", "ckpt", "--overwrite", "--flat-config", cwd=home).returncode == 0
    assert not (home / "ckpt" / "proactive.json").exists()  # replaced, not written over: no stale file left
    assert not [p for p in home.iterdir() if p.name.startswith(".")]  # no staging folder left behind


def test_every_kind_of_error_has_its_own_exit_code():
    import edge_duet.errors as errors

    kinds = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.EdgeDuetError)
             and "exit_code" in vars(c) and c.exit_code != 1]  # 1: the generic failure (base class, child failure)
    codes = [c.exit_code for c in kinds]
    assert len(codes) == len(set(codes)), sorted((c.exit_code, c.__name__) for c in kinds)
