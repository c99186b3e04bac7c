"""Work in a fresh interpreter, for work whose memory must go back to the system when it ends (exporting a 3B
graph) or whose peak RSS must be its own (a bundle measured by `compare`, a job of `bench`).

``call(fn, *args)`` pickles ``fn`` (a module-level function, or a method of a picklable object) and its arguments,
runs ``python -m edge_duet.isolate IN OUT`` and returns the result, or raises the exception the child raised.
``Worker(factory, *args)`` keeps one child alive: the child builds ``factory(*args)`` once and answers method calls
on it (``worker.call("turn", 3)``) until ``close()``, which returns the child's peak RSS. Wire: pickles, each
preceded by its length (8 bytes, big-endian), over the child's stdin/stdout; the child's stdout is moved to its
stderr, so what libraries print cannot corrupt the protocol. A child started from another interpreter (``argv``:
e.g. a peer library's own venv) speaks the same wire.

A subprocess rather than multiprocessing: spawn re-imports the caller's main module, which breaks scripts without
a ``__main__`` guard. Only functions and classes the caller names run: nothing is looked up from a string.
"""

from __future__ import annotations

import os
import pickle
import struct
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import IO, Any, Callable, Sequence

from .errors import ChildFailed, EdgeDuetError


def call(fn: Callable, *args: Any, what: str = "the worker", quiet: bool = True) -> Any:
    with tempfile.TemporaryDirectory(prefix="edge-duet-child-") as tmp:
        src, dst = Path(tmp) / "in.pkl", Path(tmp) / "out.pkl"
        src.write_bytes(pickle.dumps((fn, args)))
        proc = subprocess.run([sys.executable, "-m", "edge_duet.isolate", str(src), str(dst)],
                              stdout=subprocess.DEVNULL if quiet else None, stderr=subprocess.PIPE, text=True)
        if dst.is_file():
            ok, result = pickle.loads(dst.read_bytes())
            if not ok:
                raise result
            return result
        hint = " (killed: out of memory?)" if proc.returncode in (-9, 137) else ""
        raise ChildFailed(f"{what} failed in its child process (exit {proc.returncode}{hint}): "
                          f"{proc.stderr.strip()[-2000:]}")


def send(stream: IO[bytes], obj: Any) -> None:
    data = pickle.dumps(obj)
    stream.write(struct.pack(">Q", len(data)) + data)
    stream.flush()


def receive(stream: IO[bytes]) -> Any:
    """The next pickle on ``stream``; EOFError when the other side is gone."""
    head = stream.read(8)
    if len(head) < 8:
        raise EOFError("the other process closed the pipe")
    n = struct.unpack(">Q", head)[0]
    data = stream.read(n)
    if len(data) < n:
        raise EOFError("the other process closed the pipe mid-message")
    return pickle.loads(data)


def peak_rss_bytes() -> int | None:
    """This process's peak resident memory (Linux: VmHWM starts afresh at exec, unlike ru_maxrss)."""
    status = Path("/proc/self/status")
    lines = status.read_text().splitlines() if status.exists() else []
    hwm = [ln.split()[1] for ln in lines if ln.startswith("VmHWM:")]
    return int(hwm[0]) * 1024 if hwm else None  # kB


class Worker:
    """One long-lived child holding ``factory(*args)``. ``info``: the object's ``info`` attribute (or None).
    Raises :class:`ChildFailed` when the child dies, the child's own exception when a call raised there (the
    child then ends). ``argv``: the child's command line (default: this interpreter, ``-m edge_duet.isolate
    --serve``); a foreign child receives ``args[0]`` as its first message instead of ``(factory, args)``."""

    def __init__(self, factory: Callable | None, *args: Any, what: str = "the worker",
                 argv: Sequence[str] | None = None, env: dict | None = None):
        self.what = what
        cmd = list(argv) if argv else [sys.executable, "-m", "edge_duet.isolate", "--serve"]
        try:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        except OSError as exc:
            raise ChildFailed(f"{what}: cannot start {cmd[0]}: {exc}") from exc
        self.info = self._ask((factory, args) if not argv else args[0])

    def call(self, method: str, *args: Any) -> Any:
        return self._ask((method, args))

    def _ask(self, msg: Any) -> Any:
        try:
            send(self.proc.stdin, msg)
            ok, result = receive(self.proc.stdout)
        except (EOFError, OSError) as exc:
            code = self.proc.wait()
            hint = " (killed: out of memory?)" if code in (-9, 137) else ""
            raise ChildFailed(f"{self.what} died (exit {code}{hint}; its messages are above)") from exc
        if not ok:
            self.proc.wait(timeout=60)
            raise result
        return result

    def close(self) -> int | None:
        """End the child; its peak RSS in bytes (None if it was already gone)."""
        peak = None
        if self.proc.poll() is None:
            try:
                peak = self._ask(None)
            except (ChildFailed, EdgeDuetError):
                pass
        for pipe in (self.proc.stdin, self.proc.stdout):
            try:
                pipe.close()
            except OSError:
                pass
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return peak

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _answer(exc: BaseException) -> tuple[bool, BaseException]:
    try:
        pickle.dumps(exc)
        return False, exc
    except Exception:
        return False, ChildFailed(f"{type(exc).__name__}: {exc}")


def _serve() -> None:
    """The child of :class:`Worker`: build the object, answer calls until ``None`` (then the peak RSS)."""
    stdin, stdout = sys.stdin.buffer, os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # whatever libraries print goes to stderr; stdout carries only the protocol
    obj = None
    first = True
    while True:
        try:
            msg = receive(stdin)
        except EOFError:
            return
        if msg is None:
            send(stdout, (True, peak_rss_bytes()))
            return
        try:
            if first:
                factory, args = msg
                obj = factory(*args)
                out = (True, getattr(obj, "info", None))
                first = False
            else:
                method, args = msg
                out = (True, getattr(obj, method)(*args))
        except BaseException as exc:  # handed to the parent, which re-raises it
            send(stdout, _answer(exc))
            return
        send(stdout, out)


def _main(argv: list[str]) -> None:
    src, dst = Path(argv[0]), Path(argv[1])
    fn, args = pickle.loads(src.read_bytes())
    try:
        out = (True, fn(*args))
    except BaseException as exc:  # handed to the parent, which re-raises it
        out = _answer(exc)
    dst.write_bytes(pickle.dumps(out))


if __name__ == "__main__":
    _serve() if sys.argv[1:] == ["--serve"] else _main(sys.argv[1:])
