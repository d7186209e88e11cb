"""The MiniCPM-Llama3-V 2.5 layout end to end: a random-weight `tiny-minicpmv` checkpoint in the published layout,
exported (graphs validated against the PyTorch reference in llama3v_export.minicpmv), then checked and run by the
runtime: slice pixels bit-identical to the reference on photographs of many sizes and aspect ratios, prompt ids
equal, `check` within LLaVA's tolerances, and `generate` token for token equal to PyTorch's greedy decoding."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from helpers import case_args, llama3v, load_reference
from llama3v_export import minicpmv as mcv
from llama3v_export.checkpoint import CheckpointError
from llama3v_export.cli import export_model
from llama3v_export.minicpmv_tiny import make_minicpmv_checkpoint
from PIL import Image
from safetensors.numpy import load_file, save_file

PRESET = "tiny-minicpmv"


@pytest.fixture(scope="module")
def minicpmv(tmp_path_factory):
    """(checkpoint, model directory, export result) of the tiny preset, fp32 with reference cases."""
    root = tmp_path_factory.mktemp("minicpmv")
    checkpoint = make_minicpmv_checkpoint(PRESET, root / "checkpoint")
    result = export_model(checkpoint, root / "model", reference=True, log=lambda _: None)
    return checkpoint, result.model_dir, result


def test_export_validates_every_graph_and_case(minicpmv):
    _, model_dir, result = minicpmv
    for c in result.comparisons:
        print(c.line())
    labels = " ".join(c.label for c in result.comparisons)
    for stage in ("vision image_features", "embed", "decoder logits", "reference sliced_image image_features"):
        assert stage in labels
    assert all(c.passed for c in result.comparisons)
    manifest = json.loads((model_dir / "manifest.json").read_text())
    assert manifest["layout"] == "minicpmv"
    assert manifest["minicpmv"]["query_num"] == 96
    assert manifest["image"]["image_token"] == mcv.PLACEHOLDER
    assert manifest["graphs"]["vision"]["inputs"][0]["shape"] == ["batch", 3, "height", "width"]
    sliced = result.reference["cases"][0]
    assert sliced["name"] == "sliced_image" and sliced["slices"] > 1, "the first case must need slicing"


def test_check_passes_with_llava_tolerances(minicpmv):
    _, model_dir, _ = minicpmv
    out = llama3v("check", "--model", str(model_dir))
    print(out.stdout)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "check passed" in out.stdout
    # Pixels bit-identical, ids equal, on every case with images.
    for line in out.stdout.splitlines():
        if line.strip().startswith(("pixel_values", "input_ids")):
            assert line.split()[1] == "0.000e0", line


def test_generate_is_token_for_token_the_reference(minicpmv):
    _, model_dir, _ = minicpmv
    for case in load_reference(model_dir)["cases"]:
        args = [*case_args(model_dir, case), "--temperature", "0", "--max-new-tokens", "32", "--ignore-eos", "--json"]
        out = llama3v("generate", *args)
        assert out.returncode == 0, out.stderr
        got = json.loads(out.stdout)
        equal = sum(a == b for a, b in zip(got["tokens"], case["greedy_tokens"], strict=False))
        print(f"{case['name']}: {equal}/{len(case['greedy_tokens'])} greedy tokens equal to PyTorch's")
        assert got["prompt_tokens"] == case["input_ids"]
        assert got["tokens"] == case["greedy_tokens"]


def _photo(name: str, size: tuple[int, int]) -> Image.Image:
    image = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
    return image.resize(size, Image.Resampling.BICUBIC) if image.size != size else image


# (photograph, source size, scale_resolution): 2.5's own scale (448) and the tiny preset's (56).
SIZES = [
    ("astronaut", (512, 512), 448),
    ("astronaut", (7, 5), 448),  # tiny: upscaled, no grid
    ("coffee", (4000, 3000), 448),  # huge: the full 9-slice budget
    ("chelsea", (200, 2000), 448),  # 1:10
    ("rocket", (3000, 300), 448),  # 10:1
    ("coffee", (448, 448), 448),  # exactly one slice's area: no grid
    ("coffee", (449, 448), 448),  # just above: two slices
    ("chelsea", (451, 300), 448),
    ("astronaut", (1000, 999), 448),
    ("rocket", (640, 427), 56),
    ("chelsea", (57, 56), 56),
    ("coffee", (120, 1500), 56),
]


@pytest.mark.parametrize(("name", "size", "scale"), SIZES)
def test_slice_pixels_are_bit_identical(tmp_path, name, size, scale):
    source = tmp_path / "image.png"
    _photo(name, size).save(source)
    out = tmp_path / "slices.npy"
    run = llama3v("preprocess", "--image", str(source), "--slice-scale", str(scale), "--out", str(out))
    assert run.returncode == 0, run.stderr
    shapes = [tuple(s) for s in json.loads(run.stdout)["slices"]]
    settings = mcv.SliceSettings(query_num=96, max_slice_nums=9, scale_resolution=scale, patch_size=14, slice_mode=True)
    overview, cells, grid = mcv.slice_image(Image.open(source).convert("RGB"), settings)
    reference = [mcv.to_pixels(s).numpy() for s in [overview, *cells]]
    assert shapes == [r.shape for r in reference], f"grid {grid}"
    ours = np.load(out)
    want = np.concatenate([r.reshape(-1) for r in reference])
    diff = float(np.abs(ours - want).max())
    print(f"{name} {size} at {scale}: grid {grid}, {len(reference)} slices, max abs pixel diff {diff} (tolerance 0)")
    assert np.array_equal(ours, want)


def test_llama3v_release_names_export_the_same_graphs(minicpmv, tmp_path):
    """The llama3v release's weight names (vison.*, projection.*) map onto the published ones: same graphs."""
    _, model_dir, _ = minicpmv
    renamed = make_minicpmv_checkpoint(PRESET, tmp_path / "renamed", renamed=True)
    result = export_model(renamed, tmp_path / "model", log=lambda _: None)
    assert all(c.passed for c in result.comparisons)
    ours = json.loads((model_dir / "manifest.json").read_text())["graphs"]
    theirs = result.manifest["graphs"]
    for graph in ("vision", "embed", "decoder"):
        files = [ours[graph]["sha256"], *(f["sha256"] for f in ours[graph]["external_data"])]
        renamed_files = [theirs[graph]["sha256"], *(f["sha256"] for f in theirs[graph]["external_data"])]
        assert files == renamed_files, graph


