"""Execution providers on a machine without a GPU: clear errors, logged fallbacks with CPU-identical output,
provider option validation and the node placement report. The GPU side runs in scripts/gpu-check.sh."""

import json

import pytest
from helpers import llama3v


@pytest.fixture(scope="module")
def model_dir(tiny_models):
    return next(iter(tiny_models.values()))


def _gpu_runs_here(model_dir) -> bool:
    return llama3v("inspect", "--model", str(model_dir), "--ep", "cuda").returncode == 0


@pytest.mark.parametrize(
    ("ep", "ort_name", "library"),
    [
        ("cuda", "CUDAExecutionProvider", "libonnxruntime_providers_cuda.so"),
        ("tensorrt", "TensorrtExecutionProvider", "libonnxruntime_providers_tensorrt.so"),
    ],
)
def test_a_gpu_provider_alone_is_a_clear_error(model_dir, ep, ort_name, library):
    if _gpu_runs_here(model_dir):
        pytest.skip("CUDA runs here")
    proc = llama3v("generate", "--model", str(model_dir), "--prompt", "hi", "--max-new-tokens", "2", "--ep", ep)
    assert proc.returncode == 2, proc.stderr
    assert f"execution provider {ep}:" in proc.stderr, proc.stderr
    assert ort_name in proc.stderr and library in proc.stderr, proc.stderr
    assert "onnxruntime-gpu" in proc.stderr, proc.stderr
    assert proc.stdout == ""


def test_a_list_without_a_working_provider_names_every_failure(model_dir):
    if _gpu_runs_here(model_dir):
        pytest.skip("CUDA runs here")
    proc = llama3v("inspect", "--model", str(model_dir), "--ep", "tensorrt,cuda")
    assert proc.returncode == 2, proc.stderr
    assert "execution provider cuda:" in proc.stderr, proc.stderr
    assert "earlier: execution provider tensorrt:" in proc.stderr, proc.stderr
    assert "falling back to cuda" in proc.stderr, proc.stderr


def _generate(model_dir, ep: str) -> tuple[dict, str]:
    proc = llama3v(
        "generate", "--model", str(model_dir), "--prompt", "Describe a cat.", "--max-new-tokens", "24",
        "--temperature", "0", "--ignore-eos", "--json", "--ep", ep,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout), proc.stderr


def test_fallback_list_warns_and_matches_cpu(model_dir):
    if _gpu_runs_here(model_dir):
        pytest.skip("CUDA runs here: the list would not fall back")
    cpu, cpu_err = _generate(model_dir, "cpu")
    fallback, fallback_err = _generate(model_dir, "tensorrt,cuda,cpu")
    assert "warning:" not in cpu_err
    assert "execution provider tensorrt:" in fallback_err and "falling back to cuda" in fallback_err, fallback_err
    assert "execution provider cuda:" in fallback_err and "falling back to cpu" in fallback_err, fallback_err
    # One warning per distinct fallback, naming the graphs it applies to.
    assert fallback_err.count("falling back to cuda") == 1, fallback_err
    assert "vision, embed, decoder" in fallback_err, fallback_err
    print(f"greedy tokens: cpu {cpu['tokens']}, tensorrt,cuda,cpu {fallback['tokens']}")
    assert len(cpu["tokens"]) == 24
    assert fallback["tokens"] == cpu["tokens"]
    assert fallback["text"] == cpu["text"]


