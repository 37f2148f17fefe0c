#!/usr/bin/env python3
"""A small fake of OpenAI's ChatKit Sessions API, Python standard library only.

It is for the demo and the end-to-end walk: it checks what the real API checks
(bearer key, beta header, content type, body shape and bounds) and answers the
real shapes, so a gate that sends a wrong request fails here too.

    POST /v1/chatkit/sessions               create a session
    POST /v1/chatkit/sessions/{id}/cancel   cancel one

Every answer carries an ``x-request-id`` header. Errors look like the real ones:
``{"error": {"message", "type", "param", "code"}}``.

Two extra endpoints, not part of the real API, let a test look inside and
inject faults (they need no key):

    GET  /_fake/sessions   every session created so far, with the request body
                           it was created from and its current status
    POST /_fake/fail       {"status": 429, "count": 1} makes the next N API
                           calls fail with that status; {"hang": 30} makes
                           them hang for that many seconds first

Run:  python3 examples/fake-openai/server.py [--port 8787] [--api-key sk-demo]
                                              [--workflow wf_demo ...]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MAX_BODY = 1 << 20

DEFAULT_KEY = "sk-demo"
DEFAULT_WORKFLOW = "wf_demo"


class ApiError(Exception):
    def __init__(self, status, message, type_="invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code

    def body(self):
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


# --- body validation -------------------------------------------------------


def _type_name(value):
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a decimal"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _invalid_type(param, expected, value):
    return ApiError(
        400,
        f"Invalid type for '{param}': expected {expected}, but got {_type_name(value)} instead.",
        param=param,
        code="invalid_type",
    )


def _check_keys(obj, allowed, prefix):
    for key in obj:
        if key not in allowed:
            param = f"{prefix}{key}"
            raise ApiError(400, f"Unknown parameter: '{param}'.", param=param, code="unknown_parameter")


def _require(obj, key, prefix):
    if key not in obj:
        param = f"{prefix}{key}"
        raise ApiError(
            400,
            f"Missing required parameter: '{param}'.",
            param=param,
            code="missing_required_parameter",
        )


def _object(value, param):
    if not isinstance(value, dict):
        raise _invalid_type(param, "an object", value)
    return value


def _bool(value, param):
    if not isinstance(value, bool):
        raise _invalid_type(param, "a boolean", value)


def _string(value, param, min_len=None):
    if not isinstance(value, str):
        raise _invalid_type(param, "a string", value)
    if min_len is not None and len(value) < min_len:
        raise ApiError(
            400,
            f"Invalid '{param}': string too short. Expected a string with minimum length "
            f"{min_len}, but got {'an empty string' if not value else repr(value)} instead.",
            param=param,
            code="string_below_min_length",
        )


def _int(value, param, minimum=None, maximum=None):
    if isinstance(value, bool) or not isinstance(value, int):
        raise _invalid_type(param, "an integer", value)
    if minimum is not None and value < minimum:
        raise ApiError(
            400,
            f"Invalid '{param}': integer below minimum value. Expected a value >= {minimum}, "
            f"but got {value} instead.",
            param=param,
            code="integer_below_min_value",
        )
    if maximum is not None and value > maximum:
        raise ApiError(
            400,
            f"Invalid '{param}': integer above maximum value. Expected a value <= {maximum}, "
            f"but got {value} instead.",
            param=param,
            code="integer_above_max_value",
        )


def _optional_bool_object(obj, key, prefix, extra=None):
    """{enabled: bool, <extra int fields>} sub-objects of chatkit_configuration."""
    if key not in obj:
        return
    param = f"{prefix}{key}"
    sub = _object(obj[key], param)
    allowed = {"enabled"} | set((extra or {}).keys())
    _check_keys(sub, allowed, param + ".")
    if "enabled" in sub:
        _bool(sub["enabled"], param + ".enabled")
    for name, (minimum, maximum) in (extra or {}).items():
        if name in sub:
            _int(sub[name], f"{param}.{name}", minimum, maximum)


def validate_create(body):
    """Raises ApiError for anything the real API would reject."""
    _object(body, "body")
    _check_keys(
        body,
        {"user", "workflow", "expires_after", "rate_limits", "chatkit_configuration"},
        "",
    )
    _require(body, "user", "")
    _string(body["user"], "user", min_len=1)

    _require(body, "workflow", "")
    workflow = _object(body["workflow"], "workflow")
    _check_keys(workflow, {"id", "version", "state_variables", "tracing"}, "workflow.")
    _require(workflow, "id", "workflow.")
    _string(workflow["id"], "workflow.id", min_len=1)
    if "version" in workflow:
        _string(workflow["version"], "workflow.version", min_len=1)
    if "state_variables" in workflow:
        state = _object(workflow["state_variables"], "workflow.state_variables")
        for name, value in state.items():
            param = f"workflow.state_variables.{name}"
            if len(name) > 64:
                raise ApiError(
                    400,
                    f"Invalid 'workflow.state_variables': key '{name[:16]}...' is longer than "
                    "64 characters.",
                    param="workflow.state_variables",
                    code="invalid_value",
                )
            if value is None or not isinstance(value, (str, int, float, bool)):
                raise _invalid_type(param, "a string, number or boolean", value)
    if "tracing" in workflow:
        tracing = _object(workflow["tracing"], "workflow.tracing")
        _check_keys(tracing, {"enabled"}, "workflow.tracing.")
        if "enabled" in tracing:
            _bool(tracing["enabled"], "workflow.tracing.enabled")

    if "expires_after" in body:
        expires = _object(body["expires_after"], "expires_after")
        _check_keys(expires, {"anchor", "seconds"}, "expires_after.")
        _require(expires, "anchor", "expires_after.")
        _require(expires, "seconds", "expires_after.")
        if expires["anchor"] != "created_at":
            raise ApiError(
                400,
                f"Invalid value: '{expires['anchor']}'. Supported values are: 'created_at'.",
                param="expires_after.anchor",
                code="invalid_value",
            )
        _int(expires["seconds"], "expires_after.seconds", 1, 600)

    if "rate_limits" in body:
        limits = _object(body["rate_limits"], "rate_limits")
        _check_keys(limits, {"max_requests_per_1_minute"}, "rate_limits.")
        if "max_requests_per_1_minute" in limits:
            _int(limits["max_requests_per_1_minute"], "rate_limits.max_requests_per_1_minute", 1)

    if "chatkit_configuration" in body:
        config = _object(body["chatkit_configuration"], "chatkit_configuration")
        _check_keys(
            config,
            {"automatic_thread_titling", "file_upload", "history"},
            "chatkit_configuration.",
        )
        _optional_bool_object(config, "automatic_thread_titling", "chatkit_configuration.")
        _optional_bool_object(
            config,
            "file_upload",
            "chatkit_configuration.",
            {"max_file_size": (1, 512), "max_files": (1, None)},
        )
        _optional_bool_object(
            config, "history", "chatkit_configuration.", {"recent_threads": (1, None)}
        )


# --- state -----------------------------------------------------------------


class State:
    def __init__(self, api_keys, workflows):
        self.api_keys = set(api_keys)
        self.workflows = set(workflows)
        self.lock = threading.Lock()
        self.sessions = {}  # id -> session object
        self.requests = {}  # id -> the create request body
        self.order = []
        self.fail_status = None
        self.fail_count = 0
        self.hang_seconds = 0.0

    def take_fault(self):
        with self.lock:
            if self.fail_count <= 0:
                return None, 0.0
            self.fail_count -= 1
            status, hang = self.fail_status, self.hang_seconds
            if self.fail_count == 0:
                self.fail_status, self.hang_seconds = None, 0.0
            return status, hang

    def create(self, body):
        now = int(time.time())
        expires = body.get("expires_after", {"anchor": "created_at", "seconds": 600})
        workflow = body["workflow"]
        per_minute = body.get("rate_limits", {}).get("max_requests_per_1_minute", 10)
        config = body.get("chatkit_configuration", {})
        file_upload = {"enabled": False, "max_file_size": 512, "max_files": 10}
        file_upload.update(config.get("file_upload", {}))
        history = {"enabled": True, "recent_threads": None}
        history.update(config.get("history", {}))
        titling = {"enabled": True}
        titling.update(config.get("automatic_thread_titling", {}))
        session = {
            "id": "cksess_" + secrets.token_hex(24),
            "object": "chatkit.session",
            "client_secret": "ek_" + secrets.token_hex(24),
            "expires_at": now + expires["seconds"],
            "status": "active",
            "user": body["user"],
            "workflow": {
                "id": workflow["id"],
                "version": workflow.get("version"),
                "state_variables": workflow.get("state_variables"),
                "tracing": {"enabled": workflow.get("tracing", {}).get("enabled", True)},
            },
            "rate_limits": {"max_requests_per_1_minute": per_minute},
            "max_requests_per_1_minute": per_minute,
            "chatkit_configuration": {
                "automatic_thread_titling": titling,
                "file_upload": file_upload,
                "history": history,
            },
        }
        with self.lock:
            self.sessions[session["id"]] = session
            self.requests[session["id"]] = body
            self.order.append(session["id"])
        return dict(session)

    def cancel(self, session_id):
        with self.lock:
            session = self.sessions.get(session_id)
            if session is None:
                return None
            session["status"] = "cancelled"
            return dict(session)

    def dump(self):
        with self.lock:
            return [
                {
                    "id": sid,
                    "status": self.sessions[sid]["status"],
                    "user": self.sessions[sid]["user"],
                    "expires_at": self.sessions[sid]["expires_at"],
                    "request": self.requests[sid],
                }
                for sid in self.order
            ]


def mask_key(key):
    if len(key) <= 8:
        return "*" * len(key)
    return f"{key[:3]}{'*' * 12}{key[-4:]}"


# --- HTTP ------------------------------------------------------------------

SESSIONS = re.compile(r"^/v1/chatkit/sessions/?$")
CANCEL = re.compile(r"^/v1/chatkit/sessions/([^/]+)/cancel/?$")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "fake-openai/1"
    state: State  # set on the class by main()

    def log_message(self, format, *args):  # noqa: A002 - stdlib signature
        sys.stderr.write("fake-openai: %s\n" % (format % args))

    # Body reading copes with Content-Length and chunked transfer encoding.
    def read_body(self):
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            total = 0
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                total += size
                if total > MAX_BODY:
                    raise ApiError(413, "Request body too large.")
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            raise ApiError(413, "Request body too large.")
        return self.rfile.read(length) if length else b""

    def send_json(self, status, obj, request_id):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("x-request-id", request_id)
        self.send_header("openai-processing-ms", "3")
        if status == 429:
            self.send_header("Retry-After", "2")
        if status == 413:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        request_id = "req_" + secrets.token_hex(16)
        if self.path.split("?")[0] == "/_fake/sessions":
            self.send_json(200, {"sessions": self.state.dump()}, request_id)
            return
        self.send_json(404, ApiError(404, f"Invalid URL (GET {self.path})").body(), request_id)

    def do_POST(self):
        request_id = "req_" + secrets.token_hex(16)
        try:
            raw = self.read_body()
            path = self.path.split("?")[0]
            if path == "/_fake/fail":
                self.fake_fail(raw, request_id)
                return
            create = SESSIONS.match(path)
            cancel = CANCEL.match(path)
            if not create and not cancel:
                raise ApiError(404, f"Invalid URL (POST {path})")
            self.check_headers(raw, require_json=bool(create))
            status, hang = self.state.take_fault()
            if hang:
                time.sleep(hang)
            if status:
                raise self.injected(status)
            if create:
                self.send_json(200, self.create(raw), request_id)
            else:
                session = self.state.cancel(cancel.group(1))
                if session is None:
                    raise ApiError(404, f"Session with id '{cancel.group(1)}' not found.")
                self.send_json(200, session, request_id)
        except ApiError as err:
            self.send_json(err.status, err.body(), request_id)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def do_PUT(self):
        self.method_not_found("PUT")

    def do_DELETE(self):
        self.method_not_found("DELETE")

    def do_PATCH(self):
        self.method_not_found("PATCH")

    def method_not_found(self, method):
        request_id = "req_" + secrets.token_hex(16)
        try:
            self.read_body()
        except ApiError:
            pass
        self.send_json(404, ApiError(404, f"Invalid URL ({method} {self.path})").body(), request_id)

    def check_headers(self, raw, require_json):
        auth = self.headers.get("Authorization", "")
        if not auth.startswith("Bearer ") or not auth[7:].strip():
            raise ApiError(
                401,
                "You didn't provide an API key. You need to provide your API key in an "
                "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
            )
        key = auth[7:].strip()
        if key not in self.state.api_keys:
            raise ApiError(
                401,
                f"Incorrect API key provided: {mask_key(key)}. You can find your API key at "
                "https://platform.openai.com/account/api-keys.",
                code="invalid_api_key",
            )
        beta = [v.strip() for v in self.headers.get("OpenAI-Beta", "").split(",")]
        if "chatkit_beta=v1" not in beta:
            raise ApiError(
                400,
                "You must provide the 'OpenAI-Beta: chatkit_beta=v1' header to access the "
                "ChatKit API.",
                code="missing_beta_header",
            )
        content_type = self.headers.get("Content-Type", "")
        if (require_json or raw) and content_type.split(";")[0].strip().lower() != "application/json":
            raise ApiError(
                400,
                f"Invalid Content-Type header ({content_type or 'none'}), expected "
                "application/json.",
                code="invalid_content_type",
            )

    def create(self, raw):
        try:
            body = json.loads(raw.decode("utf-8")) if raw else None
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ApiError(
                400,
                "We could not parse the JSON body of your request. (HINT: This likely means "
                "you aren't using your HTTP library correctly. The OpenAI API expects a JSON "
                "payload, but what was sent was not valid JSON.)",
            ) from None
        if body is None:
            raise ApiError(400, "Missing required parameter: 'user'.", param="user",
                           code="missing_required_parameter")
        validate_create(body)
        if self.state.workflows and body["workflow"]["id"] not in self.state.workflows:
            raise ApiError(404, f"Workflow with id '{body['workflow']['id']}' not found.")
        return self.state.create(body)

    def injected(self, status):
        if status == 401:
            return ApiError(401, "Incorrect API key provided: sk-***. (injected)",
                            code="invalid_api_key")
        if status == 404:
            return ApiError(404, "Workflow with id 'wf_injected' not found.")
        if status == 429:
            return ApiError(429, "Rate limit reached for requests. (injected)",
                            type_="requests", code="rate_limit_exceeded")
        if status >= 500:
            return ApiError(status, "The server had an error while processing your request. "
                            "(injected)", type_="server_error")
        return ApiError(status, f"Injected error {status}.")

    def fake_fail(self, raw, request_id):
        try:
            spec = json.loads(raw or b"{}")
            status = spec.get("status")
            count = int(spec.get("count", 1))
            hang = float(spec.get("hang", 0))
        except (ValueError, AttributeError, TypeError):
            raise ApiError(400, "Expected {\"status\": N, \"count\": N, \"hang\": seconds}.") from None
        with self.state.lock:
            self.state.fail_status = int(status) if status else None
            self.state.fail_count = count
            self.state.hang_seconds = hang
        self.send_json(200, {"status": status, "count": count, "hang": hang}, request_id)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Fake OpenAI ChatKit Sessions API")
    parser.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8787")))
    parser.add_argument(
        "--api-key",
        action="append",
        help=f"accepted API key (repeatable; default $FAKE_OPENAI_API_KEY or {DEFAULT_KEY})",
    )
    parser.add_argument(
        "--workflow",
        action="append",
        help=f"known workflow id (repeatable; default {DEFAULT_WORKFLOW}); '*' accepts any",
    )
    args = parser.parse_args(argv)
    keys = args.api_key or [os.environ.get("FAKE_OPENAI_API_KEY", DEFAULT_KEY)]
    workflows = args.workflow or [DEFAULT_WORKFLOW]
    if "*" in workflows:
        workflows = []
    Handler.state = State(keys, workflows)
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    server.daemon_threads = True
    host, port = server.server_address[:2]
    print(f"fake-openai: listening on http://{host}:{port}/v1", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
