#!/usr/bin/env python3
"""A misbehaving registry front for tests/oci_faults.rs, in front of a registry (or of
oci_token_proxy.py): faults on blob GETs, and blob GETs redirected to another host.

usage: oci_fault_proxy.py PORT UPSTREAM [--fault KIND --times N]
                          [--side-port P --blob-origin HOST]

- Every request is forwarded to UPSTREAM with its Authorization, Range and Accept; the answer
  comes back with its status, body, and Content-Type, Content-Range, Docker-Content-Digest and
  WWW-Authenticate (so a token flow behind it works).
- --fault KIND --times N: each distinct blob GET (digest and Range) gets KIND its first N
  times, then is forwarded. KIND is one of:
    reset  the head and half the body, then a TCP reset;
    500    500 Internal Server Error;
    503    503 with no Retry-After;
    429    429 Too Many Requests with `Retry-After: 1`;
    stall  the head and 4 KiB of the body, then nothing for 20 s.
  Prints "fault KIND" per fault, and per retry of a faulted GET that is forwarded
  "retry after S.SS s" (the time since its last fault).
- --side-port P --blob-origin HOST: every blob GET is answered `307` to
  http://127.0.0.1:P/v2/<repo>/blobs/<digest>?X-Amz-Signature=test, a second server (a
  presigned object-storage URL) that serves it from HOST (a registry asked anonymously) and
  prints "side got Authorization" or "side got no Authorization" per request.
Lines are flushed as printed.
"""
import http.client
import http.server
import socket
import struct
import sys
import threading
import time

args = sys.argv[1:]
PORT, UPSTREAM = int(args[0]), args[1]
opts = {}
i = 2
while i < len(args):
    opts[args[i].lstrip("-")] = args[i + 1]
    i += 2
FAULT = opts.get("fault")
TIMES = int(opts.get("times", "1"))
SIDE_PORT = int(opts["side-port"]) if "side-port" in opts else None
BLOB_ORIGIN = opts.get("blob-origin")
KEEP = ("content-type", "content-range", "docker-content-digest", "www-authenticate",
        "retry-after")
lock = threading.Lock()
# (path, range) -> [faults so far, time of the last, retry said]
faulted = {}


def say(line):
    with lock:
        print(line, flush=True)


def forward(host, method, path, headers):
    conn = http.client.HTTPConnection(host, timeout=60)
    conn.request(method, path, headers=headers)
    r = conn.getresponse()
    try:
        body = r.read()
    except http.client.IncompleteRead as e:
        # distribution answers a 416 with the blob's Content-Length and a short message.
        body = e.partial
    hdrs = [(k, v) for k, v in r.getheaders() if k.lower() in KEEP]
    conn.close()
    return r.status, body, hdrs


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def answer(self, status, body=b"", headers=()):
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def pass_on(self, host):
        fwd = {k: self.headers[k] for k in ("Authorization", "Range", "Accept")
               if self.headers.get(k)}
        return forward(host, self.command, self.path.split("?")[0] if host == BLOB_ORIGIN
                       else self.path, fwd)

    def fault(self, key):
        """Whether this GET is faulted, and the fault done if so."""
        with lock:
            seen = faulted.setdefault(key, [0, 0.0, False])
            if seen[0] >= TIMES:
                if not seen[2]:
                    print(f"retry after {time.monotonic() - seen[1]:.2f} s", flush=True)
                    seen[2] = True
                return False
            seen[0] += 1
            seen[1] = time.monotonic()
        say(f"fault {FAULT}")
        if FAULT in ("500", "503"):
            self.answer(int(FAULT), b"registry trouble")
        elif FAULT == "429":
            self.answer(429, b'{"errors":[{"code":"TOOMANYREQUESTS"}]}', [("Retry-After", "1")])
        else:
            status, body, hdrs = self.pass_on(UPSTREAM)
            self.send_response(status)
            for k, v in hdrs:
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if FAULT == "stall":
                self.wfile.write(body[:4096])
                self.wfile.flush()
                time.sleep(20)
            else:
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                # SO_LINGER 0: close() sends a RST, not a FIN.
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                           struct.pack("ii", 1, 0))
            self.close_connection = True
            self.connection.close()
        return True

    def do_GET(self):
        blob = "/blobs/" in self.path
        if SIDE_PORT and blob:
            loc = f"http://127.0.0.1:{SIDE_PORT}{self.path}?X-Amz-Signature=test"
            return self.answer(307, b"", [("Location", loc)])
        if blob and FAULT and self.fault((self.path, self.headers.get("Range"))):
            return
        self.answer(*self.pass_on(UPSTREAM))

    do_HEAD = do_GET


class Side(Handler):
    def do_GET(self):
        got = "got" if self.headers.get("Authorization") else "got no"
        say(f"side {got} Authorization")
        self.answer(*self.pass_on(BLOB_ORIGIN))

    do_HEAD = do_GET


http.server.ThreadingHTTPServer.allow_reuse_address = True
http.server.ThreadingHTTPServer.daemon_threads = True
if SIDE_PORT:
    side = http.server.ThreadingHTTPServer(("127.0.0.1", SIDE_PORT), Side)
    threading.Thread(target=side.serve_forever, daemon=True).start()
srv = http.server.ThreadingHTTPServer(("127.0.0.1", PORT), Handler)
say("listening")
srv.serve_forever()
