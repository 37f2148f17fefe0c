#!/usr/bin/env python3
"""Demo app for chatkit-gate: a tiny web app in plain Python (standard library only).

It stands for "your existing app" behind the gate. It owns its users and its session
cookie, and exposes the one thing the gate needs from it: an introspection endpoint.

    GET  /login               login form (the gate routes it as public)
    POST /login               checks the password, sets the `session` cookie
    POST /logout              forgets the session, clears the cookie
    GET  /api/auth/session    who is signed in: {"user": {...}} or 401 -- the gate calls this
    GET  /api/whoami          the identity headers the gate handed to the app
    GET  /                    page that mints and refreshes a ChatKit session through the gate
    GET  /app.js              the page's script
    GET  /healthz             liveness for the container probe

The app never talks to OpenAI and never sees an API key: the page calls
/api/chatkit/session and /api/chatkit/refresh, which the gate answers itself.
It trusts the x-auth-request-* identity headers only because it listens on loopback,
behind the gate, which strips any client-sent copies.

Run:  python3 examples/demo-app/app.py      (HOST=127.0.0.1, PORT=3000 by default)
Demo users: alice / wonderland (pro tier), bob / builder (free tier).
"""

from __future__ import annotations

import html
import json
import os
import secrets
import sys
import threading
import time
from http.cookies import CookieError, SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

COOKIE = "session"
SESSION_TTL = 8 * 3600
MAX_FORM = 16 * 1024
HEADER_PREFIX = os.environ.get("IDENTITY_HEADER_PREFIX", "x-auth-request-").lower()

USERS = {
    "alice": {
        "password": "wonderland",
        "user": {
            "id": "u_alice",
            "name": "Alice Liddell",
            "email": "alice@example.com",
            "subscription_tier": "pro",
            "org_id": "org_wonderland",
        },
    },
    "bob": {
        "password": "builder",
        "user": {
            "id": "u_bob",
            "name": "Bob Builder",
            "email": "bob@example.com",
            "subscription_tier": "free",
            "org_id": "org_acme",
        },
    },
}


class Sessions:
    """In-memory session store: random token -> (username, expiry)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._by_token = {}

    def create(self, username):
        token = secrets.token_urlsafe(32)
        with self._lock:
            self._by_token[token] = (username, time.time() + SESSION_TTL)
        return token

    def lookup(self, token):
        if not token:
            return None
        with self._lock:
            entry = self._by_token.get(token)
            if entry is None:
                return None
            username, expires = entry
            if expires < time.time():
                del self._by_token[token]
                return None
            return USERS[username]["user"]

    def delete(self, token):
        with self._lock:
            self._by_token.pop(token, None)


SESSIONS = Sessions()


def safe_redirect(target):
    """Only same-site relative paths: never an open redirect."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


