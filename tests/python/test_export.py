"""The export stage: model directories from tiny checkpoints against onnx/README.md, graph parity with
PyTorch, reference cases, fp16, external data, and refusal of unusable checkpoints."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from llama3v_export.checkpoint import CheckpointError, load_checkpoint
from llama3v_export.cli import export_model, main
from llama3v_export.graphs import dims_from_config, graph_specs
from llama3v_export.manifest import sha256
from llama3v_export.tiny import TINY_PRESETS
from llama3v_export.tokenizer import check_against_tiktoken
from llama3v_export.validate import FP16_REL_TOLERANCE, session, validate_reference
from safetensors.numpy import load_file
from tokenizers import Tokenizer
from transformers import AutoConfig

STEPS = 32


def contract_io(num_layers: int) -> dict[str, tuple[list[str], list[str]]]:
    """Input and output names per graph, in order, spelled out from onnx/README.md."""
    past = [f"past_key_values.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]
    present = [f"present.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]
    return {
        "vision": (["pixel_values"], ["image_features"]),
        "embed": (["input_ids"], ["inputs_embeds"]),
        "decoder": (["inputs_embeds", "attention_mask", "position_ids", *past], ["logits", *present]),
    }


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_manifest_matches_the_contract(exports, preset: str) -> None:
    model_dir = exports.model_dir(preset)
    checkpoint = exports.checkpoint(preset)
    manifest = read_json(model_dir / "manifest.json")
    config = read_json(checkpoint / "config.json")
    text, vision = config["text_config"], config["vision_config"]

    assert manifest["format"] == "llama3v-model"
    assert manifest["format_version"] == 1
    assert manifest["dtype"] == "fp32"
    assert set(manifest) == {"format", "format_version", "dtype", "decoder_flavour", "graphs", "model", "image",
                             "text", "generation", "provenance"}  # fmt: skip

    head_dim = text["hidden_size"] // text["num_attention_heads"]
    assert manifest["model"] == {
        "num_layers": text["num_hidden_layers"],
        "num_attention_heads": text["num_attention_heads"],
        "num_kv_heads": text["num_key_value_heads"],
        "head_dim": head_dim,
        "hidden_size": text["hidden_size"],
        "vocab_size": text["vocab_size"],
        "max_context": text["max_position_embeddings"],
    }

    n_img = (vision["image_size"] // vision["patch_size"]) ** 2
    size, hidden, kv = vision["image_size"], text["hidden_size"], text["num_key_value_heads"]
    expected_shapes = {
        "pixel_values": ["batch", 3, size, size],
        "image_features": ["batch", n_img, hidden],
        "input_ids": ["batch", "sequence"],
        "inputs_embeds": ["batch", "sequence", hidden],
        "attention_mask": ["batch", "total_sequence"],
        "position_ids": ["batch", "sequence"],
        "logits": ["batch", 1, text["vocab_size"]],
    }
    for name, (inputs, outputs) in contract_io(text["num_hidden_layers"]).items():
        entry = manifest["graphs"][name]
        assert entry["file"] == f"{name}.onnx"
        assert entry["sha256"] == sha256(model_dir / entry["file"])
        for data in entry["external_data"]:
            assert data["sha256"] == sha256(model_dir / data["file"])
        assert [t["name"] for t in entry["inputs"]] == inputs
        assert [t["name"] for t in entry["outputs"]] == outputs
        for tensor in entry["inputs"] + entry["outputs"]:
            integer = tensor["name"] in ("input_ids", "attention_mask", "position_ids")
            assert tensor["dtype"] == ("int64" if integer else "float32"), tensor
            if tensor["name"].startswith("past_key_values."):
                assert tensor["shape"] == ["batch", kv, "past_sequence", head_dim]
            elif tensor["name"].startswith("present."):
                assert tensor["shape"] == ["batch", kv, "total_sequence", head_dim]
            else:
                assert tensor["shape"] == expected_shapes[tensor["name"]], tensor
        graph = onnx.load(str(model_dir / entry["file"]), load_external_data=False).graph
        assert [v.name for v in graph.input] == inputs
        assert [v.name for v in graph.output] == outputs

    processor = read_json(checkpoint / "preprocessor_config.json")
    assert manifest["image"] == {
        "height": size,
        "width": size,
        "resample": "bicubic",
        "do_rescale": True,
        "rescale_factor": processor["rescale_factor"],
        "do_normalize": True,
        "mean": [0.5, 0.5, 0.5],
        "std": [0.5, 0.5, 0.5],
        "do_convert_rgb": True,
        "tokens_per_image": n_img,
        "image_token": "<image>",
        "image_token_id": 128256,
    }
    assert manifest["text"] == {
        "tokenizer_file": "tokenizer.json",
        "bos_token": "<|begin_of_text|>",
        "bos_token_id": 128000,
        "eos_token": "<|eot_id|>",
        "pad_token_id": None,
        "stop_token_ids": [128001, 128008, 128009],
        "chat_template": (checkpoint / "chat_template.jinja").read_text(),
    }
    assert manifest["generation"] == {
        "temperature": 0.6,
        "top_p": 0.9,
        "top_k": None,
        "do_sample": True,
        "repetition_penalty": None,
    }
    provenance = manifest["provenance"]
    assert provenance["exporter"] == "llama3v-export 0.1.0"
    assert provenance["source_checkpoint"] == str(checkpoint.resolve())
    assert (provenance["onnx_opset"], provenance["dtype"]) == (17, "fp32")
    assert provenance["quantization"] is None and manifest["decoder_flavour"] == "plain"
    assert (model_dir / "tokenizer.json").read_bytes() == (checkpoint / "tokenizer.json").read_bytes()


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_graphs_match_pytorch(exports, preset: str) -> None:
    result = exports.result(preset)
    print(f"\n{preset}:")
    for comparison in result.comparisons:
        print("  " + comparison.line())
    assert all(c.passed for c in result.comparisons)
    labels = " ".join(c.label for c in result.comparisons)
    for case in ("prefill P=0 S=5", "decode P=5 S=1", "chunk P=5 S=3", "image_features", "step_logits"):
        assert case in labels
    for c in result.comparisons:
        assert c.max_abs_diff <= 1e-4, c.line()
        if c.top1 is not None:
            assert c.top1[0] == c.top1[1], c.line()


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_reference_cases(exports, preset: str) -> None:
    model_dir = exports.model_dir(preset)
    manifest = read_json(model_dir / "manifest.json")
    image, model = manifest["image"], manifest["model"]
    reference = read_json(model_dir / "reference" / "reference.json")
    assert reference["format_version"] == 1
    cases = {c["name"]: c for c in reference["cases"]}
    assert set(cases) == {"single_image", "two_images", "text_only"}
    assert [len(cases[n]["images"]) for n in ("single_image", "two_images", "text_only")] == [1, 2, 0]
    assert any(c["system"] for c in cases.values())
    for case in reference["cases"]:
        tensors = load_file(str(model_dir / "reference" / case["tensors"]))
        n = len(case["images"])
        ids = tensors["input_ids"]
        assert ids.dtype == np.int64 and ids.ndim == 2 and ids.shape[0] == 1
        assert ids[0, 0] == 128000 and (ids == 128000).sum() == 1, "BOS once, at the start"
        assert (ids == image["image_token_id"]).sum() == n * image["tokens_per_image"]
        for image_file in case["images"]:
            assert (model_dir / "reference" / image_file).is_file()
        if n:
            assert tensors["pixel_values"].shape == (n, 3, image["height"], image["width"])
            assert tensors["image_features"].shape == (n, image["tokens_per_image"], model["hidden_size"])
        else:
            assert "pixel_values" not in tensors and "image_features" not in tensors
        assert tensors["step_logits"].shape == (STEPS, model["vocab_size"])
        assert all(t.dtype == np.float32 for k, t in tensors.items() if k != "input_ids")
        assert len(case["greedy_tokens"]) == STEPS
        assert tensors["step_logits"].argmax(-1).tolist() == case["greedy_tokens"]
        distinct = len(set(case["greedy_tokens"]))
        print(f"{preset}/{case['name']}: {ids.shape[1]} prompt tokens, {distinct} distinct greedy tokens")
        assert distinct >= 8, "a degenerate random model makes a weak test"


def test_fp16_export_against_fp32_logits(exports, fp16_model: Path) -> None:
    """fp16 graphs, run the runtime's way on the reference cases, against transformers' fp32 logits."""
    preset, result = next((p, r) for (p, dtype), r in exports.results.items() if dtype == "fp16")
    manifest = read_json(result.model_dir / "manifest.json")
    assert manifest["dtype"] == "fp16"
    for entry in manifest["graphs"].values():
        for tensor in entry["inputs"] + entry["outputs"]:
            assert tensor["dtype"] in ("float16", "int64"), tensor
    print()
    for comparison in result.comparisons:
        print("  " + comparison.line())
        assert comparison.relative is not None and comparison.relative <= FP16_REL_TOLERANCE
    logits = [c for c in result.comparisons if c.label.endswith("step_logits")]
    assert len(logits) == 3
    agreement = sum(c.top1[0] for c in logits), sum(c.top1[1] for c in logits)
    print(f"fp16 {preset}: top-1 agreement with fp32 transformers {agreement[0]}/{agreement[1]}")


def test_external_data_graphs_load_and_match(exports, tmp_path: Path) -> None:
    """The >2 GB layout (weights in `<graph>.onnx.data`), forced on a tiny model."""
    out = tmp_path / "external"
    result = export_model(exports.checkpoint("tiny-b"), out, reference=False, log=lambda _: None, external_data=True)
    for name, entry in result.manifest["graphs"].items():
        assert entry["external_data"] == [{"file": f"{name}.onnx.data", "sha256": sha256(out / f"{name}.onnx.data")}]
        assert (out / entry["file"]).stat().st_size < 1 << 20, "weights should live in the data file"
        modes = [(out / f).stat().st_mode & 0o777 for f in (entry["file"], f"{name}.onnx.data")]
        assert modes[0] == modes[1], f"graph and data file modes differ: {[oct(m) for m in modes]}"
    assert all(c.passed for c in result.comparisons)
    # Run the reference cases of the in-file export through the external-data graphs.
    reference_dir = exports.model_dir("tiny-b") / "reference"
    shutil.copytree(reference_dir, out / "reference")
    files = {name: out / f"{name}.onnx" for name in ("vision", "embed", "decoder")}
    dims = dims_from_config(AutoConfig.from_pretrained(exports.checkpoint("tiny-b")))
    comparisons = validate_reference(out / "reference", files, graph_specs(dims, "float32"), dims, "fp32", 128256)
    assert all(c.passed for c in comparisons)
    session(files["decoder"])


def test_tokenizer_json_is_the_llama3_tokenizer(exports) -> None:
    tokenizer = Tokenizer.from_file(str(exports.model_dir("tiny-a") / "tokenizer.json"))
    expected = {
        "<|begin_of_text|>": 128000,
        "<|end_of_text|>": 128001,
        "<|finetune_right_pad_id|>": 128004,
        "<|start_header_id|>": 128006,
        "<|end_header_id|>": 128007,
        "<|eom_id|>": 128008,
        "<|eot_id|>": 128009,
        "<|python_tag|>": 128010,
        "<|reserved_special_token_245|>": 128255,
        "<image>": 128256,
    }
    for token, token_id in expected.items():
        assert tokenizer.token_to_id(token) == token_id, token
    assert tokenizer.get_vocab_size(with_added_tokens=True) == 128257
    with_specials = tokenizer.encode("hi", add_special_tokens=True).ids
    assert with_specials == tokenizer.encode("hi", add_special_tokens=False).ids, "the template writes BOS, not encode"
    assert tokenizer.encode("<image>\nDescribe", add_special_tokens=False).ids[0] == 128256
    check_against_tiktoken(tokenizer, ("A photo of a llama 🦙 in 2024.", "<|start_header_id|>user<|end_header_id|>"))


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    script = Path(sys.executable).parent / "llama3v-export"
    return subprocess.run([str(script), *args], capture_output=True, text=True, check=False, env=os.environ.copy())


def test_pickle_only_checkpoint_is_refused(exports, tmp_path: Path) -> None:
    checkpoint = tmp_path / "pickle-ckpt"
    checkpoint.mkdir()
    for name in ("config.json", "tokenizer.json", "chat_template.jinja", "processor_config.json",
                 "generation_config.json"):  # fmt: skip
        shutil.copy(exports.checkpoint("tiny-a") / name, checkpoint / name)
    # Never loaded: the refusal comes from the file type alone.
    (checkpoint / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    proc = _run_cli("--checkpoint", str(checkpoint), "--out", str(tmp_path / "out"))
    print(proc.stderr.strip())
    assert proc.returncode == 2
    assert "pickle" in proc.stderr and "arbitrary code" in proc.stderr
    assert "pytorch_model.bin" in proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("name", "change", "message"),
    [
        ("missing directory", lambda d: shutil.rmtree(d), "does not exist"),
        ("no config", lambda d: (d / "config.json").unlink(), "config.json is missing"),
        ("not llava", lambda d: _edit_config(d, model_type="llama"), "model_type is 'llama'"),
        ("no tokenizer", lambda d: (d / "tokenizer.json").unlink(), "tokenizer.json is missing"),
        ("no generation config", lambda d: (d / "generation_config.json").unlink(), "generation_config.json"),
        ("no weights", lambda d: (d / "model.safetensors").unlink(), "no *.safetensors"),
        ("default strategy", lambda d: _edit_config(d, vision_feature_select_strategy="default"), "'full'"),
    ],
)
def test_bad_checkpoints_are_clear_errors(exports, tmp_path, capsys, name, change, message) -> None:
    checkpoint = tmp_path / "ckpt"
    shutil.copytree(exports.checkpoint("tiny-a"), checkpoint)
    change(checkpoint)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(checkpoint)
    assert message in str(err.value)
    assert main(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "out")]) == 2
    stderr = capsys.readouterr().err
    print(f"{name}: {stderr.strip()}")
    assert stderr.startswith("llama3v-export: error: ") and message in stderr
    assert stderr.count("\n") == 1, "one line"


def _edit_config(checkpoint: Path, **fields: str) -> None:
    config = read_json(checkpoint / "config.json")
    config.update(fields)
    (checkpoint / "config.json").write_text(json.dumps(config))