def test_key_map_renames_only_the_llama3v_prefixes():
    state = {"vison.encoder.w": 1, "projection.query": 2, "llm.model.norm.weight": 3, "visonary.x": 4}
    assert mcv.map_renamed_keys(state) == {
        "vpm.encoder.w": 1,
        "resampler.query": 2,
        "llm.model.norm.weight": 3,
        "visonary.x": 4,
    }


@pytest.mark.parametrize("options", [("--dtype", "fp16"), ("--decoder", "fused", "--quant", "int4")])
def test_reduced_precision_and_fused_exports_check(minicpmv, tmp_path, options):
    checkpoint, _, _ = minicpmv
    kwargs = dict(zip(options[::2], options[1::2], strict=True))
    result = export_model(
        checkpoint,
        tmp_path / "model",
        dtype=kwargs.get("--dtype", "fp32"),
        reference=True,
        quant=kwargs.get("--quant"),
        decoder=kwargs.get("--decoder", "plain"),
        log=lambda _: None,
    )
    for c in result.comparisons:
        print(c.line())
    out = llama3v("check", "--model", str(result.model_dir))
    print(out.stdout)
    assert out.returncode == 0, out.stdout + out.stderr


def test_an_image_count_mismatch_is_refused(minicpmv):
    _, model_dir, _ = minicpmv
    out = llama3v("generate", "--model", str(model_dir), "--prompt", "<image> hi", "--max-new-tokens", "1")
    assert out.returncode == 2
    assert "image" in out.stderr, out.stderr


def test_slicing_constants_are_the_published_ones(minicpmv):
    checkpoint, _, _ = minicpmv
    config = json.loads((Path(checkpoint) / "config.json").read_text())
    assert config["model_type"] == "minicpmv" and config["query_num"] == 96
    assert not (Path(checkpoint) / "preprocessor_config.json").exists()


def test_weights_outside_the_layout_are_refused_before_export(minicpmv, tmp_path):
    """A checkpoint with a weight the layout does not have is refused as a whole, as loading it in PyTorch would
    refuse it, before any graph is written (the graphs read only the weights they need)."""
    checkpoint, _, _ = minicpmv
    copy = tmp_path / "checkpoint"
    shutil.copytree(checkpoint, copy)
    (weights,) = copy.glob("*.safetensors")
    tensors = load_file(str(weights))
    tensors["llm.model.layers.99.mlp.up_proj.weight"] = np.zeros((2, 2), np.float32)
    save_file(tensors, str(weights))
    with pytest.raises(CheckpointError, match="unexpected"):
        export_model(copy, tmp_path / "model", log=lambda _: None)
    assert not (tmp_path / "model" / "vision.onnx").exists()
