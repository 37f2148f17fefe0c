#!/usr/bin/env python3
"""Browser walks: headless Chromium (Debian's /usr/bin/chromium, driven by Playwright for
Python) through the real chatkit-gate binary in front of real apps, on loopback:

  nextjs  examples/nextjs (Next.js production build, next-auth 4 Credentials sign-in)
  demo    examples/demo-app (the Quick start app)
  django  examples/django (session login, whoami view)

Each walk: signed out -> redirected to the login page and back to the original page after
signing in -> the page shows the identity the gate sent -> ChatKit mint and refresh (through
the fake ChatKit API) -> a background request, then "Sign out" -> signed out ->
POST /api/chatkit/session is 401. The Next.js walk also counts the introspection calls at
the app (20 browser requests after sign-in) and checks the CSRF cookie never changes.

Usage: tests/browser/walk.py GATE_BINARY [nextjs] [demo] [django]   (default: all three)
Exits 0 when every step passed, 1 otherwise; every process it started is stopped on exit.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
FAKE_KEY = "sk-walk-" + os.urandom(8).hex()
TMP = tempfile.mkdtemp(prefix="chatkit-browser-", dir=os.environ.get("WALK_TMP"))
PROCS: list[tuple[str, subprocess.Popen, str]] = []
RESULTS: list[tuple[str, bool, str]] = []


class WalkError(Exception):
    pass


def log(msg: str) -> None:
    print(f"browser: {msg}", flush=True)


def check(name: str, ok: bool, detail: str = "") -> None:
    RESULTS.append((name, ok, detail))
    log(f"{'ok  ' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}")
    if not ok:
        raise WalkError(name)


# --- processes ---------------------------------------------------------------------------


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def spawn(name: str, argv: list[str], env: dict | None = None, cwd: str = ROOT) -> subprocess.Popen:
    path = os.path.join(TMP, f"{name}.log")
    out = open(path, "wb")
    proc = subprocess.Popen(argv, cwd=cwd, env={**os.environ, **(env or {})}, stdout=out,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    PROCS.append((name, proc, path))
    return proc


def wait_port(port: int, proc: subprocess.Popen, name: str, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise WalkError(f"{name} exited with {proc.returncode} (log: {log_of(name)})")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise WalkError(f"{name} is not listening on 127.0.0.1:{port} after {timeout:.0f}s")


def log_of(name: str) -> str:
    for n, _, path in PROCS:
        if n == name:
            with open(path, "rb") as f:
                return f.read().decode("utf-8", "replace")[-3000:]
    return ""


def stop_all() -> None:
    for _, proc, _ in reversed(PROCS):
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    for _, proc, _ in PROCS:
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
    PROCS.clear()


def gate_config(example_toml: str, ports: dict[str, int]) -> str:
    """The example's own gate.toml, with free ports in place of the documented ones."""
    with open(os.path.join(ROOT, example_toml)) as f:
        text = f.read()
    for old, new in ports.items():
        if old not in text:
            raise WalkError(f"{example_toml}: expected {old!r} in the file")
        text = text.replace(old, str(new))
    path = os.path.join(TMP, os.path.basename(os.path.dirname(example_toml)) + "-gate.toml")
    with open(path, "w") as f:
        f.write(text)
    return path


def start_fake_openai(port: int) -> None:
    fake = spawn("fake-openai", [sys.executable, "examples/fake-openai/server.py", "--port", str(port),
                                 "--api-key", FAKE_KEY, "--workflow", "*"])
    wait_port(port, fake, "fake-openai")


def start_gate(gate_bin: str, config: str, port: int, name: str) -> None:
    gate = spawn(name, [gate_bin, "--config", config], env={"OPENAI_API_KEY": FAKE_KEY})
    wait_port(port, gate, name)


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


# --- the browser -------------------------------------------------------------------------


