"""Shared by the end-to-end tests: running the `llama3v` binary and reading reference cases."""

import json
import os
import subprocess
from pathlib import Path

from safetensors.numpy import load_file

REPO = Path(__file__).resolve().parents[2]


def binary() -> str:
    return os.environ.get("LLAMA3V_BIN", str(REPO / "target" / "release" / "llama3v"))


def llama3v(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Runs the CLI and returns the finished process (stdout and stderr as text)."""
    return subprocess.run([binary(), *args], capture_output=True, text=True, timeout=timeout, check=False)


def load_reference(model_dir: Path) -> dict:
    """reference.json with each case's `input_ids` added as a list, read from its tensors file."""
    ref_dir = Path(model_dir) / "reference"
    index = json.loads((ref_dir / "reference.json").read_text())
    for case in index["cases"]:
        tensors = load_file(str(ref_dir / case["tensors"]))
        case["input_ids"] = tensors["input_ids"].reshape(-1).tolist()
    return index


def case_args(model_dir: Path, case: dict) -> list[str]:
    """`generate` arguments for a reference case: model, prompt, its images from reference/, system prompt."""
    args = ["--model", str(model_dir), "--prompt", case["prompt"]]
    for image in case["images"]:
        args += ["--image", str(Path(model_dir) / "reference" / image)]
    if case.get("system"):
        args += ["--system", case["system"]]
    return args
