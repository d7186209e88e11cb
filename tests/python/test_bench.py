"""`llama3v bench` on a tiny model: the report's structure and its internal consistency (never its speed)."""

import json

from helpers import llama3v


def test_bench_reports_every_figure_consistently(exports):
    model_dir = exports.model_dir("tiny-b")
    manifest = json.loads((model_dir / "manifest.json").read_text())
    args = ["--prompt-tokens", "8", "--new-tokens", "4", "--images", "2", "--contexts", "16,40"]
    proc = llama3v("bench", "--model", str(model_dir), *args, "--repeats", "1", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    print(json.dumps({k: v for k, v in report.items() if k != "config"}, indent=1))

    per_image = manifest["image"]["tokens_per_image"]
    assert report["image_tokens"] == 2 * per_image
    assert report["prefill_tokens"] == 8 + 2 * per_image
    assert report["vision_batch_ms"] > 0 and report["prefill_ms"] > 0
    assert abs(report["vision_ms_per_image"] * 2 - report["vision_batch_ms"]) < 1e-9
    assert report["ttft_ms"] >= report["prefill_ms"]

    # The first point follows 3 untimed warm-up steps; each point times exactly --new-tokens steps.
    assert [d["context"] for d in report["decode"]] == [16 + 3, 40]
    for point in report["decode"]:
        assert point["steps"] == 4
        assert 0 < point["ort_run_ms"] <= point["step_ms"], point
        assert point["overhead_us"] >= 0 and 0 <= point["overhead_pct"] <= 100, point
        assert point["tokens_per_s"] > 0

    files = [manifest["graphs"][g]["file"] for g in ("vision", "embed", "decoder")]
    files += [e["file"] for g in ("vision", "embed", "decoder") for e in manifest["graphs"][g].get("external_data", [])]
    assert report["weight_bytes"] == sum((model_dir / f).stat().st_size for f in files)
    dims = manifest["model"]
    kv = 2 * dims["num_layers"] * dims["num_kv_heads"] * dims["head_dim"] * 4 * (40 + 4)
    assert report["kv_cache_bytes"] == kv
    assert report["peak_rss_bytes"] > report["decoder_weight_bytes"]


def test_bench_refuses_a_prompt_beyond_the_context(exports):
    model_dir = exports.model_dir("tiny-b")
    max_context = json.loads((model_dir / "manifest.json").read_text())["model"]["max_context"]
    proc = llama3v("bench", "--model", str(model_dir), "--images", "0", "--prompt-tokens", str(max_context))
    print(proc.stderr)
    assert proc.returncode == 2
    assert str(max_context) in proc.stderr


def test_bench_memory_points_account_for_the_peak(exports):
    """One memory reading per phase; the peak only grows, and the last reading is the report's peak."""
    model_dir = exports.model_dir("tiny-b")
    args = ["--prompt-tokens", "8", "--new-tokens", "2", "--images", "1", "--contexts", "16,40", "--repeats", "1"]
    proc = llama3v("bench", "--model", str(model_dir), *args, "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    points = report["memory"]
    print(json.dumps(points, indent=1))
    assert [p["phase"].split()[0] for p in points] == ["loaded", "vision", "prefill", "prefill"]
    peaks = [p["peak_rss_bytes"] for p in points]
    assert peaks == sorted(peaks)
    assert peaks[-1] == report["peak_rss_bytes"]
    for p in points:
        assert p["rss_anon_bytes"] + p["rss_file_bytes"] <= p["rss_bytes"] <= p["peak_rss_bytes"], p


def test_chunked_prefill_matches_the_reference(exports):
    """Prefill in runs of 1 and 5 tokens, and in one run, all pass `check` against the transformers
    reference (logits within the fp32 tolerance, greedy tokens identical)."""
    model_dir = exports.model_dir("tiny-a")
    for chunk in ("1", "5", "0"):
        proc = llama3v("check", "--model", str(model_dir), "--ep-option", f"decode.prefill_chunk={chunk}")
        print(f"prefill_chunk={chunk}\n{proc.stdout}")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "check passed" in proc.stdout