LOGIN_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Sign in - chatkit-gate demo</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{{font-family:system-ui,sans-serif;max-width:28rem;margin:4rem auto;padding:0 1rem}}
label{{display:block;margin:.75rem 0}} input{{width:100%;padding:.4rem}}
button{{padding:.5rem 1.2rem}} .error{{color:#b00020}} .hint{{color:#555;font-size:.9rem}}
</style></head><body>
<h1>Sign in</h1>
{error}
<form method="post" action="/login">
  <input type="hidden" name="rd" value="{rd}">
  <label>User name <input name="username" autocomplete="username" required autofocus></label>
  <label>Password <input name="password" type="password" autocomplete="current-password"
    required></label>
  <button type="submit">Sign in</button>
</form>
<p class="hint">Demo users: <code>alice</code> / <code>wonderland</code> (pro tier),
<code>bob</code> / <code>builder</code> (free tier).</p>
</body></html>
"""

HOME_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>chatkit-gate demo</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{{font-family:system-ui,sans-serif;max-width:48rem;margin:2rem auto;padding:0 1rem}}
pre{{background:#f4f4f4;padding:.75rem;overflow:auto}} .warn{{color:#b00020}}
table{{border-collapse:collapse}} td{{border:1px solid #ddd;padding:.2rem .5rem}}
button{{padding:.4rem 1rem;margin-right:.5rem}}
</style></head><body>
<h1>chatkit-gate demo</h1>
{identity}
<h2>Identity headers the app received from the gate</h2>
<table>{headers}</table>
<h2>ChatKit session</h2>
<p>The page asks the gate for a ChatKit <code>client_secret</code>; the gate checks who you are,
applies its rate limits and calls OpenAI with its own key. The key never reaches this app or
the browser.</p>
<p><button id="mint">Mint session</button><button id="refresh" disabled>Refresh session</button></p>
<p id="status">Minting a session&hellip;</p>
<pre id="result"></pre>
<form method="post" action="/logout"><button type="submit">Sign out</button></form>
<script src="/app.js"></script>
</body></html>
"""

APP_JS = r"""// What a real front end does with the two gate endpoints. With chatkit-js this is
//   useChatKit({ api: { async getClientSecret(existing) { ... } } })
// where `existing` is the current secret when ChatKit asks for a refresh.
"use strict";
let secret = null;

function shorten(s) {
  return typeof s === "string" && s.length > 14 ? `${s.slice(0, 8)}...${s.slice(-4)}` : s;
}

async function call(path, body) {
  const started = Date.now();
  const res = await fetch(path, {
    method: "POST",
    credentials: "same-origin",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
  });
  let data = null;
  try { data = await res.json(); } catch (e) { data = null; }
  const lines = [`POST ${path} -> ${res.status} ${res.statusText} (${Date.now() - started} ms)`];
  for (const h of ["cache-control", "ratelimit-policy", "ratelimit", "retry-after", "x-request-id"]) {
    if (res.headers.get(h)) lines.push(`${h}: ${res.headers.get(h)}`);
  }
  if (data && data.client_secret) {
    secret = data.client_secret;
    const left = data.expires_at - Math.floor(Date.now() / 1000);
    lines.push("", `client_secret: ${shorten(data.client_secret)} (${data.client_secret.length} chars)`,
      `expires_at:    ${data.expires_at} (${new Date(data.expires_at * 1000).toISOString()}, in ${left} s)`);
    document.getElementById("refresh").disabled = false;
    document.getElementById("status").textContent =
      path.endsWith("refresh") ? "Session refreshed." : "Session minted.";
  } else {
    lines.push("", JSON.stringify(data));
    document.getElementById("status").textContent = `Failed: ${data && data.error ? data.error : res.status}`;
    if (res.status === 401) window.location.href = "/login?rd=%2F";
  }
  document.getElementById("result").textContent = lines.join("\n");
}

document.getElementById("mint").addEventListener("click", () => call("/api/chatkit/session", {}));
document.getElementById("refresh").addEventListener("click", () => call("/api/chatkit/refresh", { token: secret }));
call("/api/chatkit/session", {});
"""


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "demo-app/1"

    def log_message(self, format, *args):  # noqa: A002 - stdlib signature
        sys.stderr.write("demo-app: %s\n" % (format % args))

    # --- helpers -----------------------------------------------------------

    def cookie(self, name):
        raw = self.headers.get("Cookie")
        if not raw:
            return None
        jar = SimpleCookie()
        try:
            jar.load(raw)
        except CookieError:
            return None
        morsel = jar.get(name)
        return morsel.value if morsel else None

    def https(self):
        # The gate sets X-Forwarded-Proto; directly on loopback it is plain HTTP.
        return self.headers.get("X-Forwarded-Proto", "").lower() == "https"

    def session_cookie(self, value, max_age):
        parts = [f"{COOKIE}={value}", "Path=/", "HttpOnly", "SameSite=Lax", f"Max-Age={max_age}"]
        if self.https():
            parts.append("Secure")
        return "; ".join(parts)

    def read_body(self, limit=MAX_FORM):
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks, total = [], 0
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                total += size
                if total > limit:
                    return None
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        if length > limit:
            return None
        return self.rfile.read(length) if length else b""

    def send(self, status, body, content_type, headers=()):
        data = body.encode() if isinstance(body, str) else body
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Content-Type-Options", "nosniff")
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def send_json(self, status, obj, headers=()):
        self.send(status, json.dumps(obj), "application/json", headers)

    def send_html(self, status, page, headers=()):
        self.send(
            status,
            page,
            "text/html; charset=utf-8",
            (
                ("Cache-Control", "no-store"),
                ("Content-Security-Policy", "default-src 'self'; frame-ancestors 'none'"),
                *headers,
            ),
        )

    def redirect(self, location, headers=()):
        self.send(303, "", "text/plain", (("Location", location), *headers))

    # --- routes ------------------------------------------------------------

    def do_HEAD(self):
        self.do_GET()

    def do_GET(self):
        url = urlsplit(self.path)
        if url.path == "/healthz":
            self.send(200, "ok\n", "text/plain")
        elif url.path == "/api/auth/session":
            self.introspect()
        elif url.path == "/api/whoami":
            self.send_json(200, self.identity_headers())
        elif url.path == "/login":
            rd = safe_redirect(parse_qs(url.query).get("rd", ["/"])[0])
            self.send_html(200, LOGIN_PAGE.format(error="", rd=html.escape(rd)))
        elif url.path == "/app.js":
            self.send(200, APP_JS, "text/javascript; charset=utf-8",
                      (("Cache-Control", "no-cache"),))
        elif url.path == "/":
            self.home()
        else:
            self.send_json(404, {"error": "Not found"})

    def do_POST(self):
        url = urlsplit(self.path)
        body = self.read_body()
        if body is None:
            self.close_connection = True
            self.send_json(413, {"error": "Payload too large"}, (("Connection", "close"),))
        elif url.path == "/login":
            self.login(body)
        elif url.path == "/logout":
            self.logout()
        else:
            self.send_json(404, {"error": "Not found"})

    def introspect(self):
        """The endpoint the gate forwards cookies to: 200 with the user, or 401."""
        user = SESSIONS.lookup(self.cookie(COOKIE))
        if user is None:
            self.send_json(401, {"error": "Unauthorized"}, (("Cache-Control", "no-store"),))
            return
        # The gate may cache this answer for max-age seconds (capped by its cache_ttl).
        self.send_json(200, {"user": user}, (("Cache-Control", "private, max-age=30"),))

    def login(self, body):
        form = parse_qs(body.decode("utf-8", "replace"))
        username = form.get("username", [""])[0].strip().lower()
        password = form.get("password", [""])[0]
        rd = safe_redirect(form.get("rd", ["/"])[0])
        account = USERS.get(username)
        if account is None or not secrets.compare_digest(account["password"], password):
            error = '<p class="error">Wrong user name or password.</p>'
            self.send_html(401, LOGIN_PAGE.format(error=error, rd=html.escape(rd)))
            return
        token = SESSIONS.create(username)
        self.redirect(rd, (("Set-Cookie", self.session_cookie(token, SESSION_TTL)),))

    def logout(self):
        SESSIONS.delete(self.cookie(COOKIE))
        self.redirect("/login", (("Set-Cookie", self.session_cookie("", 0)),))

    def identity_headers(self):
        return {
            name.lower()[len(HEADER_PREFIX):]: value
            for name, value in self.headers.items()
            if name.lower().startswith(HEADER_PREFIX)
        }

    def home(self):
        ident = self.identity_headers()
        if ident.get("user"):
            identity = (
                f"<p>Signed in as <strong>{html.escape(ident.get('name', ident['user']))}</strong>"
                f" ({html.escape(ident.get('email', ''))}), user id "
                f"<code>{html.escape(ident['user'])}</code>.</p>"
            )
        else:
            identity = (
                '<p class="warn">No identity headers: this page is meant to be opened through '
                "chatkit-gate (for example https://localhost:8443/), not on the app's own port.</p>"
            )
        rows = "".join(
            f"<tr><td><code>{html.escape(HEADER_PREFIX + k)}</code></td>"
            f"<td>{html.escape(v)}</td></tr>"
            for k, v in sorted(ident.items())
        ) or "<tr><td>(none)</td></tr>"
        self.send_html(200, HOME_PAGE.format(identity=identity, headers=rows))


def main():
    host = os.environ.get("HOST", "127.0.0.1")
    port = int(os.environ.get("PORT", "3000"))
    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    print(f"demo-app: listening on http://{host}:{server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
