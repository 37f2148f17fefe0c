#!/usr/bin/env python3
"""One command for the local demo: the demo app, the fake ChatKit API and chatkit-gate.

    python3 examples/demo-app/run.py [--gate PATH]

then open https://localhost:8443/ (a self-signed certificate: accept the browser's warning)
and sign in as alice / wonderland. Ctrl-C stops everything.

The gate binary is --gate, else $CHATKIT_GATE_BIN, else target/release/chatkit-gate if it
exists, else `cargo run --release`. With OPENAI_API_KEY and CHATKIT_WORKFLOW_ID both set the
gate calls the real ChatKit API with them and the fake is not started; otherwise it calls the
fake (examples/fake-openai) with the fake's key.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
FAKE_KEY = "sk-demo"


def wait_port(port, proc, name, timeout=120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"run.py: {name} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    sys.exit(f"run.py: {name} is not listening on 127.0.0.1:{port} after {timeout:.0f}s")


def gate_command(arg):
    path = arg or os.environ.get("CHATKIT_GATE_BIN")
    if path:
        return [path]
    release = os.path.join(ROOT, "target", "release", "chatkit-gate")
    if os.access(release, os.X_OK):
        return [release]
    if not shutil.which("cargo"):
        sys.exit("run.py: no gate binary: build it with `cargo build --release` or pass --gate")
    return ["cargo", "run", "--quiet", "--release", "--bin", "chatkit-gate", "--"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gate", help="path to the chatkit-gate binary")
    args = parser.parse_args()

    config_path = os.path.join(HERE, "gate.toml")
    env = dict(os.environ)
    real = bool(os.environ.get("OPENAI_API_KEY") and os.environ.get("CHATKIT_WORKFLOW_ID"))
    procs = []

    def spawn(argv, **kwargs):
        proc = subprocess.Popen(argv, cwd=ROOT, start_new_session=True, **kwargs)
        procs.append(proc)
        return proc

    def stop_all(*_):
        for proc in reversed(procs):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    tmp = tempfile.mkdtemp(prefix="chatkit-demo-")
    try:
        if real:
            with open(config_path) as f:
                text = f.read()
            text = text.replace('api_base = "http://127.0.0.1:8787/v1"',
                                'api_base = "https://api.openai.com/v1"')
            text = text.replace('workflow_id = "wf_demo"',
                                f'workflow_id = "{os.environ["CHATKIT_WORKFLOW_ID"]}"')
            config_path = os.path.join(tmp, "gate.toml")
            with open(config_path, "w") as f:
                f.write(text)
            print("run.py: using the real ChatKit API with $OPENAI_API_KEY and "
                  "$CHATKIT_WORKFLOW_ID", flush=True)
        else:
            env["OPENAI_API_KEY"] = FAKE_KEY
            fake = spawn([sys.executable, os.path.join(ROOT, "examples/fake-openai/server.py"),
                          "--port", "8787", "--api-key", FAKE_KEY, "--workflow", "wf_demo"])
            wait_port(8787, fake, "fake-openai")

        app = spawn([sys.executable, os.path.join(HERE, "app.py")],
                    env={**os.environ, "HOST": "127.0.0.1", "PORT": "3000"})
        wait_port(3000, app, "demo-app")

        gate = spawn(gate_command(args.gate) + ["--config", config_path], env=env)
        wait_port(8443, gate, "chatkit-gate", timeout=900)  # a first `cargo run` compiles
        print("\nrun.py: open https://localhost:8443/ and sign in as alice / wonderland "
              "(self-signed certificate: accept the warning).\n"
              "        metrics: http://127.0.0.1:9090/metrics   Ctrl-C stops everything.\n",
              flush=True)
        while all(p.poll() is None for p in procs):
            time.sleep(0.5)
        dead = [p for p in procs if p.poll() is not None]
        print(f"run.py: {dead[0].args[0]} exited with {dead[0].returncode}", flush=True)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        stop_all()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
