"""A local HTTP server for released-format files (tests only, 127.0.0.1)."""

from __future__ import annotations

import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class ReleaseServer:
    """Serves `files` ({name: bytes}) with HTTP Range support.

    `cut_next[name] = n` makes the next response for `name` stop after n
    body bytes (the connection drops mid-download). `seconds_per_chunk`
    makes it slow: the body goes out in 64 KiB pieces with that pause
    before each. `requests` records every (path, Range header) received.
    """

    CHUNK = 64 * 1024

    def __init__(self, files: dict[str, bytes]):
        self.files = dict(files)
        self.cut_next: dict[str, int] = {}
        self.seconds_per_chunk = 0.0
        self.requests: list[tuple[str, str | None]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                name = self.path.lstrip("/")
                server.requests.append((name, self.headers.get("Range")))
                if name not in server.files:
                    self.send_error(404)
                    return
                data = server.files[name]
                start, status = 0, 200
                match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
                if match:
                    start, status = int(match.group(1)), 206
                    if start >= len(data):
                        self.send_error(416)
                        return
                body = data[start:]
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                if status == 206:
                    self.send_header(
                        "Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}"
                    )
                self.end_headers()
                cut = server.cut_next.pop(name, None)
                body = body if cut is None else body[:cut]
                try:
                    for start in range(0, len(body), server.CHUNK):
                        time.sleep(server.seconds_per_chunk)
                        self.wfile.write(body[start:start + server.CHUNK])
                except (BrokenPipeError, ConnectionResetError):
                    return  # the client went away (e.g. it was killed)
                if cut is not None:
                    self.close_connection = True

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/"

    def __enter__(self) -> "ReleaseServer":
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._httpd.shutdown()
        self._httpd.server_close()
