#!/usr/bin/env python3
"""Hostile soak: normal chat completions mixed with every class of hostile request, from several clients at
once, against one `llama3v serve` on loopback, for a bounded time.

Each client draws request classes at random: normal greedy requests (streamed or not, whose answers must
equal `llama3v generate --temperature 0` on the same model), and hostile ones: malformed JSON, refused
fields, a declared body over the limit, a head or a body sent too slowly, 1.5 MiB of text, one 900 KiB
word, images over the request's pixel budget, a decompression-bomb header, too many images, an unknown
path and a wrong method, and clients that go away in the middle of a stream. Every answer must be the one
its class expects, in OpenAI's error shape. The server's resident memory is sampled all along: it must stay
flat (the median of the last third within --max-growth of the middle third's; the first third warms up),
under the memory budgets the server was given, and the running-requests gauge must return to 0 with the
server still alive.

    .venv/bin/python scripts/soak_hostile.py --model models/default --seconds 180 --clients 4

Exits 1 when any bound fails; prints a table of classes (count, expected answer, wrong answers, latency).
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
import zlib
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

from soak import free_port, rss_kib

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["What color is the shape?", "What shape is in the image?", "Describe the image."]
MAX_TOKENS = 12
HEADER_TIMEOUT_S = 2.0
BODY_TIMEOUT_S = 3.0
MIB = 1024 * 1024


def png(array) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(array).save(out, "PNG", compress_level=1)
    return out.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height and whose data is garbage: only the header can be read."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return len(data).to_bytes(4, "big") + body + zlib.crc32(body).to_bytes(4, "big")

    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"garbage") + chunk(b"IEND", b"")


class Client:
    """Plain HTTP on loopback; each call opens its own connection."""

    def __init__(self, port: int):
        self.port = port

    def send(self, method: str, path: str, body: bytes | None = None, timeout: float = 120) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            headers = {"Content-Type": "application/json"} if body is not None else {}
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def chat(self, body: dict | bytes, timeout: float = 120) -> tuple[int, bytes]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        return self.send("POST", "/v1/chat/completions", data, timeout)

    def raw(self, payload: bytes, wait: float) -> tuple[bytes, float]:
        """Sends `payload` and reads until the server answers or closes; gives what came and the time taken."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=wait) as s:
            start = time.monotonic()
            s.sendall(payload)
            got = b""
            try:
                while True:
                    piece = s.recv(65536)
                    if not piece:
                        break
                    got += piece
            except TimeoutError:
                pass
            return got, time.monotonic() - start


