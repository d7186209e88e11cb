#!/usr/bin/env python3
"""Load test for `llama3v serve`: N concurrent clients send a fixed number of chat completions on loopback.

Reports throughput (requests/s, generated tokens/s), latency percentiles of the successful requests, the
429s the server answered when its queue was full (expected under overload) and every other failure (not
expected; the exit status is 1 if there is any).

Starts its own server on a free loopback port when given --model (and stops it afterwards), or targets a
running one with --url. Bounded: a fixed request count, a per-request timeout and an overall deadline.

    .venv/bin/python scripts/load_test.py --model models/default --clients 8 --requests 64 --max-tokens 32
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parents[1]


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def png_data_url() -> str:
    """A small synthetic PNG, so the load includes the vision graph."""
    from PIL import Image

    image = Image.new("RGB", (64, 48))
    image.putdata([((x * 4) % 256, (y * 5) % 256, ((x + y) * 2) % 256) for y in range(48) for x in range(64)])
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    binary = args.binary or str(REPO / "target" / "release" / "llama3v")
    command = [binary, "serve", "--model", str(args.model), "--host", "127.0.0.1", "--port", "0"]
    command += ["--max-batch", str(args.max_batch), "--max-queue", str(args.max_queue)]
    command += ["--max-tokens", str(max(args.max_tokens, 1))]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    assert proc.stderr is not None
    for line in proc.stderr:
        found = re.search(r"listening on (http://127\.0\.0\.1:\d+)", line)
        if found:
            # Keep draining the log so the server never blocks on a full pipe.
            threading.Thread(target=proc.stderr.read, daemon=True).start()
            return proc, found.group(1)
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise SystemExit(f"the server did not start: {' '.join(command)}")


def wait_ready(host: str, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection(host, port, timeout=5)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"server at {host}:{port} not ready within {timeout} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="a running server (ignored with --model)")
    parser.add_argument("--model", type=Path, help="start a server on this model directory")
    parser.add_argument("--binary", help="llama3v binary [target/release/llama3v]")
    parser.add_argument("--max-batch", type=int, default=4, help="server flag, with --model")
    parser.add_argument("--max-queue", type=int, default=32, help="server flag, with --model")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients")
    parser.add_argument("--requests", type=int, default=64, help="total requests over all clients")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens per reply (stop tokens ignored)")
    parser.add_argument("--no-image", action="store_true", help="text-only requests")
    parser.add_argument("--timeout", type=float, default=300, help="per-request timeout, seconds")
    parser.add_argument("--deadline", type=float, default=1800, help="stop sending new requests after this")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    args = parser.parse_args()

    proc = None
    url = args.url
    if args.model:
        proc, url = start_server(args)
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    try:
        wait_ready(host, port, 120)
        content: list[dict] = [{"type": "text", "text": "Describe this image in detail."}]
        if not args.no_image:
            content.insert(0, {"type": "image_url", "image_url": {"url": png_data_url()}})
        body = json.dumps(
            {
                "model": "llama3v",
                "messages": [{"role": "user", "content": content}],
                "max_tokens": args.max_tokens,
                "temperature": 0,
                "ignore_eos": True,
            }
        ).encode()

        lock = threading.Lock()
        next_index = iter(range(args.requests))
        results: list[tuple[int, float, int, str]] = []  # status, seconds, completion tokens, error
        stop_at = time.monotonic() + args.deadline

        def client() -> None:
            conn = http.client.HTTPConnection(host, port, timeout=args.timeout)
            while time.monotonic() < stop_at:
                with lock:
                    index = next(next_index, None)
                if index is None:
                    break
                start = time.perf_counter()
                try:
                    conn.request(
                        "POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"}
                    )
                    response = conn.getresponse()
                    raw = response.read()
                    status = response.status
                except (OSError, http.client.HTTPException) as e:
                    conn.close()
                    conn = http.client.HTTPConnection(host, port, timeout=args.timeout)
                    status, raw = 0, str(e).encode()
                seconds = time.perf_counter() - start
                tokens, error = 0, ""
                try:
                    reply = json.loads(raw)
                    tokens = reply["usage"]["completion_tokens"] if status == 200 else 0
                    error = "" if status == 200 else reply["error"]["message"]
                except (ValueError, KeyError, TypeError):
                    error = raw[:200].decode(errors="replace")
                with lock:
                    results.append((status, seconds, tokens, error))
            conn.close()

        started = time.perf_counter()
        threads = [threading.Thread(target=client) for _ in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - started
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=60)

    ok = [r for r in results if r[0] == 200]
    rejected = [r for r in results if r[0] == 429]
    failed = [r for r in results if r[0] not in (200, 429)]
    latencies = [r[1] for r in ok]
    summary = {
        "clients": args.clients,
        "requests": len(results),
        "ok": len(ok),
        "rejected_429": len(rejected),
        "failed": len(failed),
        "wall_s": round(wall, 3),
        "requests_per_s": round(len(ok) / wall, 3) if wall > 0 else 0.0,
        "completion_tokens_per_s": round(sum(r[2] for r in ok) / wall, 1) if wall > 0 else 0.0,
        "latency_p50_s": round(percentile(latencies, 50), 3) if latencies else None,
        "latency_p99_s": round(percentile(latencies, 99), 3) if latencies else None,
        "latency_mean_s": round(statistics.fmean(latencies), 3) if latencies else None,
        "max_tokens": args.max_tokens,
        "image": not args.no_image,
    }
    if args.json:
        print(json.dumps(summary))
    else:
        for key, value in summary.items():
            print(f"{key:>24}: {value}")
    for status, _, _, error in failed[:5]:
        print(f"failure: status {status}: {error}", file=sys.stderr)
    return 1 if failed or len(results) < args.requests else 0


if __name__ == "__main__":
    sys.exit(main())
