"""Run one function in a fresh interpreter, for work whose memory must go back to the system when it ends
(exporting a 3B graph, measuring a bundle's own peak RSS).

``call(fn, *args)`` pickles ``fn`` (a module-level function, or a method of a picklable object) and its arguments,
runs ``python -m edge_duet.isolate IN OUT`` and returns the result, or raises the exception the child raised.
A subprocess rather than multiprocessing: spawn re-imports the caller's main module, which breaks scripts without
a ``__main__`` guard. Only functions the caller names run: nothing is looked up from a string.
"""

from __future__ import annotations

import pickle
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

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


def _main(argv: list[str]) -> None:
    src, dst = Path(argv[0]), Path(argv[1])
    fn, args = pickle.loads(src.read_bytes())
    try:
        out = (True, fn(*args))
    except BaseException as exc:  # handed to the parent, which re-raises it
        try:
            pickle.dumps(exc)
            out = (False, exc)
        except Exception:
            out = (False, ChildFailed(f"{type(exc).__name__}: {exc}"))
    dst.write_bytes(pickle.dumps(out))


if __name__ == "__main__":
    _main(sys.argv[1:])