class Browser:
    def __init__(self, pw, name: str):
        self.context = pw.chromium.launch_persistent_context(
            os.path.join(TMP, f"profile-{name}"),  # a fresh --user-data-dir per walk
            executable_path=CHROMIUM,
            headless=True,
            args=FLAGS,
            ignore_https_errors=True,  # the gate's self-signed certificate
        )
        self.page = self.context.pages[0] if self.context.pages else self.context.new_page()
        self.page.set_default_timeout(30_000)

    def cookie(self, name: str) -> str | None:
        return next((c["value"] for c in self.context.cookies() if c["name"] == name), None)

    def fetch(self, path: str, method: str = "GET", body: dict | None = None) -> dict:
        """A background request from the page (same origin, the browser's own cookies)."""
        return self.page.evaluate(
            """async ([path, method, body]) => {
                const r = await fetch(path, {method, credentials: "same-origin",
                    headers: body ? {"content-type": "application/json"} : {},
                    body: body ? JSON.stringify(body) : undefined});
                return {status: r.status, body: await r.text()};
            }""",
            [path, method, body],
        )

    def close(self) -> None:
        self.context.close()


def wait_text(p, selector: str, ok, timeout: float = 15.0) -> str:
    """Poll an element's text from Python until `ok(text)`: unlike a string passed to
    `wait_for_function`, nothing is evaluated in the page, so a strict CSP (no unsafe-eval, as
    the demo app sends) cannot break the wait."""
    deadline = time.monotonic() + timeout
    while True:
        text = p.inner_text(selector)
        if ok(text) or time.monotonic() > deadline:
            return text
        time.sleep(0.05)


def path_of(url: str) -> str:
    from urllib.parse import urlsplit

    u = urlsplit(url)
    return u.path + (f"?{u.query}" if u.query else "")


def signed_out_ends(b: Browser, base: str, login_prefix: str) -> None:
    r = b.fetch("/api/chatkit/session", "POST", {})
    check("signed out: POST /api/chatkit/session is 401", r["status"] == 401, f"{r['status']} {r['body'][:80]}")
    b.page.goto(base + "/dashboard")
    check("signed out: a page sends the browser to the login page again",
          path_of(b.page.url).startswith(login_prefix), path_of(b.page.url))


# --- Next.js -----------------------------------------------------------------------------


def npm_ready(app_dir: str) -> None:
    """`npm ci` when node_modules is missing or older than the lockfile; one production build
    when .next is missing or older than the sources (CI: once per fresh clone)."""
    modules = os.path.join(app_dir, "node_modules", ".package-lock.json")
    lock = os.path.join(app_dir, "package-lock.json")
    if not os.path.exists(modules) or os.path.getmtime(modules) < os.path.getmtime(lock):
        # npm's own cache (~/.npm) outlives a CI clone: later runs install from it.
        log("npm ci --prefer-offline (examples/nextjs)")
        subprocess.run(["npm", "ci", "--prefer-offline", "--no-audit", "--no-fund", "--loglevel=error"],
                       cwd=app_dir, check=True)
    build_id = os.path.join(app_dir, ".next", "BUILD_ID")
    newest = max(os.path.getmtime(os.path.join(d, f)) for d, _, fs in os.walk(os.path.join(app_dir, "app"))
                 for f in fs)
    newest = max(newest, os.path.getmtime(os.path.join(app_dir, "next.config.mjs")), os.path.getmtime(lock))
    if not os.path.exists(build_id) or os.path.getmtime(build_id) < newest:
        log("next build (examples/nextjs, production)")
        started = time.monotonic()
        subprocess.run(["npx", "--no-install", "next", "build"], cwd=app_dir, check=True,
                       env={**os.environ, "NEXT_TELEMETRY_DISABLED": "1"})
        log(f"next build took {time.monotonic() - started:.0f}s")


