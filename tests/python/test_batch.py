"""The batch engine: a sequence decoded inside a batch gives what it gives alone.

`llama3v check --batch N` runs each model directory's reference conversations as a mixed workload (several
budgets, arrivals spread over the engine's iterations, so sequences join and leave a running batch) and compares
every step's logits with the same request run alone, within the manifest's tolerance; fp32 greedy tokens must be
equal. Both decoder flavours (padded rows for the plain graph, shared row buffers for the fused one), fp16 and
int4, the trained shapes model, and `serve` on top: concurrent replies, KV budget admission and metrics."""

from __future__ import annotations

import base64
import json
import threading
from pathlib import Path

import pytest
from helpers import REPO, llama3v
from llama3v_export.cli import export_model
from test_serve import PROMPT, image_message, metric, serve

DEFAULT_MODEL = REPO / "models" / "default"


def batch_check(model_dir: Path, max_batch: int, tokens: int = 24) -> dict:
    done = llama3v(
        "check", "--model", str(model_dir), "--batch", str(max_batch), "--batch-tokens", str(tokens), "--json"
    )
    report = json.loads(done.stdout) if done.stdout.strip() else {}
    for row in report.get("rows", []):
        m = row["logits"]
        print(f"{model_dir.name} {row['request']}: {m['measured']:.3e} (tolerance {m['tolerance']:.0e}), "
              f"tokens {'equal' if row['tokens_equal'] else 'differ'}")  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    # The workload really batched: runs of several sequences, requests joining at different iterations.
    assert max(report["batch_sizes"]) > 1, report["batch_sizes"]
    assert len({row["arrives_at"] for row in report["rows"]}) == len(report["rows"])
    return report


@pytest.mark.parametrize("preset", ["tiny-a", "tiny-b", "tiny-c"])
def test_plain_decoder_batches_like_alone(tiny_models, preset):
    report = batch_check(tiny_models[preset], 4)
    assert all(row["tokens_equal"] for row in report["rows"])


@pytest.fixture(scope="module")
def fused_model(exports, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("batch-fused") / "tiny-c"
    return export_model(
        exports.checkpoint("tiny-c"), out, reference=True, decoder="fused", log=lambda _: None
    ).model_dir


def test_fused_decoder_batches_like_alone(fused_model):
    report = batch_check(fused_model, 4)
    assert all(row["tokens_equal"] for row in report["rows"])


def test_fp16_batches_within_its_tolerance(fp16_model):
    report = batch_check(fp16_model, 3)
    assert report["require_token_agreement"] is False
    assert all(row["logits"]["pass"] for row in report["rows"])


def test_fused_int4_batches_within_its_tolerance(exports, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("batch-int4") / "tiny-a"
    model = export_model(
        exports.checkpoint("tiny-a"), out, reference=True, decoder="fused", quant="int4", log=lambda _: None
    ).model_dir
    report = batch_check(model, 4)
    assert all(row["logits"]["pass"] for row in report["rows"])


def test_trained_model_gives_the_same_answers_in_a_mixed_batch():
    report = batch_check(DEFAULT_MODEL, 8, tokens=16)
    assert all(row["tokens_equal"] for row in report["rows"])


def test_serve_decodes_concurrent_requests_together(tiny_models):
    model_dir = tiny_models["tiny-a"]
    case = json.loads((model_dir / "reference" / "reference.json").read_text())["cases"][0]
    image = model_dir / "reference" / case["images"][0]
    url = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
    with serve(model_dir, "--max-batch", "4") as server:
        bodies = [
            {"messages": image_message(url), "max_tokens": n, "temperature": 0, "ignore_eos": True}
            for n in (40, 24, 32, 16, 40, 8)
        ]
        alone = [server.chat(body)[1]["choices"][0]["message"]["content"] for body in bodies]
        results: list = [None] * len(bodies)

        def one(i: int) -> None:
            results[i] = server.chat(bodies[i])

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(bodies))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        text = server.metrics()
    assert all(r[0] == 200 for r in results), results
    together = [r[1]["choices"][0]["message"]["content"] for r in results]
    assert together == alone
    runs = metric(text, "llama3v_batch_size_count")
    single = metric(text, 'llama3v_batch_size_bucket{le="1"}')
    print(f"decoder runs {runs:.0f}, of them with one sequence {single:.0f}")
    assert runs > single, "no decoder run held more than one sequence"
    assert metric(text, "llama3v_max_concurrent") == 4
    assert metric(text, "llama3v_sequences_decoding") == 0
    assert metric(text, "llama3v_kv_budget_bytes") > 0
    assert metric(text, "llama3v_inter_token_latency_seconds_count") > 0
    phases = {p: metric(text, f'llama3v_engine_seconds_total{{phase="{p}"}}') for p in ("vision", "prefill", "decode")}
    print(f"engine seconds by phase: {phases}")
    assert all(seconds > 0 for seconds in phases.values()), phases


def test_serve_kv_budget_queues_what_does_not_fit_and_refuses_what_never_can(tiny_models):
    model_dir = tiny_models["tiny-a"]
    text = [{"role": "user", "content": PROMPT}]
    # Room for one request of 120 positions at a time: two such requests run one after the other.
    with serve(model_dir, "--max-batch", "4", "--kv-budget", "120") as server:
        body = {"messages": text, "max_tokens": 60, "temperature": 0, "ignore_eos": True}
        results: list = [None] * 2

        def one(i: int) -> None:
            results[i] = server.chat(body)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        status, reply = server.chat({"messages": text, "max_tokens": 500, "temperature": 0})
        metrics = server.metrics()
    assert [r[0] for r in results] == [200, 200], results
    assert results[0][1]["choices"][0]["message"]["content"] == results[1][1]["choices"][0]["message"]["content"]
    assert status == 400, reply
    message = reply["error"]["message"]
    print(message)
    assert "KV budget is 120" in message and "500" in message
    # Never two rows at once: every decoder run held one sequence.
    assert metric(metrics, "llama3v_batch_size_count") == metric(metrics, 'llama3v_batch_size_bucket{le="1"}')


def test_generate_and_serve_resolve_sampling_defaults_alike(tiny_models):
    """tiny-a's generation_config samples (temperature 0.6, top_p 0.9, no top_k: transformers' 50 applies):
    with the same seed and no sampling fields, `generate` and `serve` give the same tokens."""
    model_dir = tiny_models["tiny-a"]
    done = llama3v("generate", "--model", str(model_dir), "--prompt", PROMPT, "--seed", "11", "--max-new-tokens", "24",
                   "--ignore-eos", "--json")  # fmt: skip
    assert done.returncode == 0, done.stderr
    cli = json.loads(done.stdout)
    greedy = json.loads(llama3v("generate", "--model", str(model_dir), "--prompt", PROMPT, "--temperature", "0",
                                "--max-new-tokens", "24", "--ignore-eos", "--json").stdout)  # fmt: skip
    assert cli["tokens"] != greedy["tokens"], "the checkpoint's defaults should sample"
    with serve(model_dir) as server:
        status, reply = server.chat({"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 24, "seed": 11,
                                     "ignore_eos": True})  # fmt: skip
    assert status == 200, reply
    assert reply["choices"][0]["message"]["content"] == cli["text"]
