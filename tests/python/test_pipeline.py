"""End to end: the Rust runtime (`llama3v`) against transformers on tiny random-weight checkpoints.

The reference cases come from `llama3v-export --reference` (transformers' LlavaProcessor +
LlavaForConditionalGeneration on the same checkpoint); these tests run the binary on them.
"""

import json
import shutil

import numpy as np
import onnx
import pytest
from helpers import case_args, llama3v, load_reference
from llama3v_export.manifest import sha256
from onnx import numpy_helper


def test_check_passes_on_every_tiny_model(tiny_models):
    for preset, model_dir in tiny_models.items():
        proc = llama3v("check", "--model", str(model_dir))
        print(f"--- {preset}\n{proc.stdout}{proc.stderr}")
        assert proc.returncode == 0, f"{preset}: check failed\n{proc.stdout}\n{proc.stderr}"
        report = json.loads(llama3v("check", "--model", str(model_dir), "--json").stdout)
        stages = {m["stage"] for case in report["cases"] for m in case["measures"]}
        assert {"input_ids", "pixel_values", "image_features", "step_logits", "greedy_tokens"} <= stages
        for case in report["cases"]:
            for m in case["measures"]:
                assert m["pass"], f"{preset}/{case['case']}: {m}"
            assert case["greedy_agreement"] == case["greedy_steps"] == 32


def test_generate_matches_transformers_generate(tiny_models):
    """Free-running greedy generation through the CLI: prompt ids and 32 tokens equal transformers'."""
    for preset, model_dir in tiny_models.items():
        for case in load_reference(model_dir)["cases"]:
            proc = llama3v(
                "generate",
                *case_args(model_dir, case),
                "--temperature",
                "0",
                "--max-new-tokens",
                str(len(case["greedy_tokens"])),
                "--ignore-eos",
                "--json",
            )
            assert proc.returncode == 0, proc.stderr
            out = json.loads(proc.stdout)
            ref_ids = case["input_ids"]
            assert out["prompt_tokens"] == ref_ids, f"{preset}/{case['name']}: prompt ids differ"
            agree = sum(a == b for a, b in zip(out["tokens"], case["greedy_tokens"], strict=False))
            print(f"{preset}/{case['name']}: {agree}/{len(case['greedy_tokens'])} greedy tokens equal")
            assert out["tokens"] == case["greedy_tokens"], f"{preset}/{case['name']}"
            assert out["finish_reason"] == "length"
            assert set(out["timings"]) >= {"vision_ms", "prefill_ms", "decode_tokens_per_s"}


def test_seeded_sampling_repeats(tiny_models):
    model_dir = next(iter(tiny_models.values()))
    case = load_reference(model_dir)["cases"][0]
    args = [*case_args(model_dir, case), "--temperature", "1.0", "--top-p", "0.95", "--top-k", "50"]
    args += ["--max-new-tokens", "24", "--ignore-eos", "--json"]
    runs = [json.loads(llama3v("generate", *args, "--seed", seed).stdout)["tokens"] for seed in ("7", "7", "8")]
    assert runs[0] == runs[1]
    assert len(runs[0]) == 24
    print(f"seed 7 vs seed 8: {sum(a != b for a, b in zip(runs[0], runs[2], strict=True))} of 24 tokens differ")


def test_streamed_text_equals_json_text(tiny_models):
    model_dir = next(iter(tiny_models.values()))
    case = load_reference(model_dir)["cases"][0]
    args = [*case_args(model_dir, case), "--temperature", "0", "--max-new-tokens", "16", "--ignore-eos"]
    streamed = llama3v("generate", *args)
    as_json = json.loads(llama3v("generate", *args, "--json").stdout)
    assert streamed.returncode == 0
    assert streamed.stdout == as_json["text"] + "\n"


