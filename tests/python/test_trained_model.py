"""The trained default model (models-src/shapes, exported with reference cases) answers the task's three
questions on freshly generated images through the CLI, and `llama3v check` passes on it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from helpers import REPO, llama3v
from llama3v_export.cli import export_model

CHECKPOINT = REPO / "models-src" / "shapes"
# Not the training seed (0) nor the evaluation command's default (1000).
TEST_SEED = 2000
TEST_IMAGES = 6


def shapes_module():
    sys.path.insert(0, str(REPO / "train"))
    from llama3v_train import shapes

    return shapes


@pytest.fixture(scope="session")
def trained_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("llama3v-trained") / "shapes"
    return export_model(CHECKPOINT, out, "fp32", reference=True, log=lambda _: None).model_dir


def test_check_passes_on_trained_model(trained_model):
    proc = llama3v("check", "--model", str(trained_model))
    print(proc.stdout, proc.stderr)
    assert proc.returncode == 0, f"check failed\n{proc.stdout}\n{proc.stderr}"


def test_trained_model_answers_fresh_images(trained_model, tmp_path):
    shapes = shapes_module()
    wrong = []
    for index in range(TEST_IMAGES):
        sample = shapes.make_sample(TEST_SEED, index)
        image = tmp_path / f"shape_{index}.png"
        sample.image.save(image)
        for kind, question in shapes.QUESTIONS.items():
            want = shapes.answer(kind, sample.shape, sample.color, sample.background)
            args = ["generate", "--model", str(trained_model), "--image", str(image), "--prompt", question]
            proc = llama3v(*args, "--temperature", "0", "--json")
            assert proc.returncode == 0, proc.stderr
            got = json.loads(proc.stdout)["text"]
            print(f"{image.name} {sample.image.size} {question!r}: {got!r} (want {want!r})")
            if got != want:
                wrong.append((image.name, question, got, want))
    assert not wrong, f"{len(wrong)} of {TEST_IMAGES * len(shapes.QUESTIONS)} answers wrong: {wrong}"