def test_check_against_compares_two_provider_lists(model_dir):
    proc = llama3v("check", "--model", str(model_dir), "--ep", "tensorrt,cuda,cpu", "--against", "cpu", "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    summary = report["summary"]
    print(f"max logits diff {summary['max_logits_diff']:.3e} (both sides run on the CPU here: expected 0)")
    print(f"greedy agreement {summary['greedy_agreement']}/{summary['greedy_steps']}")
    assert report["pass"] is True
    assert report["b"]["providers"] == "cpu"
    assert summary["greedy_steps"] > 0 and summary["greedy_agreement"] == summary["greedy_steps"]
    if not _gpu_runs_here(model_dir):
        assert summary["max_logits_diff"] == 0.0
    stages = {m["stage"] for case in report["comparison"]["cases"] for m in case["measures"]}
    assert {"image_features", "inputs_embeds", "step_logits", "greedy_tokens"} <= stages
    for side in ("a", "b"):
        assert report[side]["reference"]["cases"], side


def test_check_against_prints_per_stage_differences(model_dir):
    proc = llama3v("check", "--model", str(model_dir), "--ep", "cpu", "--against", "cpu")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "== cpu against cpu" in proc.stdout
    assert "max logits diff 0.000e0" in proc.stdout, proc.stdout
    assert proc.stdout.rstrip().endswith("check passed")


def test_inspect_reports_node_placement(model_dir):
    proc = llama3v("inspect", "--model", str(model_dir), "--ep", "cpu", "--json")
    assert proc.returncode == 0, proc.stderr
    graphs = json.loads(proc.stdout)["graphs"]
    for graph in graphs:
        placement = graph["placement"]
        print(graph["name"], placement)
        assert [p["provider"] for p in placement] == ["CPUExecutionProvider"], graph
        assert placement[0]["nodes"] >= 1
    text = llama3v("inspect", "--model", str(model_dir), "--ep", "cpu").stdout
    assert "nodes)" in text, text


def test_inspect_reports_the_kv_layout(model_dir):
    proc = llama3v("inspect", "--model", str(model_dir), "--ep", "cpu", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["kv_layout"] == "padded"
    text = llama3v("inspect", "--model", str(model_dir), "--ep", "cpu").stdout
    assert "KV cache   padded (" in text, text


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["--ep-option", "tensorrt.builder_optimization_level=9"],
            ["tensorrt.builder_optimization_level", '"9"', "0..=5"],
        ),
        (["--ep-option", "device_id=gpu0"], ["device_id", '"gpu0"', "0..=255"]),
        (["--ep-option", "cuda.memory_limit=lots"], ["cuda.memory_limit", '"lots"', "20GiB"]),
        (["--ep-option", "tensorrt.fp61=true"], ["tensorrt.fp61", "a known key", "tensorrt.fp16"]),
        (["--ep-option", "tensorrt.fp16"], ["--ep-option", "KEY=VALUE"]),
        (["--ep-option", "limits.max_context=99999999"], ["limits.max_context", "99999999", "the model's max_context"]),
        (["--ep", "cuda,gpu"], ["--ep", "gpu", "expected cpu, cuda or tensorrt"]),
    ],
)
def test_bad_provider_options_are_clear_errors(model_dir, args, expected):
    proc = llama3v("inspect", "--model", str(model_dir), *args)
    assert proc.returncode == 2, proc.stdout
    for part in expected:
        assert part in proc.stderr, proc.stderr


def test_options_file(model_dir, tmp_path):
    good = tmp_path / "ep.toml"
    good.write_text(
        'providers = "tensorrt,cpu"\n[tensorrt]\nfp16 = true\nengine_cache = false\n[limits]\nmax_images = 2\n'
    )
    proc = llama3v("inspect", "--model", str(model_dir), "--ep-config", str(good))
    if not _gpu_runs_here(model_dir):
        assert proc.returncode == 0, proc.stderr
        assert "execution provider tensorrt:" in proc.stderr and "falling back to cpu" in proc.stderr
    # --ep wins over the file's providers.
    proc = llama3v("inspect", "--model", str(model_dir), "--ep-config", str(good), "--ep", "cpu")
    assert proc.returncode == 0 and "warning:" not in proc.stderr, proc.stderr

    bad = tmp_path / "bad.json"
    bad.write_text('{"cuda": {"arena_extend_strategy": "greedy"}}')
    proc = llama3v("inspect", "--model", str(model_dir), "--ep-config", str(bad))
    assert proc.returncode == 2
    assert "cuda.arena_extend_strategy" in proc.stderr and "bad.json" in proc.stderr, proc.stderr
    assert "next_power_of_two or same_as_requested" in proc.stderr

    broken = tmp_path / "broken.toml"
    broken.write_text("[tensorrt\nfp16 = true\n")
    proc = llama3v("inspect", "--model", str(model_dir), "--ep-config", str(broken))
    assert proc.returncode == 2
    assert "options file" in proc.stderr and "broken.toml" in proc.stderr, proc.stderr