def error_of(raw: bytes) -> dict:
    error = json.loads(raw)["error"]
    if set(error) != {"message", "type", "param", "code"}:
        raise AssertionError(f"not OpenAI's error shape: {error}")
    return error


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, type=Path, help="model directory")
    ap.add_argument(
        "--image", type=Path, default=REPO / "models" / "example-shape.png", help="image of normal requests"
    )
    ap.add_argument("--binary", default=os.environ.get("LLAMA3V_BIN", str(REPO / "target/release/llama3v")))
    ap.add_argument("--seconds", type=float, default=180.0, help="how long clients keep sending")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--max-growth", type=float, default=0.10, help="allowed RSS median growth, last third vs middle")
    ap.add_argument(
        "--check-growth",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="fail on median growth (needs a run of minutes: the warm-up alone takes about a minute)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="write the report here")
    args = ap.parse_args()

    import numpy as np

    image_bytes = args.image.read_bytes()
    image = data_url(image_bytes)
    # The CLI's greedy answers, the reference for every normal request.
    expected = {}
    for prompt in PROMPTS:
        out = subprocess.run(
            [
                *(args.binary, "generate", "--model", str(args.model), "--image", str(args.image)),
                *("--prompt", prompt, "--max-new-tokens", str(MAX_TOKENS), "--temperature", "0", "--json"),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        expected[prompt] = json.loads(out.stdout)["text"]

    body_memory, decode_memory = 256 * MIB, 512 * MIB
    port = free_port()
    cmd = [args.binary, "serve", "--model", str(args.model), "--port", str(port), "--max-batch", "4"]
    cmd += ["--header-timeout-secs", str(HEADER_TIMEOUT_S), "--body-timeout-secs", str(BODY_TIMEOUT_S)]
    cmd += ["--body-memory", str(body_memory), "--decode-memory", str(decode_memory)]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = Client(port)
    deadline = time.monotonic() + 120
    while True:
        try:
            if client.send("GET", "/health", timeout=2)[0] == 200:
                break
        except OSError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            print("the server did not become healthy", file=sys.stderr)
            server.kill()
            return 1
        time.sleep(0.2)

    pixel_bomb_png = png(np.zeros((4100, 4096, 3), np.uint8))
    tiny_png = data_url(png(np.zeros((8, 8, 3), np.uint8)))

    def user(*parts: dict) -> list[dict]:
        return [{"role": "user", "content": list(parts)}]

    def text(t: str) -> dict:
        return {"type": "text", "text": t}

    def img(url: str) -> dict:
        return {"type": "image_url", "image_url": {"url": url}}

    def expect_error(status: int, code: str | None = None, param: str | None = None):
        def check(got: int, raw: bytes) -> str | None:
            if got != status:
                return f"HTTP {got}, expected {status}: {raw[:200]!r}"
            error = error_of(raw)
            if code is not None and error["code"] != code:
                return f"code {error['code']}, expected {code}"
            if param is not None and error["param"] != param:
                return f"param {error['param']}, expected {param}"
            return None

        return check

    def normal(rng: random.Random) -> str | None:
        prompt = rng.choice(PROMPTS)
        stream = rng.random() < 0.5
        body = {"messages": user(img(image), text(prompt)), "max_tokens": MAX_TOKENS, "temperature": 0}
        status, raw = client.chat({**body, "stream": stream})
        if status != 200:
            return f"HTTP {status}: {raw[:200]!r}"
        if stream:
            pieces = []
            for line in raw.decode().splitlines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    delta = json.loads(line[6:])["choices"]
                    pieces.extend(c["delta"].get("content", "") for c in delta)
            answer = "".join(pieces)
        else:
            answer = json.loads(raw)["choices"][0]["message"]["content"]
        return None if answer == expected[prompt] else f"answer {answer!r}, the CLI's {expected[prompt]!r}"

    def simple(body: dict | bytes, check) -> Callable[[random.Random], str | None]:
        return lambda rng: check(*client.chat(body))

    def declared_too_large(rng: random.Random) -> str | None:
        head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 67108864\r\n\r\n"
        got, seconds = client.raw(head, wait=10)
        if not got.startswith(b"HTTP/1.1 413"):
            return f"expected 413 at once, got {got[:80]!r}"
        return None if seconds < 2 else f"413 after {seconds:.1f} s"

    def slow_head(rng: random.Random) -> str | None:
        _, seconds = client.raw(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n", wait=HEADER_TIMEOUT_S + 5)
        if seconds > HEADER_TIMEOUT_S + 2:
            return f"a head never finished kept the connection {seconds:.1f} s (timeout {HEADER_TIMEOUT_S} s)"
        return None

    def slow_body(rng: random.Random) -> str | None:
        head = b'POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{"messages":'
        got, seconds = client.raw(head, wait=BODY_TIMEOUT_S + 5)
        if not got.startswith(b"HTTP/1.1 408"):
            return f"expected 408, got {got[:80]!r} after {seconds:.1f} s"
        return None if seconds < BODY_TIMEOUT_S + 2 else f"408 after {seconds:.1f} s"

    def goes_away(rng: random.Random) -> str | None:
        body = {"messages": user(text("hi")), "max_tokens": 200, "ignore_eos": True, "stream": True}
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        response.read(64)
        conn.close()
        return None if response.status == 200 else f"HTTP {response.status}"

    classes: dict[str, Callable[[random.Random], str | None]] = {
        "normal (greedy, = CLI)": normal,
        "malformed JSON": simple(b'{"messages": [', expect_error(400)),
        "refused field (logit_bias)": simple(
            {"messages": user(text("hi")), "logit_bias": {"1": 5}}, expect_error(400, param="logit_bias")
        ),
        "declared body over the limit": declared_too_large,
        "head too slow": slow_head,
        "body too slow": slow_body,
        "1.5 MiB of text": simple(
            {"messages": user(text("a " * (3 * MIB // 4)))}, expect_error(400, code="request_too_large")
        ),
        "one 900 KiB word": simple(
            {"messages": user(text("a" * (900 * 1024)))}, expect_error(400, code="context_length_exceeded")
        ),
        "pixels over the request budget": simple(
            {"messages": user(*[img(data_url(pixel_bomb_png))] * 4, text("?"))},
            expect_error(400, code="request_too_large"),
        ),
        "decompression-bomb header": simple(
            {"messages": user(img(data_url(png_claiming(100000, 100000))), text("?"))}, expect_error(400)
        ),
        "too many images": simple(
            {"messages": user(*[img(tiny_png)] * 5, text("?"))}, expect_error(400, code="request_too_large")
        ),
        "unknown path": lambda rng: expect_error(404)(*client.send("GET", "/v2/nothing")),
        "wrong method": lambda rng: expect_error(405)(*client.send("GET", "/v1/chat/completions")),
        "client goes away mid-stream": goes_away,
    }
    names = list(classes)
    weights = [8 if name.startswith("normal") else 1 for name in names]

    lock = threading.Lock()
    results: dict[str, list[tuple[float, str | None]]] = defaultdict(list)
    samples: list[tuple[float, int]] = []
    start = time.monotonic()
    stop_at = start + args.seconds

    def run_client(seed: int) -> None:
        rng = random.Random(seed)
        while time.monotonic() < stop_at:
            name = rng.choices(names, weights)[0]
            t = time.monotonic()
            try:
                problem = classes[name](rng)
            except Exception as e:  # every failure of a class is reported, not raised
                problem = f"{type(e).__name__}: {e}"
            with lock:
                results[name].append((time.monotonic() - t, problem))

    def sample_memory() -> None:
        while time.monotonic() < stop_at and server.poll() is None:
            samples.append((time.monotonic() - start, rss_kib(server.pid)))
            time.sleep(0.25)

    threads = [threading.Thread(target=run_client, args=(args.seed + i,)) for i in range(args.clients)]
    threads.append(threading.Thread(target=sample_memory))
    for t in threads:
        t.start()
    for t in threads:
        t.join(args.seconds + 300)
    hung = [t for t in threads if t.is_alive()]

    failures = [f"{len(hung)} client(s) still waiting 300 s after the end"] if hung else []
    alive = server.poll() is None
    running = None
    if alive:
        settle = time.monotonic() + 15
        while True:
            metrics = client.send("GET", "/metrics")[1].decode()
            running = next(
                float(line.split()[-1]) for line in metrics.splitlines() if line.startswith("llama3v_requests_running ")
            )
            if running == 0 or time.monotonic() > settle:
                break
            time.sleep(0.2)
    server.terminate()
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()
    if not alive:
        failures.append(f"the server exited with {server.returncode}")
    if running != 0:
        failures.append(f"llama3v_requests_running is {running} after the run")

    # The first third warms up (allocator arenas, ONNX Runtime's buffers for the largest shapes). The peak
    # is as high as the costly requests that happen to coincide, so flatness is judged on the median:
    # a leak moves the whole distribution, the last third's median above the middle third's.
    third = args.seconds / 3
    middle = sorted(kib for t, kib in samples if third <= t < 2 * third) or [0]
    last = sorted(kib for t, kib in samples if t >= 2 * third) or [0]
    first, second = middle[len(middle) // 2], last[len(last) // 2]
    growth = (second - first) / first if first else float("inf")
    if args.check_growth and growth > args.max_growth:
        failures.append(
            f"RSS median grew {growth:+.1%} from the middle third to the last (limit {args.max_growth:.0%})"
        )
    baseline = samples[0][1] if samples else 0
    bound_mib = (body_memory + decode_memory) / MIB
    peak_over = (max(kib for _, kib in samples) - baseline) / 1024 if samples else float("inf")
    if peak_over > bound_mib:
        failures.append(f"RSS peak {peak_over:.0f} MiB over the start, above the memory budgets' {bound_mib:.0f} MiB")

    print(f"{'class':<32} {'sent':>5} {'wrong':>5} {'p50 s':>7} {'max s':>7}")
    table = {}
    for name in names:
        got = results.get(name, [])
        wrong = [p for _, p in got if p]
        times = sorted(s for s, _ in got)
        p50 = times[len(times) // 2] if times else 0.0
        top = times[-1] if times else 0.0
        print(f"{name:<32} {len(got):>5} {len(wrong):>5} {p50:>7.2f} {top:>7.2f}")
        table[name] = {"sent": len(got), "wrong": len(wrong), "p50_s": round(p50, 3), "max_s": round(top, 3)}
        failures.extend(f"{name}: {p}" for p in wrong[:3])
    report = {
        "seconds": args.seconds,
        "clients": args.clients,
        "classes": table,
        "rss_mib": {
            "start": round(baseline / 1024, 1),
            "middle_third": {"min": middle[0] / 1024, "median": first / 1024, "max": middle[-1] / 1024},
            "last_third": {"min": last[0] / 1024, "median": second / 1024, "max": last[-1] / 1024},
            "peak_over_start": round(peak_over, 1),
            "bound_over_start": bound_mib,
        },
        "failures": failures,
    }
    if args.json:
        args.json.write_text(json.dumps({**report, "rss_kib_samples": samples}, indent=2))
    print(
        f"RSS MiB: start {baseline / 1024:.0f}; middle third min/median/max {middle[0] / 1024:.0f}/{first / 1024:.0f}/"
        f"{middle[-1] / 1024:.0f}, last third {last[0] / 1024:.0f}/{second / 1024:.0f}/{last[-1] / 1024:.0f} "
        f"(median {growth:+.1%}, limit {args.max_growth:.0%}); peak over start {peak_over:.0f} (bound {bound_mib:.0f})"
    )
    for failure in failures:
        print(f"FAILED: {failure}", file=sys.stderr)
    print(f"hostile soak {'PASSED' if not failures else 'FAILED'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
