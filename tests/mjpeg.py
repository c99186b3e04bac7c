"""A local MJPEG-over-HTTP camera for capture tests: a source that can be killed and brought back on its port."""

from __future__ import annotations

import http.server
import socketserver
import threading
import time

import cv2
import numpy as np


class MjpegServer:
    """An MJPEG-over-HTTP camera (multipart/x-mixed-replace) that can be killed and brought back on its port."""

    def __init__(self, port: int, fps: float = 25.0):
        self.port, self.fps = port, fps
        self.running = False
        self._srv = None

    def start(self) -> "MjpegServer":
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                i = 0
                try:
                    while outer.running:
                        ok, buf = cv2.imencode(".jpg", np.full((48, 64, 3), (i * 9) % 256, np.uint8))
                        data = buf.tobytes()
                        self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % len(data))
                        self.wfile.write(data + b"\r\n")
                        i += 1
                        time.sleep(1 / outer.fps)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
            daemon_threads = True
            allow_reuse_address = True

        self.running = True
        self._srv = Server(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._srv.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.running = False
        if self._srv is not None:
            self._srv.shutdown()
            self._srv.server_close()
            self._srv = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/stream.mjpg"
