"""Preprocessing speed, Rust runtime vs transformers' SigLIP processor (PIL backend), in one run.

Both sides start from the encoded file and end with normalized float32 pixel values: decode, RGB, bicubic
resize, rescale, normalize. The Rust side is timed as a whole `llama3v preprocess` process (start-up and
writing the .npy included); the Python side in-process (no interpreter start-up), so the ratio favours
Python. Each prints the median of --repeats runs after one warm-up, and the two outputs are compared.

    .venv/bin/python scripts/bench_preprocess.py [--llama3v target/release/llama3v] [--size 384] [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data
from transformers import SiglipImageProcessorPil


def make_inputs(work: Path) -> dict[str, Path]:
    """A 4000x3000 JPEG and a 1024x1024 PNG made from real photographs shipped with scikit-image."""
    jpeg = work / "photo-4000x3000.jpg"
    Image.fromarray(data.astronaut()).resize((4000, 3000), Image.BICUBIC).save(jpeg, quality=92)
    png = work / "photo-1024x1024.png"
    Image.fromarray(data.coffee()).resize((1024, 1024), Image.BICUBIC).save(png)
    return {"4000x3000 JPEG": jpeg, "1024x1024 PNG": png}


def median_seconds(run, repeats: int) -> float:
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama3v", default="target/release/llama3v")
    parser.add_argument("--size", type=int, default=384)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    processor = SiglipImageProcessorPil(
        size={"height": args.size, "width": args.size},
        resample=Image.BICUBIC,
        rescale_factor=1 / 255,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    print(f"{'input':<16} {'llama3v ms':>11} {'python ms':>10} {'speed-up':>9} {'max abs diff':>13}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for label, path in make_inputs(work).items():
            out = work / "pixels.npy"
            command = [args.llama3v, "preprocess", "--image", str(path), "--size", str(args.size), "--out", str(out)]

            def rust(command=command):
                subprocess.run(command, check=True, capture_output=True)

            def python(path=path):
                with Image.open(path) as image:
                    return processor(images=image, return_tensors="np")["pixel_values"][0]

            rust_s = median_seconds(rust, args.repeats)
            python_s = median_seconds(python, args.repeats)
            diff = float(np.abs(np.load(out) - python()).max())
            print(f"{label:<16} {rust_s * 1e3:>11.1f} {python_s * 1e3:>10.1f} {python_s / rust_s:>8.2f}x {diff:>13.2e}")


if __name__ == "__main__":
    main()
