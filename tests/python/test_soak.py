"""A short hostile soak against `llama3v serve` on the default model (scripts/soak_hostile.py): normal
greedy requests, whose answers must equal `llama3v generate`'s, mixed with every class of hostile request
from four clients; every class must get its expected answer, nothing may hang, the running-requests gauge
must return to 0 and the server's peak stay within the memory budgets it was given.

Flatness of memory over time needs minutes (the warm-up alone takes about a minute on this machine), so
this run does not judge it; the recorded runs of several minutes in docs/PERFORMANCE.md do.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from helpers import binary

REPO = Path(__file__).resolve().parents[2]


def test_hostile_soak_answers_every_class_and_stays_within_the_budgets(tmp_path: Path) -> None:
    report = tmp_path / "soak.json"
    command = [sys.executable, str(REPO / "scripts" / "soak_hostile.py"), "--model", str(REPO / "models" / "default")]
    command += ["--seconds", "60", "--clients", "4", "--no-check-growth", "--json", str(report)]
    env = {**os.environ, "LLAMA3V_BIN": binary()}
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