def test_check_fails_on_a_corrupted_model(tiny_models, tmp_path):
    """Noise in one decoder weight (with the manifest's hash updated) must fail the check, non-zero."""
    source = next(iter(tiny_models.values()))
    broken = tmp_path / "broken"
    shutil.copytree(source, broken)
    graph_path = broken / "decoder.onnx"
    graph = onnx.load(str(graph_path))
    init = max(graph.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    values = numpy_helper.to_array(init).copy()
    values += np.random.default_rng(0).normal(0, 0.05, values.shape).astype(values.dtype)
    init.CopyFrom(numpy_helper.from_array(values, init.name))
    onnx.save(graph, str(graph_path))
    manifest_path = broken / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["graphs"]["decoder"]["sha256"] = sha256(graph_path)
    manifest_path.write_text(json.dumps(manifest))

    proc = llama3v("check", "--model", str(broken))
    print(proc.stdout)
    assert proc.returncode == 1
    assert "FAIL" in proc.stdout and "check FAILED" in proc.stdout


def test_a_changed_graph_file_is_refused_by_its_hash(tiny_models, tmp_path):
    broken = tmp_path / "tampered"
    shutil.copytree(next(iter(tiny_models.values())), broken)
    with open(broken / "embed.onnx", "ab") as f:
        f.write(b"\0")
    proc = llama3v("inspect", "--model", str(broken))
    assert proc.returncode == 2
    assert "embed.onnx: sha256 is" in proc.stderr


def test_fp16_export_checks_within_relative_tolerance(fp16_model):
    proc = llama3v("check", "--model", str(fp16_model))
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(llama3v("check", "--model", str(fp16_model), "--json").stdout)
    for case in report["cases"]:
        logits = next(m for m in case["measures"] if m["stage"] == "step_logits")
        print(
            f"fp16 {case['case']}: logits relative error {logits['measured']:.2e} (tolerance 1e-2), "
            f"top-1 agreement {case['greedy_agreement']}/{case['greedy_steps']}"
        )
        assert logits["measured"] <= 1e-2


@pytest.mark.parametrize(
    ("name", "build_args", "message"),
    [
        ("missing model dir", lambda m, t: ["--model", str(t / "nope"), "--prompt", "hi"], "not a directory"),
        ("image count mismatch", lambda m, t: ["--model", str(m), "--prompt", "<image> and <image>"], "2 image"),
        (
            "prompt longer than the context",
            lambda m, t: ["--model", str(m), "--prompt", "hi", "--max-new-tokens", "100000"],
            "exceeds the context",
        ),
        ("missing image", lambda m, t: ["--model", str(m), "--prompt", "hi", "--image", str(t / "x.png")], "x.png"),
        ("not an image", lambda m, t: ["--model", str(m), "--prompt", "hi", "--image", str(m / "manifest.json")], ""),
        ("negative temperature", lambda m, t: ["--model", str(m), "--prompt", "hi", "--temperature", "-1"], ""),
        ("unknown provider", lambda m, t: ["--model", str(m), "--prompt", "hi", "--ep", "gpu9"], "gpu9"),
    ],
)
def test_bad_input_is_a_clear_error(tiny_models, tmp_path, name, build_args, message):
    model_dir = next(iter(tiny_models.values()))
    proc = llama3v("generate", *build_args(model_dir, tmp_path))
    print(f"{name}: exit {proc.returncode}: {proc.stderr.strip()}")
    assert proc.returncode == 2, name
    assert proc.stderr.startswith("error: ")
    assert message in proc.stderr
    assert "panicked" not in proc.stderr


def test_missing_graph_is_a_clear_error(tiny_models, tmp_path):
    broken = tmp_path / "nograph"
    shutil.copytree(next(iter(tiny_models.values())), broken)
    (broken / "vision.onnx").unlink()
    proc = llama3v("generate", "--model", str(broken), "--prompt", "hi")
    assert proc.returncode == 2
    assert "vision.onnx is missing" in proc.stderr


def test_cuda_where_it_cannot_run_is_an_error_naming_it(tiny_models):
    model_dir = next(iter(tiny_models.values()))
    proc = llama3v("inspect", "--model", str(model_dir), "--ep", "cuda")
    if proc.returncode == 0:
        pytest.skip("CUDA runs here")
    assert proc.returncode == 2
    assert "execution provider cuda" in proc.stderr
    fallback = llama3v("inspect", "--model", str(model_dir), "--ep", "tensorrt,cuda,cpu")
    assert fallback.returncode == 0, fallback.stderr
    assert "falling back to" in fallback.stderr


def test_reference_inputs_match_the_runtime_tokenizer(tiny_models):
    """The reference's input ids come from transformers' processor; reproduce them from its messages."""
    model_dir = next(iter(tiny_models.values()))
    ref = load_reference(model_dir)
    assert {c["name"] for c in ref["cases"]} >= {"single_image", "two_images", "text_only"}
    for case in ref["cases"]:
        assert np.asarray(case["input_ids"]).ndim == 1
        assert case["input_ids"][0] == 128000
        assert case["input_ids"][1] != 128000, "BOS doubled"
