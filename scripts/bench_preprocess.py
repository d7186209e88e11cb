"""Preprocessing speed, Rust runtime vs transformers' SigLIP processor (PIL backend), in one run.

Both sides start from the encoded file and end with normalized float32 pixel values: read the file,
decode, convert to RGB, bicubic resize, rescale, normalize. Both are timed in process:

- llama3v: `llama3v preprocess --repeat N --json` runs the whole preprocessing N times in one process
  and reports the median time of each stage (read, decode, convert, resize, normalize) and of the
  whole. It runs with `--threads 1`, with one thread per core, and with one thread per core and
  `--whole-image` (decode the whole image, then resize: the path `generate` and `serve` take).
- Python: `PIL.Image.open(path)` + `SiglipImageProcessorPil(images=image)` (which decodes, converts,
  resizes, rescales and normalizes), N times after one warm-up; the median, and apart the median of
  `Image.open` + `load()` alone (read + decode).

The two sides alternate for --rounds rounds; each figure is the median over rounds of the per-round
medians. On a machine shared with other jobs, the fastest single run of each side (printed last) is the
least disturbed estimate. The start-up cost of a whole `llama3v preprocess` process (what one command-line call adds on
top of the in-process time) is measured separately. The outputs of the two are compared.

    .venv/bin/python scripts/bench_preprocess.py [--llama3v target/release/llama3v] [--size 384] \
        [--repeats 15] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data
from transformers import SiglipImageProcessorPil

STAGES = ["read", "decode", "convert", "resize", "normalize", "total"]


def make_inputs(work: Path) -> dict[str, Path]:
    """A 4000x3000 JPEG and a 1024x1024 PNG made from real photographs shipped with scikit-image."""
    jpeg = work / "photo-4000x3000.jpg"
    Image.fromarray(data.astronaut()).resize((4000, 3000), Image.BICUBIC).save(jpeg, quality=92)
    png = work / "photo-1024x1024.png"
    Image.fromarray(data.coffee()).resize((1024, 1024), Image.BICUBIC).save(png)
    return {"4000x3000 JPEG": jpeg, "1024x1024 PNG": png}


def timings_ms(run, repeats: int) -> list[float]:
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def median_ms(run, repeats: int) -> float:
    return statistics.median(timings_ms(run, repeats))


def rust_stages(command: list[str], repeats: int, threads: int, *extra: str) -> dict[str, float]:
    """Per-stage medians (ms) from one `llama3v preprocess --repeat` process."""
    proc = subprocess.run(
        [*command, "--repeat", str(repeats), "--json", "--threads", str(threads), *extra],
        check=True,
        capture_output=True,
        text=True,
    )
    report = json.loads(proc.stdout)
    return {
        **report["median_ms"],
        "threads": report["threads"],
        "first": report["first_run_ms"],
        "write": report["write_npy_ms"],
        "min": report["min_total_ms"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama3v", default="target/release/llama3v")
    parser.add_argument("--size", type=int, default=384)
    parser.add_argument("--repeats", type=int, default=15, help="timed runs per round and side")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    processor = SiglipImageProcessorPil(
        size={"height": args.size, "width": args.size},
        resample=Image.BICUBIC,
        rescale_factor=1 / 255,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    print(f"{os.cpu_count()} CPUs, load average at start {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for label, path in make_inputs(work).items():
            out = work / "pixels.npy"
            command = [args.llama3v, "preprocess", "--image", str(path), "--size", str(args.size), "--out", str(out)]

            def python(path=path):
                with Image.open(path) as image:
                    return processor(images=image, return_tensors="np")["pixel_values"][0]

            def python_decode(path=path):
                with Image.open(path) as image:
                    image.load()

            rounds: list[dict[str, object]] = []
            for _ in range(args.rounds):
                rounds.append(
                    {
                        "one": rust_stages(command, args.repeats, 1),
                        "all": rust_stages(command, args.repeats, 0),
                        "whole": rust_stages(command, args.repeats, 0, "--whole-image"),
                        "python_runs": timings_ms(python, args.repeats),
                        "python_decode": median_ms(python_decode, args.repeats),
                    }
                )

            def over_rounds(pick, rounds=rounds) -> float:
                return statistics.median(pick(r) for r in rounds)

            process_ms = median_ms(lambda c=command: subprocess.run(c, check=True, capture_output=True), args.repeats)
            python_ms = over_rounds(lambda r: statistics.median(r["python_runs"]))
            python_min = min(min(r["python_runs"]) for r in rounds)
            python_decode_ms = over_rounds(lambda r: r["python_decode"])
            diff = float(np.abs(np.load(out) - python()).max())

            print(f"\n{label} -> {args.size}x{args.size}, median of {args.rounds} rounds x {args.repeats} runs")
            header = "".join(f"{s:>11}" for s in STAGES)
            print(f"{'':<36}{header}{'vs python':>11}")
            for key in ("one", "all", "whole"):
                threads = rounds[0][key]["threads"]
                name = f"llama3v, {threads} thread(s)" + (", whole image" if key == "whole" else "")
                stages = {s: over_rounds(lambda r, k=key, s=s: r[k][s]) for s in STAGES}
                cells = "".join(f"{stages[s]:>11.2f}" for s in STAGES)
                print(f"{name + ', ms':<36}{cells}{python_ms / stages['total']:>10.2f}x")
            # Python's decode column is Image.open + load (file read included).
            print(f"{'python, ms':<36}{'':>11}{python_decode_ms:>11.2f}{'':>33}{python_ms:>11.2f}")
            first_ms = over_rounds(lambda r: r["all"]["first"])
            write_ms = over_rounds(lambda r: r["all"]["write"])
            print(
                f"whole `llama3v preprocess` process (one thread per core), 1 image: {process_ms:.2f} ms; in such a "
                f"process the first (cold) preprocessing takes {first_ms:.2f} ms and writing the .npy {write_ms:.2f} ms"
            )
            print(f"max abs diff vs python: {diff:.2e}")
            fastest = {key: min(r[key]["min"] for r in rounds) for key in ("one", "all", "whole")}
            print(
                f"fastest single runs (least disturbed): python {python_min:.2f} ms; llama3v 1 thread "
                f"{fastest['one']:.2f} ms ({python_min / fastest['one']:.2f}x), one per core {fastest['all']:.2f} ms "
                f"({python_min / fastest['all']:.2f}x), whole image {fastest['whole']:.2f} ms "
                f"({python_min / fastest['whole']:.2f}x)"
            )
    print(f"\nload average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