def walk_nextjs(pw, gate_bin: str) -> None:
    app_dir = os.path.join(ROOT, "examples", "nextjs")
    npm_ready(app_dir)
    gate_port, plain_port, admin_port, app_port, api_port = free_ports(5)
    base = f"https://localhost:{gate_port}"
    start_fake_openai(api_port)
    app = spawn("nextjs", ["npx", "--no-install", "next", "start", "--hostname", "127.0.0.1", "--port", str(app_port)],
                cwd=app_dir,
                env={"NEXTAUTH_URL": base, "NEXTAUTH_SECRET": os.urandom(16).hex(), "NEXT_TELEMETRY_DISABLED": "1"})
    wait_port(app_port, app, "nextjs")
    config = gate_config("examples/nextjs/gate.toml", {
        "127.0.0.1:8443": f"127.0.0.1:{gate_port}", "https_port = 8443": f"https_port = {gate_port}",
        "127.0.0.1:8080": f"127.0.0.1:{plain_port}", "127.0.0.1:9090": f"127.0.0.1:{admin_port}",
        "127.0.0.1:3000": f"127.0.0.1:{app_port}", "127.0.0.1:8787": f"127.0.0.1:{api_port}",
    })
    start_gate(gate_bin, config, gate_port, "gate-nextjs")
    stats = f"http://127.0.0.1:{app_port}/api/example-stats"

    b = Browser(pw, "nextjs")
    try:
        p = b.page
        p.goto(base + "/dashboard?tab=2")
        check("nextjs: signed out, /dashboard goes to NextAuth's sign-in page",
              path_of(p.url).startswith("/api/auth/signin?callbackUrl=%2Fdashboard%3Ftab%3D2"), path_of(p.url))
        p.fill("input[name=username]", "alice")
        p.fill("input[name=password]", "wonderland")
        before_sign_in = get_json(stats)["sessionCalls"]
        p.click("button[type=submit]")
        p.wait_for_url("**/dashboard?tab=2")
        check("nextjs: after sign-in, back at the original page", path_of(p.url) == "/dashboard?tab=2", path_of(p.url))
        check("nextjs: the dashboard shows the user the gate sent",
              p.inner_text("#user-id") == "u-alice" and p.inner_text("#user-email") == "alice@example.com",
              f"{p.inner_text('#user-id')!r} {p.inner_text('#user-name')!r} {p.inner_text('#user-email')!r}")
        csrf = b.cookie("__Host-next-auth.csrf-token")
        check("nextjs: NextAuth set its CSRF cookie during sign-in", bool(csrf))
        after_page = get_json(stats)["sessionCalls"]
        for i in range(20):
            r = b.fetch(f"/api/me?n={i}")
            if r["status"] != 200 or json.loads(r["body"]).get("id") != "u-alice":
                check(f"nextjs: background request {i}", False, f"{r['status']} {r['body'][:100]}")
        after_20 = get_json(stats)["sessionCalls"]
        check("nextjs: 20 browser requests after sign-in cost at most 2 introspection calls",
              after_20 - after_page <= 2,
              f"{after_20 - after_page} calls for the 20 requests; {after_page - before_sign_in} for sign-in + "
              f"dashboard; {after_20} in all")
        check("nextjs: the CSRF cookie did not change", b.cookie("__Host-next-auth.csrf-token") == csrf)

        p.goto(base + "/chat")
        p.wait_for_function("document.getElementById('refreshed').textContent.startsWith('ek_')"
                            " || document.getElementById('error') !== null")
        minted, refreshed = p.inner_text("#minted"), p.inner_text("#refreshed")
        check("nextjs: /chat minted a secret and refreshed it",
              minted.startswith("ek_") and refreshed.startswith("ek_") and minted != refreshed,
              f"minted {minted[:10]}…, refreshed {refreshed[:10]}…")

        p.goto(base + "/api/auth/signout")
        r = b.fetch("/api/me")
        check("nextjs: a background request on the sign-out page", r["status"] == 200, str(r["status"]))
        check("nextjs: ... did not change the CSRF cookie", b.cookie("__Host-next-auth.csrf-token") == csrf)
        p.click("button[type=submit]")
        p.wait_for_load_state()
        check("nextjs: Sign out worked (no ?csrf=true, no session cookie)",
              "csrf=true" not in p.url and b.cookie("__Secure-next-auth.session-token") is None, path_of(p.url))
        signed_out_ends(b, base, "/api/auth/signin")
    finally:
        b.close()


