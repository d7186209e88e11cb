"""`llama3v-export --decoder fused`: the decoder built from ONNX Runtime's contrib ops, validated against PyTorch by
the exporter (including runs that append in place to shared KV buffers), and driven by the runtime in its
shared-buffer mode: `check` against transformers' reference cases, `generate` token for token equal to the plain
export's, fp16 and int4 variants, and a clear refusal of checkpoints the fused graph does not implement."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
from helpers import case_args, llama3v, load_reference
from llama3v_export.cli import export_model, main
from llama3v_export.export_run import ExportResult
from llama3v_export.tiny import TINY_PRESETS
from llama3v_export.validate import FP32_ABS_TOLERANCE


@pytest.fixture(scope="module")
def fused(exports, tmp_path_factory: pytest.TempPathFactory) -> dict[str, ExportResult]:
    root = tmp_path_factory.mktemp("fused")
    return {
        preset: export_model(
            exports.checkpoint(preset), root / preset, reference=True, decoder="fused", log=lambda _: None
        )
        for preset in TINY_PRESETS
    }


def op_counts(path: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_fused_graph_uses_the_contrib_ops_and_the_manifest_says_so(fused, tiny_models, preset):
    result = fused[preset]
    manifest = json.loads((result.model_dir / "manifest.json").read_text())
    assert manifest["decoder_flavour"] == "fused"
    plain = json.loads((tiny_models[preset] / "manifest.json").read_text())
    assert plain["decoder_flavour"] == "plain"
    # Same contract: names, order, dtypes and dims of every decoder input and output.
    for side in ("inputs", "outputs"):
        assert manifest["graphs"]["decoder"][side] == plain["graphs"]["decoder"][side]
    layers = manifest["model"]["num_layers"]
    ops = op_counts(result.model_dir / "decoder.onnx")
    print(preset, ops)
    assert ops["GroupQueryAttention"] == layers
    # Per layer one after attention and one before it (not before the first), then the final norm.
    assert ops["SkipSimplifiedLayerNormalization"] == 2 * layers
    # Packed q/k/v, o, packed gate/up, down per layer, and the LM head.
    assert ops["MatMul"] == 4 * layers + 1
    assert "Concat" not in ops and "Expand" not in ops


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_fused_export_validates_shared_buffer_runs_against_pytorch(fused, preset):
    comparisons = fused[preset].comparisons
    shared = [c for c in comparisons if "shared buffer" in c.label]
    # Logits and cache after each of the three runs (prefill, a decode step, a chunk).
    assert len(shared) == 6, [c.label for c in comparisons]
    for c in comparisons:
        print(c.line())
        assert c.passed and c.max_abs_diff <= c.tolerance == FP32_ABS_TOLERANCE


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_check_passes_in_every_decode_mode(fused, preset):
    model_dir = str(fused[preset].model_dir)
    inspected = llama3v("inspect", "--model", model_dir)
    assert inspected.returncode == 0, inspected.stderr
    assert "decoder    fused flavour" in inspected.stdout
    assert "KV cache   shared_buffer (" in inspected.stdout
    inspected = json.loads(llama3v("inspect", "--model", model_dir, "--json").stdout)
    assert (inspected["decoder_flavour"], inspected["kv_layout"]) == ("fused", "shared_buffer")
    # Prefill in one run and in runs of 5 (plain runs, each returning a new present), then decode appending in
    # place to the shared buffers.
    for options in ([], ["--ep-option", "decode.prefill_chunk=0"], ["--ep-option", "decode.prefill_chunk=5"]):
        report = json.loads(llama3v("check", "--model", model_dir, *options, "--json").stdout)
        for case in report["cases"]:
            for m in case["measures"]:
                label = f"{preset} {' '.join(options)} {case['case']} {m['stage']}"
                print(f"{label}: {m['measured']:.3g} (tolerance {m['tolerance']:.3g})")
                assert m["pass"], m
            assert case["greedy_agreement"] == case["greedy_steps"] == 32


def test_generate_equals_the_plain_export_token_for_token(fused, tiny_models):
    for preset in TINY_PRESETS:
        for case in load_reference(tiny_models[preset])["cases"]:
            outputs = []
            for model_dir in (tiny_models[preset], fused[preset].model_dir):
                args = case_args(model_dir, case)
                proc = llama3v(
                    "generate", *args, "--temperature", "0", "--max-new-tokens", "40", "--ignore-eos", "--json"
                )
                assert proc.returncode == 0, proc.stderr
                outputs.append(json.loads(proc.stdout)["tokens"])
            assert outputs[0] == outputs[1], f"{preset}/{case['name']}"
            assert outputs[1][:32] == case["greedy_tokens"], f"{preset}/{case['name']}"


def test_fp16_and_int4_fused_exports_check(exports, tmp_path):
    checkpoint = exports.checkpoint("tiny-c")
    fp16 = export_model(checkpoint, tmp_path / "fp16", "fp16", reference=True, decoder="fused", log=lambda _: None)
    int4 = export_model(
        exports.checkpoint("tiny-a"), tmp_path / "int4", reference=True, quant="int4", decoder="fused", log=print
    )
    nbits = op_counts(int4.model_dir / "decoder.onnx")
    layers = int4.manifest["model"]["num_layers"]
    assert nbits.get("MatMulNBits") == 4 * layers + 1 and "MatMul" not in nbits, nbits
    for result in (fp16, int4):
        proc = llama3v("check", "--model", str(result.model_dir))
        print(proc.stdout)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "check passed" in proc.stdout


def test_checkpoints_the_fused_graph_does_not_implement_are_refused(exports, tmp_path, capsys):
    checkpoint = tmp_path / "ckpt"
    source = exports.checkpoint("tiny-a")
    checkpoint.mkdir()
    for file in source.iterdir():
        (checkpoint / file.name).write_bytes(file.read_bytes())
    config = json.loads((checkpoint / "config.json").read_text())
    config["text_config"]["mlp_bias"] = True
    (checkpoint / "config.json").write_text(json.dumps(config))
    args = ["--checkpoint", str(checkpoint), "--out", str(tmp_path / "out"), "--decoder", "fused"]
    assert main([*args, "--skip-validation"]) == 2
    stderr = capsys.readouterr().err
    print(stderr)
    assert "does not implement mlp_bias" in stderr and "--decoder plain" in stderr
