"""Session fixtures: tiny random-weight checkpoints exported once per test session and shared by every test file.

- `tiny_models`: {preset: model directory} for every tiny preset, fp32, with reference cases.
- `fp16_model`: the fp16 export (with reference cases) of FP16_PRESET.
- `exports`: the cache behind both; `exports.result(preset, dtype)` also gives the export's validation results.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
from llama3v_export.cli import export_model
from llama3v_export.export_run import ExportResult
from llama3v_export.tiny import TINY_PRESETS, make_checkpoint

# GQA 4 and three layers: the preset where half precision has the most room to drift.
FP16_PRESET = "tiny-c"


@dataclass
class Exports:
    """Checkpoints and model directories under one session directory, each made on first request."""

    root: Path
    results: dict[tuple[str, str], ExportResult] = field(default_factory=dict)
    logs: dict[tuple[str, str], list[str]] = field(default_factory=dict)

    def checkpoint(self, preset: str) -> Path:
        path = self.root / "checkpoints" / preset
        if not (path / "config.json").is_file():
            make_checkpoint(preset, path, seed=0)
        return path

    def result(self, preset: str, dtype: str = "fp32") -> ExportResult:
        key = (preset, dtype)
        if key not in self.results:
            lines: list[str] = []
            out = self.root / "models" / f"{preset}-{dtype}"
            self.results[key] = export_model(self.checkpoint(preset), out, dtype, reference=True, log=lines.append)
            self.logs[key] = lines
        return self.results[key]

    def model_dir(self, preset: str, dtype: str = "fp32") -> Path:
        return self.result(preset, dtype).model_dir


@pytest.fixture(scope="session")
def exports(tmp_path_factory: pytest.TempPathFactory) -> Exports:
    return Exports(tmp_path_factory.mktemp("llama3v-exports"))


@pytest.fixture(scope="session")
def tiny_models(exports: Exports) -> dict[str, Path]:
    return {preset: exports.model_dir(preset) for preset in TINY_PRESETS}


@pytest.fixture(scope="session")
def fp16_model(exports: Exports) -> Path:
    return exports.model_dir(FP16_PRESET, "fp16")
