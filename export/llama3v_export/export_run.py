"""What an export run reports and leaves behind, for both checkpoint layouts: the result, progress lines with
the process's memory, and the output directory cleared of an earlier run's results."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .validate import Comparison

FLOAT_DTYPES = {"fp32": "float32", "fp16": "float16"}


@dataclass
class ExportResult:
    model_dir: Path
    manifest: dict
    comparisons: list[Comparison] = field(default_factory=list)
    reference: dict | None = None
    # fp16/int4 with --reference: free-running greedy tokens equal to fp32 transformers' (equal, prefix, tokens).
    greedy: tuple[int, int, int] | None = None


def progress_log(log: Callable[[str], None]) -> Callable[[str], None]:
    """`log` with each line prefixed by the seconds since this call and the process's memory."""
    start = time.perf_counter()

    def step(message: str) -> None:
        log(f"[{time.perf_counter() - start:6.1f} s, {_resident()}] {message}")

    return step


def clear_results(out: Path) -> None:
    """Create `out`; results of an earlier export into it (manifest, reference cases) must not outlive it."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").unlink(missing_ok=True)
    if (out / "reference" / "reference.json").is_file():
        shutil.rmtree(out / "reference")


def _resident() -> str:
    """This process's resident memory now and at its peak, for progress lines (Linux; empty elsewhere)."""
    try:
        status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    except OSError:
        return "memory n/a"
    gib = {k: int(status[k].split()[0]) / 2**20 for k in ("VmRSS", "VmHWM", "RssFile") if k in status}
    # File-backed pages (mapped weights) count in the resident total but go back to the page cache under pressure.
    mapped = f" ({gib['RssFile']:.2f} mapped)" if "RssFile" in gib else ""
    return f"RSS {gib['VmRSS']:.2f} GiB{mapped}, peak {gib['VmHWM']:.2f} GiB"
