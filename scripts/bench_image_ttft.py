"""Time to first token of a request with one large image, for two or more `llama3v` binaries side by side.

Each binary serves the same model (`llama3v serve`, loopback); each request sends one image as a data URL
and streams a greedy reply of one token; the time is from sending the request to the first content chunk.
The binaries alternate request by request, so load on a shared machine falls on all of them alike. The
server's peak resident memory over the run (VmHWM) is printed too.

Inputs: a 4000x3000 JPEG (quality 92) and a 4000x3000 PNG, made from scikit-image's photographs (the same
sources as scripts/bench_preprocess.py).

    .venv/bin/python scripts/bench_image_ttft.py --model models/default \\
        --binary old=/tmp/llama3v-old --binary new=target/release/llama3v [--requests 15]
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import re
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data


def make_inputs(work: Path) -> dict[str, str]:
    photo = Image.fromarray(data.astronaut()).resize((4000, 3000), Image.BICUBIC)
    jpeg, png = work / "photo.jpg", work / "photo.png"
    photo.save(jpeg, quality=92)
    Image.fromarray(np.asarray(data.coffee())).resize((4000, 3000), Image.BICUBIC).save(png)
    return {
        "4000x3000 JPEG": "data:image/jpeg;base64," + base64.b64encode(jpeg.read_bytes()).decode(),
        "4000x3000 PNG": "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode(),
    }


class Server:
    def __init__(self, binary: str, model: str, threads: int | None):
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".log")  # noqa: SIM115 (lives as long as the server)
        extra = ["--threads", str(threads)] if threads else []
        self.proc = subprocess.Popen(
            [binary, "serve", "--model", model, "--port", "0", *extra],
            stdout=subprocess.DEVNULL,
            stderr=self.log,
        )
        deadline = time.monotonic() + 120
        while True:
            found = re.search(r"listening on http://127\.0\.0\.1:(\d+)", Path(self.log.name).read_text())
            if found and "ready" in Path(self.log.name).read_text():
                self.port = int(found.group(1))
                return
            assert self.proc.poll() is None and time.monotonic() < deadline, Path(self.log.name).read_text()
            time.sleep(0.05)

    def ttft_ms(self, url: str) -> float:
        body = json.dumps(
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": url}},
                            {"type": "text", "text": "What color is the shape?"},
                        ],
                    }
                ],
                "max_tokens": 1,
                "temperature": 0,
                "ignore_eos": True,
                "stream": True,
            }
        ).encode()
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        start = time.perf_counter()
        conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200, response.read()
        while True:
            line = response.readline()
            assert line, "stream ended before any content"
            if line.startswith(b"data: {") and b'"content":"' in line and b'"content":""' not in line:
                elapsed = (time.perf_counter() - start) * 1e3
                break
        response.read()
        conn.close()
        return elapsed

    def peak_mib(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--binary", action="append", required=True, help="NAME=PATH, repeatable")
    ap.add_argument("--requests", type=int, default=15)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    binaries = dict(b.split("=", 1) for b in args.binary)
    with tempfile.TemporaryDirectory() as work:
        inputs = make_inputs(Path(work))
        for label, url in inputs.items():
            servers = {name: Server(path, args.model, args.threads) for name, path in binaries.items()}
            try:
                for server in servers.values():
                    server.ttft_ms(url)  # warm-up
                times: dict[str, list[float]] = {name: [] for name in servers}
                for _ in range(args.requests):
                    for name, server in servers.items():
                        times[name].append(server.ttft_ms(url))
                for name, server in servers.items():
                    t = times[name]
                    print(
                        f"{label}, {name}: TTFT median {statistics.median(t):.1f} ms, "
                        f"min {min(t):.1f} ms, max {max(t):.1f} ms over {len(t)}; "
                        f"server peak RSS {server.peak_mib():.0f} MiB"
                    )
            finally:
                for server in servers.values():
                    server.stop()


if __name__ == "__main__":
    main()
