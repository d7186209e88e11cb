#!/usr/bin/env python3
"""Peak memory and time of one `llama3v-export` run, against the export's memory bound.

Runs the exporter as a child process and reports: the peak resident memory of the child and its descendants (the
kernel's own maximum from wait4, and the peak of the process tree's summed VmRSS polled every 50 ms), wall time,
the output's size, the largest graph's weights and the bound `1.25 x largest graph + 2 GiB`. With `--floor`, it also
times writing the same weights with the checkpoint already in memory (each tensor converted to the export dtype
and written to a file in the output directory), the time the streaming export is measured against.

    flock /tmp/llama3v-heavy.lock .venv/bin/python scripts/export_memory.py --checkpoint CKPT --out OUT \\
        [--floor] [--json FILE] -- --dtype fp16 [other llama3v-export options]

A benchmark, not a test: it prints a report and exits 1 when the peak passes the bound.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GIB = 2**30
BOUND_FACTOR = 1.25
BOUND_WORKING_SET = 2 * GIB
GRAPHS = ("vision", "embed", "decoder")


def tree_rss(root: int) -> int:
    """Summed VmRSS (bytes) of `root` and every descendant."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            status = Path(f"/proc/{entry}/status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        pid, ppid = int(entry), int(fields["PPid"])
        children.setdefault(ppid, []).append(pid)
        rss[pid] = int(fields.get("VmRSS", "0 kB").split()[0]) * 1024
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        total += rss.get(pid, 0)
        stack.extend(children.get(pid, []))
    return total


def graph_bytes(out: Path) -> dict[str, int]:
    return {g: sum(p.stat().st_size for p in out.glob(f"{g}.onnx*")) for g in GRAPHS}


def run_export(exporter: str, checkpoint: Path, out: Path, args: list[str]) -> dict:
    command = [exporter, "--checkpoint", str(checkpoint), "--out", str(out), *args]
    start = time.perf_counter()
    proc = subprocess.Popen(command)
    peak = 0
    done = threading.Event()

    def poll() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, tree_rss(proc.pid))
            time.sleep(0.05)

    poller = threading.Thread(target=poll)
    poller.start()
    _, status, usage = os.wait4(proc.pid, 0)
    done.set()
    poller.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {
        "command": command,
        "returncode": proc.returncode,
        "seconds": time.perf_counter() - start,
        "peak_rss_bytes": usage.ru_maxrss * 1024,
        "peak_tree_rss_bytes": peak,
    }


def write_floor(checkpoint: Path, out: Path, dtype: str) -> float:
    """Seconds to convert every checkpoint tensor to `dtype` and write it, the checkpoint already in memory."""
    import torch
    from safetensors.torch import load_file

    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16}[dtype]
    tensors = {}
    for shard in sorted(checkpoint.glob("*.safetensors")):
        tensors.update(load_file(str(shard)))
    target = out / "floor.bin"
    start = time.perf_counter()
    with target.open("wb") as f:
        for tensor in tensors.values():
            f.write(tensor.to(torch_dtype).numpy().tobytes())
    seconds = time.perf_counter() - start
    target.unlink()
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--exporter", default=str(REPO / ".venv" / "bin" / "llama3v-export"))
    parser.add_argument("--floor", action="store_true", help="also time writing the weights from memory")
    parser.add_argument("--json", type=Path, help="append the report as one JSON line to this file")
    parser.add_argument("export_args", nargs="*", help="llama3v-export options, after --")
    args = parser.parse_args()
    report = run_export(args.exporter, args.checkpoint, args.out, args.export_args)
    sizes = graph_bytes(args.out)
    largest = max(sizes.values())
    bound = BOUND_FACTOR * largest + BOUND_WORKING_SET
    report.update(
        {
            "args": args.export_args,
            "graph_bytes": sizes,
            "output_bytes": sum(sizes.values()),
            "bound_bytes": int(bound),
            "within_bound": report["peak_rss_bytes"] <= bound and report["peak_tree_rss_bytes"] <= bound,
        }
    )
    if args.floor:
        dtype = "fp16" if "fp16" in args.export_args else "fp32"
        report["floor_seconds"] = write_floor(args.checkpoint, args.out, dtype)
    print(
        f"{' '.join(args.export_args)}: exit {report['returncode']}, {report['seconds']:.1f} s, "
        f"peak RSS {report['peak_rss_bytes'] / GIB:.2f} GiB (process tree, polled: "
        f"{report['peak_tree_rss_bytes'] / GIB:.2f} GiB), output {report['output_bytes'] / GIB:.2f} GiB, "
        f"largest graph {largest / GIB:.2f} GiB, bound {bound / GIB:.2f} GiB: "
        f"{'within' if report['within_bound'] else 'OVER'}"
        + (f"; writing the same weights from memory {report['floor_seconds']:.1f} s" if args.floor else "")
    )
    if args.json:
        with args.json.open("a") as f:
            f.write(json.dumps(report) + "\n")
    return 0 if report["returncode"] == 0 and report["within_bound"] else 1


if __name__ == "__main__":
    sys.exit(main())
