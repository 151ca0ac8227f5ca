#!/usr/bin/env python3
"""A registry front for tests/oci.rs: the Bearer token flow and misbehaviours a real registry
or a pull-through cache may show, in front of a plain `docker-registry`.

usage: oci_token_proxy.py PORT UPSTREAM [--user U --password P] [--expire-after N]
       [--token-life SECS] [--range-200]

- With --user, every /v2/ request needs `Authorization: Bearer <token>`; without one it is
  answered 401 with `WWW-Authenticate: Bearer realm="http://127.0.0.1:PORT/token",
  service="wan-test",scope="repository:<repo>:pull"`. GET /token with HTTP Basic U:P answers
  {"token": …}; anything else 401.
- --expire-after N: after N blob GETs, every token issued so far expires (a 401 mid-read).
- --token-life SECS: tokens are issued with `expires_in: SECS` and refused once that long has
  passed since they were issued ("refused an expired token" is printed for each).
- --range-200: a ranged blob GET is answered 200 with the whole blob.
Prints one line per token issued and per 200-for-range to stdout (flushed).
"""
import base64
import http.client
import http.server
import json
import sys
import threading
import time
import urllib.error
import urllib.request

args = sys.argv[1:]
PORT, UPSTREAM = int(args[0]), args[1]
opts = {}
i = 2
while i < len(args):
    if args[i] == "--range-200":
        opts["range200"] = True
        i += 1
    else:
        opts[args[i].lstrip("-")] = args[i + 1]
        i += 2
USER, PASS = opts.get("user"), opts.get("password")
EXPIRE_AFTER = int(opts.get("expire-after", "0"))
TOKEN_LIFE = int(opts.get("token-life", "0"))
lock = threading.Lock()
# token -> when it was issued (time.monotonic())
state = {"tokens": {}, "issued": 0, "blobs": 0, "expired": False}


def say(line):
    print(line, flush=True)


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
        self.wfile.write(body)

    def do_GET(self):
        if self.path.startswith("/token"):
            want = "Basic " + base64.b64encode(f"{USER}:{PASS}".encode()).decode()
            if self.headers.get("Authorization") != want:
                return self.answer(401, b'{"errors":[{"code":"UNAUTHORIZED"}]}')
            with lock:
                state["issued"] += 1
                tok = f"tok-{state['issued']}"
                state["tokens"][tok] = time.monotonic()
            say(f"issued token {state['issued']}")
            life = TOKEN_LIFE or 300
            return self.answer(200, json.dumps({"token": tok, "expires_in": life}).encode(),
                               [("Content-Type", "application/json")])
        blob = "/blobs/" in self.path
        if USER is not None:
            got = self.headers.get("Authorization", "")
            with lock:
                if blob:
                    state["blobs"] += 1
                    if EXPIRE_AFTER and state["blobs"] > EXPIRE_AFTER and not state["expired"]:
                        state["expired"] = True
                        state["tokens"].clear()
                        say("tokens expired")
                ok = got.startswith("Bearer ") and got[7:] in state["tokens"]
                if ok and TOKEN_LIFE and time.monotonic() - state["tokens"][got[7:]] > TOKEN_LIFE:
                    ok = False
                    say("refused an expired token")
            if not ok:
                repo = self.path[len("/v2/"):].split("/manifests/")[0].split("/blobs/")[0]
                chal = (f'Bearer realm="http://127.0.0.1:{PORT}/token",service="wan-test",'
                        f'scope="repository:{repo}:pull"')
                return self.answer(401, b'{"errors":[{"code":"UNAUTHORIZED"}]}',
                                   [("WWW-Authenticate", chal)])
        req = urllib.request.Request(f"http://{UPSTREAM}{self.path}")
        rng = self.headers.get("Range")
        whole = blob and rng and opts.get("range200")
        if rng and not whole:
            req.add_header("Range", rng)
        if self.headers.get("Accept"):
            req.add_header("Accept", self.headers["Accept"])
        try:
            with urllib.request.urlopen(req) as r:
                status, body, hdrs = r.status, r.read(), r.headers
        except urllib.error.HTTPError as e:
            status, hdrs = e.code, e.headers
            try:
                body = e.read()
            except http.client.IncompleteRead as short:
                # distribution answers a 416 with the blob's Content-Length and a short
                # message.
                body = short.partial
        if whole:
            say("answered 200 to a range")
        keep = [(k, v) for k, v in hdrs.items()
                if k.lower() in ("content-type", "docker-content-digest", "content-range")]
        self.answer(status, body, keep)


http.server.ThreadingHTTPServer.allow_reuse_address = True
srv = http.server.ThreadingHTTPServer(("127.0.0.1", PORT), Handler)
say("listening")
srv.serve_forever()
