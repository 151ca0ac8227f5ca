#!/usr/bin/env python3
"""rangeserver.py - a small HTTP origin with Range support, for hosts without nginx.

    python3 benches/rangeserver.py DIR PORT     # serves DIR on 127.0.0.1:PORT until killed

GET and HEAD of files under DIR, `Range: bytes=a-b` answered 206 with Content-Range, keep-alive
(HTTP/1.1), one thread per connection. benches/gpu.sh uses it where ../shared/bench/origin.sh
(nginx) cannot be installed (a GPU host with no network).
"""
import http.server
import os
import re
import socketserver
import sys

ROOT = os.path.realpath(sys.argv[1])


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _file(self):
        path = os.path.realpath(os.path.join(ROOT, self.path.split("?")[0].lstrip("/")))
        if not path.startswith(ROOT + os.sep) or not os.path.isfile(path):
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        return path

    def _answer(self, body):
        path = self._file()
        if path is None:
            return
        size = os.path.getsize(path)
        start, end = 0, size - 1
        m = re.match(r"bytes=(\d+)-(\d*)$", self.headers.get("Range", ""))
        if m:
            start = int(m.group(1))
            end = min(int(m.group(2)) if m.group(2) else size - 1, size - 1)
            if start > end:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        if not body:
            return
        with open(path, "rb") as f:
            off, left = start, end - start + 1
            while left > 0:
                n = os.sendfile(self.wfile.fileno(), f.fileno(), off, left)
                if n == 0:
                    return
                off, left = off + n, left - n

    def do_GET(self):
        self.wfile.flush()
        self._answer(True)

    def do_HEAD(self):
        self._answer(False)


class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True


if __name__ == "__main__":
    Server(("127.0.0.1", int(sys.argv[2])), Handler).serve_forever()