# --- the demo app ------------------------------------------------------------------------


def walk_demo(pw, gate_bin: str) -> None:
    gate_port, plain_port, admin_port, app_port, api_port = free_ports(5)
    base = f"https://localhost:{gate_port}"
    start_fake_openai(api_port)
    app = spawn("demo-app", [sys.executable, "examples/demo-app/app.py"], env={"PORT": str(app_port)})
    wait_port(app_port, app, "demo-app")
    config = gate_config("examples/demo-app/gate.toml", {
        "127.0.0.1:8443": f"127.0.0.1:{gate_port}", "https_port = 8443": f"https_port = {gate_port}",
        "127.0.0.1:8080": f"127.0.0.1:{plain_port}", "127.0.0.1:9090": f"127.0.0.1:{admin_port}",
        "127.0.0.1:3000": f"127.0.0.1:{app_port}", "127.0.0.1:8787": f"127.0.0.1:{api_port}",
    })
    start_gate(gate_bin, config, gate_port, "gate-demo")
    b = Browser(pw, "demo")
    try:
        p = b.page
        p.goto(base + "/?tab=2")
        check("demo: signed out, / goes to the login page", path_of(p.url) == "/login?rd=%2F%3Ftab%3D2", path_of(p.url))
        p.fill("input[name=username]", "alice")
        p.fill("input[name=password]", "wonderland")
        p.click("button[type=submit]")
        p.wait_for_url("**/?tab=2")
        check("demo: after sign-in, back at the original page", path_of(p.url) == "/?tab=2", path_of(p.url))
        check("demo: the page shows the user the gate sent", "Signed in as Alice" in p.inner_text("body"))
        status = wait_text(p, "#status", lambda t: t != "Minting a session\u2026")
        check("demo: the page minted a session", status == "Session minted.", status)
        p.click("#refresh")
        status = wait_text(p, "#status", lambda t: t == "Session refreshed.")
        check("demo: ... and refreshed it", status == "Session refreshed.", status)
        r = b.fetch("/api/whoami")
        check("demo: a background request", r["status"] == 200 and "alice" in r["body"], f"{r['status']}")
        p.click("form[action='/logout'] button")
        p.wait_for_url("**/login")
        check("demo: Sign out", b.cookie("session") in (None, ""), path_of(p.url))
        signed_out_ends(b, base, "/login")
    finally:
        b.close()


# --- Django ------------------------------------------------------------------------------