def _check_report(model_dir, *options: str) -> dict:
    args = ["check", "--model", str(model_dir), "--json"]
    for option in options:
        args += ["--ep-option", option]
    proc = llama3v(*args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout)


def _step_logits(report: dict) -> dict[str, dict]:
    return {case["case"]: next(m for m in case["measures"] if m["stage"] == "step_logits") for case in report["cases"]}


# Prefill in one run and in runs of 5 tokens (the reused input tensors change shape between runs): both match
# the reference and each other.
def test_chunked_prefill_matches_the_reference_and_the_whole_prompt_run(tiny_models, fp16_model):
    models = {**tiny_models, "fp16": fp16_model}
    for name, model_dir in models.items():
        whole = _check_report(model_dir, "decode.prefill_chunk=0")
        chunked = _check_report(model_dir, "decode.prefill_chunk=5")
        for report in (whole, chunked):
            for case in report["cases"]:
                for measure in case["measures"]:
                    assert measure["pass"], (name, case["case"], measure)
        whole_logits, chunked_logits = _step_logits(whole), _step_logits(chunked)
        for case, measure in chunked_logits.items():
            print(
                f"{name} {case}: step_logits vs reference chunked {measure['measured']:.3e}, "
                f"whole {whole_logits[case]['measured']:.3e} (tolerance {measure['tolerance']:.1e})"
            )
        for whole_case, chunked_case in zip(whole["cases"], chunked["cases"], strict=True):
            print(f"  {chunked_case['case']}: greedy {chunked_case['greedy_agreement']}/{chunked_case['greedy_steps']}")
            assert chunked_case["greedy_agreement"] == whole_case["greedy_agreement"]
            assert chunked_case["greedy_steps"] == whole_case["greedy_steps"]


def _generate_with(model_dir, prefill_chunk: str, images: list[str]) -> dict:
    args = [
        "generate", "--model", str(model_dir), "--prompt", "Describe the picture.", "--max-new-tokens", "40",
        "--temperature", "0", "--ignore-eos", "--json", "--ep-option", f"decode.prefill_chunk={prefill_chunk}",
    ]  # fmt: skip
    for image in images:
        args += ["--image", str(model_dir / "reference" / image)]
    proc = llama3v(*args)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_chunked_and_whole_prefill_generate_the_same_tokens(tiny_models, fp16_model):
    for name, model_dir in {**tiny_models, "fp16": fp16_model}.items():
        for images in ([], ["image_0.png"]):
            whole = _generate_with(model_dir, "0", images)
            chunked = _generate_with(model_dir, "5", images)
            print(
                f"{name} images={len(images)}: whole {whole['tokens']}\n{' ' * len(name)}  chunked {chunked['tokens']}"
            )
            assert len(whole["tokens"]) == 40
            assert chunked["tokens"] == whole["tokens"]
            assert chunked["text"] == whole["text"]


def test_removed_io_binding_option_is_refused(model_dir):
    # Every decoder run is bound (the KV cache stays in the decoder's memory): the option is gone.
    proc = llama3v("inspect", "--model", str(model_dir), "--ep-option", "decode.io_binding=true")
    assert proc.returncode == 2, proc.stdout
    assert "decode.io_binding" in proc.stderr and "a known key" in proc.stderr, proc.stderr
