#!/usr/bin/env python3
"""Open N idle TLS keep-alive connections to a loopback server, for memory measurements.

Each connection does a TLS handshake (no certificate check, ALPN http/1.1), sends one
`GET / HTTP/1.1` with a Host header and reads the whole response (Content-Length or chunked),
then stays open and idle. When all are open the script prints `ready opened=N failed=F` and
holds them for --hold seconds (the caller samples RSS meanwhile), then prints
`held open=M of N` (M = connections the server had not closed), closes them all and exits:
0 if all N opened and stayed open, 1 otherwise. Every step is bounded by timeouts.

    idle_conns.py --port 19447 [-n 1000] [--hold 3] [--concurrency 50] [--timeout 10]
"""
import argparse
import asyncio
import ssl
import sys
import time


async def read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    if "content-length" in headers:
        await reader.readexactly(int(headers["content-length"]))
    elif "chunked" in headers.get("transfer-encoding", "").lower():
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)  # data + CRLF (trailers are not expected)
            if size == 0:
                break
    else:
        raise RuntimeError("response without a length: not keep-alive")
    if headers.get("connection", "").lower() == "close":
        raise RuntimeError("server answered Connection: close")
    return status


async def open_one(host, port, ctx, timeout, sem):
    async with sem:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=ctx, server_hostname="localhost"), timeout)
        try:
            writer.write(f"GET / HTTP/1.1\r\nHost: localhost:{port}\r\nUser-Agent: idle_conns\r\n\r\n".encode())
            await writer.drain()
            status = await asyncio.wait_for(read_response(reader), timeout)
            if status != 200:
                raise RuntimeError(f"status {status}")
        except BaseException:
            writer.close()
            raise
        return reader, writer


async def quiet(aw):
    try:
        await aw
    except Exception:  # a peer that already went away: nothing to close
        pass


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("-n", type=int, default=1000, help="connections (default 1000)")
    ap.add_argument("--hold", type=float, default=3.0, help="seconds to hold them idle (default 3)")
    ap.add_argument("--concurrency", type=int, default=50, help="handshakes at once (default 50)")
    ap.add_argument("--timeout", type=float, default=10.0, help="per connect / per response (default 10)")
    a = ap.parse_args()
    if a.host not in ("127.0.0.1", "::1", "localhost"):
        print("loopback only", file=sys.stderr)
        return 2

    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["http/1.1"])

    sem = asyncio.Semaphore(a.concurrency)
    t0 = time.monotonic()
    results = await asyncio.gather(
        *(open_one(a.host, a.port, ctx, a.timeout, sem) for _ in range(a.n)), return_exceptions=True)
    conns = [r for r in results if not isinstance(r, BaseException)]
    errors = [r for r in results if isinstance(r, BaseException)]
    print(f"ready opened={len(conns)} failed={len(errors)} in {time.monotonic() - t0:.1f}s", flush=True)
    for e in errors[:3]:
        print(f"  error: {e!r}", file=sys.stderr, flush=True)

    await asyncio.sleep(a.hold)

    still_open = sum(1 for r, w in conns if not r.at_eof() and not w.is_closing())
    print(f"held open={still_open} of {a.n}", flush=True)
    for _, w in conns:
        w.close()
    try:
        await asyncio.wait_for(asyncio.gather(*(quiet(w.wait_closed()) for _, w in conns)), 10)
    except asyncio.TimeoutError:
        pass
    print("closed", flush=True)
    return 0 if still_open == a.n else 1


if __name__ == "__main__":
    try:
        sys.exit(asyncio.run(main()))
    except KeyboardInterrupt:
        sys.exit(130)
