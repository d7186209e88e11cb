#!/usr/bin/env python3
"""Soak run: many consecutive generations in one `llama3v serve` process, watching its resident memory.

One server process loads the model once and answers N chat completions one after another with varied
input: text-only and with one or two images of different sizes and formats, different prompt lengths,
greedy and seeded sampling (temperature, top-k, top-p, repetition penalty), streamed and not, and a few
requests that must be refused (bad image, over-long max_tokens) mixed in. After each request the
server's VmRSS is read from /proc. Memory growth is measured from the end of the warm-up to the last
request (and to the peak after warm-up); the run passes when both stay within --max-growth and no
request that should succeed failed.

    .venv/bin/python scripts/soak.py --model models/default --requests 500

A benchmark-style script, not a CI test: it prints a report (and --json writes one) and exits 1 when the
run fails its bounds.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import random
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

PROMPTS = [
    "What is in this image?",
    "Describe the picture in one sentence.",
    "hi",
    "Write a haiku about the sea. " * 3,
    "Ünïcödé, 你好, emoji 😀 and {{ jinja }} <|eot_id|> in the prompt.",
    "List three colours.",
]


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


MAX_SIDE = 600
MAX_TOKENS = 24
# The first requests are the largest of the mix (two of the largest images, the longest prompt, the most
# new tokens), so the warm-up reaches the steady-state working set (allocator arenas, ONNX Runtime's
# buffers for the largest shapes) and growth after it is what more requests add.
LARGEST_FIRST = 8


def image_url(rng: random.Random, largest: bool = False) -> str:
    """A random image as a data URL: PNG, JPEG or WebP, 16..MAX_SIDE pixels a side, RGB or RGBA."""
    import numpy as np
    from PIL import Image

    w, h = (MAX_SIDE, MAX_SIDE) if largest else (rng.randint(16, MAX_SIDE), rng.randint(16, MAX_SIDE))
    mode = rng.choice(["RGB", "RGBA"])
    arr = np.random.default_rng(rng.randint(0, 2**31)).integers(0, 255, (h, w, len(mode)), dtype=np.uint8)
    fmt, mime = rng.choice([("PNG", "png"), ("JPEG", "jpeg"), ("WEBP", "webp")])
    img = Image.fromarray(arr, mode)
    if fmt == "JPEG":
        img = img.convert("RGB")
    buf = io.BytesIO()
    img.save(buf, fmt)
    return f"data:image/{mime};base64," + base64.b64encode(buf.getvalue()).decode()


def make_request(i: int, rng: random.Random) -> tuple[dict, bool]:
    """The i-th request and whether it should succeed."""
    kind = i % 25
    if kind == 24:
        # Refused: an image that is not an image.
        bad = "data:image/png;base64," + base64.b64encode(b"not a png at all").decode()
        content = [{"type": "image_url", "image_url": {"url": bad}}, {"type": "text", "text": "?"}]
        return {"messages": [{"role": "user", "content": content}], "max_tokens": 4}, False
    if kind == 12:
        # Refused: more new tokens than the context holds.
        return {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**7}, False
    largest = i < LARGEST_FIRST
    n_images = 2 if largest else rng.choice([0, 0, 1, 1, 2])
    content: list[dict] = [
        {"type": "image_url", "image_url": {"url": image_url(rng, largest)}} for _ in range(n_images)
    ]
    content.append({"type": "text", "text": max(PROMPTS, key=len) if largest else rng.choice(PROMPTS)})
    messages = [{"role": "user", "content": content}]
    if largest or rng.random() < 0.3:
        messages.insert(0, {"role": "system", "content": "You are terse."})
    body: dict = {
        "messages": messages,
        "max_tokens": MAX_TOKENS if largest else rng.randint(1, MAX_TOKENS),
        "ignore_eos": largest or rng.random() < 0.5,
    }
    if rng.random() < 0.5:
        body.update(temperature=0.0)
    else:
        body.update(temperature=rng.uniform(0.2, 1.5), top_p=rng.uniform(0.5, 1.0), seed=rng.randint(0, 1000))
        if rng.random() < 0.5:
            body["top_k"] = rng.randint(1, 50)
        if rng.random() < 0.3:
            body["repetition_penalty"] = rng.uniform(1.0, 1.5)
    body["stream"] = rng.random() < 0.3
    return body, True


def post(url: str, body: dict, timeout: float) -> tuple[int, str]:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, type=Path, help="model directory (a tiny export)")
    ap.add_argument("--binary", default=os.environ.get("LLAMA3V_BIN", str(REPO / "target/release/llama3v")))
    ap.add_argument("--requests", type=int, default=500)
    ap.add_argument("--warmup", type=int, default=50, help="requests before the baseline RSS is taken")
    ap.add_argument("--max-growth", type=float, default=0.10, help="allowed RSS growth after warm-up")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    ap.add_argument("--json", type=Path, help="write the report here")
    args = ap.parse_args()

    port = free_port()
    cmd = [args.binary, "serve", "--model", str(args.model), "--port", str(port), "--threads", str(args.threads)]
    cmd += ["--max-batch", "1"]
    log = open(os.devnull, "w")  # noqa: SIM115 (lives as long as the server)
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            if server.poll() is not None:
                print(f"server exited with {server.returncode}: {server.stderr.read()}", file=sys.stderr)
                return 1
            try:
                with urllib.request.urlopen(base + "/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError):
                pass
            if time.time() > deadline:
                print("server did not become healthy in 120 s", file=sys.stderr)
                return 1
            time.sleep(0.2)

        rng = random.Random(args.seed)
        samples: list[int] = []
        failures: list[str] = []
        latencies: list[float] = []
        refused_ok = 0
        start = time.time()
        for i in range(args.requests):
            body, should_succeed = make_request(i, rng)
            t = time.time()
            status, text = post(base + "/v1/chat/completions", body, args.timeout)
            latencies.append(time.time() - t)
            if server.poll() is not None:
                failures.append(f"request {i}: the server exited with {server.returncode}")
                break
            if should_succeed and status != 200:
                failures.append(f"request {i}: HTTP {status}: {text[:300]}")
            elif not should_succeed:
                if 400 <= status < 500:
                    refused_ok += 1
                else:
                    failures.append(f"request {i}: expected a 4xx refusal, got HTTP {status}: {text[:300]}")
            samples.append(rss_kib(server.pid))
            if (i + 1) % 50 == 0:
                print(f"{i + 1:4d} requests  rss {samples[-1] / 1024:8.1f} MiB  failures {len(failures)}", flush=True)
        elapsed = time.time() - start
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()

    warm = min(args.warmup, len(samples)) - 1
    baseline = samples[warm] if samples else 0
    after = samples[warm:] or [0]
    final_growth = (samples[-1] - baseline) / baseline if baseline else float("inf")
    peak_growth = (max(after) - baseline) / baseline if baseline else float("inf")
    mid = after[len(after) // 2]
    late_growth = (after[-1] - mid) / mid if mid else float("inf")
    report = {
        "model": str(args.model),
        "requests": len(samples),
        "seconds": round(elapsed, 1),
        "mean_latency_ms": round(1e3 * sum(latencies) / max(len(latencies), 1), 1),
        "expected_refusals_ok": refused_ok,
        "failures": failures,
        "rss_mib": {
            "first": round(samples[0] / 1024, 1) if samples else None,
            "after_warmup": round(baseline / 1024, 1),
            "final": round(samples[-1] / 1024, 1) if samples else None,
            "peak_after_warmup": round(max(after) / 1024, 1),
        },
        # A leak shows as steady growth: the second half after warm-up against the first half.
        "growth_second_half": round(late_growth, 4),
        "growth_final": round(final_growth, 4),
        "growth_peak": round(peak_growth, 4),
        "max_growth": args.max_growth,
    }
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps({**report, "rss_kib_after_each_request": samples}, indent=2))
    ok = not failures and len(samples) == args.requests and peak_growth <= args.max_growth
    print(
        f"soak {'PASSED' if ok else 'FAILED'}: {len(samples)} requests, {len(failures)} failures, "
        f"RSS growth after warm-up {final_growth:+.1%} final / {peak_growth:+.1%} peak (limit {args.max_growth:.0%}), "
        f"{late_growth:+.2%} over the second half"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