def walk_django(pw, gate_bin: str) -> None:
    app_dir = os.path.join(ROOT, "examples", "django")
    gate_port, plain_port, admin_port, app_port, api_port = free_ports(5)
    base = f"https://localhost:{gate_port}"
    env = {"DJANGO_DB": os.path.join(TMP, "django.sqlite3"), "DJANGO_SECRET_KEY": os.urandom(16).hex()}
    manage = [sys.executable, "manage.py"]
    subprocess.run(manage + ["migrate", "-v", "0"], cwd=app_dir, env={**os.environ, **env}, check=True)
    subprocess.run(manage + ["shell", "-c",
                             "from django.contrib.auth.models import User; "
                             "User.objects.create_user('alice', 'alice@example.com', 'wonderland', first_name='Alice')"],
                   cwd=app_dir, env={**os.environ, **env}, check=True)
    start_fake_openai(api_port)
    app = spawn("django", manage + ["runserver", "--noreload", f"127.0.0.1:{app_port}"], cwd=app_dir, env=env)
    wait_port(app_port, app, "django")
    config = gate_config("examples/django/gate.toml", {
        "127.0.0.1:8443": f"127.0.0.1:{gate_port}", "https_port = 8443": f"https_port = {gate_port}",
        "127.0.0.1:8080": f"127.0.0.1:{plain_port}", "127.0.0.1:9090": f"127.0.0.1:{admin_port}",
        "127.0.0.1:8000": f"127.0.0.1:{app_port}", "127.0.0.1:8787": f"127.0.0.1:{api_port}",
    })
    start_gate(gate_bin, config, gate_port, "gate-django")
    b = Browser(pw, "django")
    try:
        p = b.page
        p.goto(base + "/dashboard/?tab=2")
        check("django: signed out, /dashboard/ goes to Django's login page",
              path_of(p.url) == "/accounts/login/?next=%2Fdashboard%2F%3Ftab%3D2", path_of(p.url))
        p.fill("input[name=username]", "alice")
        p.fill("input[name=password]", "wonderland")
        p.click("button[type=submit]")
        p.wait_for_url("**/dashboard/?tab=2")
        check("django: after sign-in, back at the original page", path_of(p.url) == "/dashboard/?tab=2", path_of(p.url))
        check("django: the dashboard shows the user the gate sent",
              p.inner_text("#user-name") == "Alice" and p.inner_text("#user-email") == "alice@example.com"
              and p.inner_text("#user-id").isdigit(), p.inner_text("#user-id"))
        r = b.fetch("/api/me")
        check("django: a background request", r["status"] == 200, str(r["status"]))
        r = b.fetch("/api/chatkit/session", "POST", {})
        check("django: POST /api/chatkit/session mints for the user", r["status"] == 200 and "ek_" in r["body"],
              str(r["status"]))
        secret = json.loads(r["body"])["client_secret"]
        r = b.fetch("/api/chatkit/refresh", "POST", {"currentClientSecret": secret})
        check("django: ... and refreshes it", r["status"] == 200 and json.loads(r["body"])["client_secret"] != secret,
              str(r["status"]))
        p.click("form[action='/accounts/logout/'] button")
        p.wait_for_url("**/accounts/login/")
        check("django: Sign out", b.cookie("sessionid") in (None, ""), path_of(p.url))
        signed_out_ends(b, base, "/accounts/login/")
    finally:
        b.close()


WALKS = {"nextjs": walk_nextjs, "demo": walk_demo, "django": walk_django}


def main() -> int:
    if len(sys.argv) < 2:
        print(__doc__)
        return 2
    gate_bin = os.path.abspath(sys.argv[1])
    names = sys.argv[2:] or list(WALKS)
    if not os.access(CHROMIUM, os.X_OK):
        print(f"browser: {CHROMIUM} not found: apt-get install chromium (or set CHROMIUM)", file=sys.stderr)
        return 1
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        print("browser: Playwright for Python is missing: pip install -r tests/requirements.txt", file=sys.stderr)
        return 1
    failed = []
    with sync_playwright() as pw:
        for name in names:
            started = time.monotonic()
            try:
                WALKS[name](pw, gate_bin)
                log(f"{name}: passed in {time.monotonic() - started:.0f}s")
            except Exception as e:  # noqa: BLE001 - report and go on with the next walk
                failed.append(name)
                log(f"{name}: FAILED: {e!r}")
                for proc_name, _, _ in PROCS:
                    log(f"--- {proc_name} log (tail) ---\n{log_of(proc_name)}")
            finally:
                stop_all()
    if os.environ.get("WALK_KEEP") != "1":
        shutil.rmtree(TMP, ignore_errors=True)
    passed = sum(1 for _, ok, _ in RESULTS if ok)
    log(f"{passed} checks passed; walks failed: {', '.join(failed) or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
