#!/usr/bin/env python3
"""Continuous batching side by side, in one run on one machine, on one random-weight LLaVA checkpoint:

- llama3v batched: `llama3v bench --concurrency C` (C clients in a closed loop, arrivals spread over the engine's
  iterations, a mix of text-only and one-image prompts of varied length, replies of varied length) at each C;
- llama3v with `--max-batch 1` under the largest C: the same workload decoded one request at a time;
- transformers' continuous batching (`generate_batch` on the checkpoint's extracted LlamaForCausalLM, text prompts
  of the same lengths, all submitted at once);
- onnxruntime-genai, when the package is installed: a static batch of C equal-length text prompts (its builder's
  graph of the same Llama weights).

Also the machine's matrix limit: one decoder-shaped MatMul (hidden x intermediate) timed at 1 row and at C rows on
the same threads, so a batched step's best possible gain over one row is known. Prints a table with ratios and the
goals of the continuous batching work (met / not met).

Usage (from the repository root):
    .venv/bin/llama3v-tiny --preset mid --out /tmp/mid-ckpt
    .venv/bin/llama3v-export --checkpoint /tmp/mid-ckpt --out /tmp/mid
    flock /tmp/llama3v-heavy.lock .venv/bin/python scripts/bench_batch_compare.py --checkpoint /tmp/mid-ckpt \
        --model /tmp/mid --work /tmp/mid-peers --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

from bench_compare import extract_llama, genai_model, log, machine  # noqa: E402


def run_llama3v(
    args,
    concurrency: list[int],
    max_batch: int | None = None,
    model: Path | None = None,
    options: list[str] = (),
    image_every: int = 3,
) -> list[dict]:
    cmd = [
        str(args.binary), "bench", "--model", str(model or args.model), "--json",
        "--concurrency", ",".join(map(str, concurrency)),
        "--requests-per-client", str(args.requests_per_client),
        "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens),
        "--image-every", str(image_every),
    ]  # fmt: skip
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if max_batch is not None:
        cmd += ["--max-batch", str(max_batch)]
    for option in options:
        cmd += ["--ep-option", option]
    # One process per concurrency level: a level measured after others in the same process runs on an allocator
    # they have grown (measured: up to 15% slower), which is not what a level alone costs.
    reports = []
    for level in concurrency:
        args_at = [*cmd]
        args_at[args_at.index("--concurrency") + 1] = str(level)
        log("llama3v: " + " ".join(args_at))
        done = subprocess.run(args_at, capture_output=True, text=True, check=True)
        reports += json.loads(done.stdout)
    return reports


def workload(args, clients: int, vocab: int) -> tuple[list[list[int]], list[int]]:
    """Text prompts and reply lengths drawn from the same ranges as `llama3v bench --concurrency`."""
    rng = np.random.default_rng(0)
    prompts, replies = [], []
    for _ in range(clients * args.requests_per_client):
        n = int(rng.integers(args.prompt_tokens // 4, args.prompt_tokens + 1))
        prompts.append([1, *rng.integers(3, vocab, n).tolist()])
        replies.append(int(rng.integers(args.new_tokens // 2, args.new_tokens * 3 // 2 + 1)))
    return prompts, replies


def run_transformers(args, clients: int, vocab: int) -> dict:
    import torch
    from transformers import GenerationConfig, LlamaForCausalLM

    if args.threads:
        torch.set_num_threads(args.threads)
    llama = args.work / "llama"
    if not (llama / "config.json").exists():
        extract_llama(args.checkpoint, llama)
    model = LlamaForCausalLM.from_pretrained(llama, dtype=torch.float32, attn_implementation="sdpa").eval()
    prompts, replies = workload(args, clients, vocab)
    # generate_batch takes one max_new_tokens for all requests: the workload's mean reply length.
    new_tokens = round(sum(replies) / len(replies))
    config = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=-1, pad_token_id=0)
    with torch.no_grad():
        model.generate_batch(inputs=prompts[:2], generation_config=config, max_new_tokens=4)
        start = time.perf_counter()
        outputs = model.generate_batch(inputs=prompts, generation_config=config, max_new_tokens=new_tokens)
        wall = time.perf_counter() - start
    tokens = sum(len(o.generated_tokens) for o in outputs.values())
    return {"requests": len(prompts), "generated_tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall}


def run_genai(args, clients: int, vocab: int, quant: dict) -> dict | None:
    """A static batch of `clients` equal-length text prompts; int4 (the export's block size) when the llama3v model
    under test is an int4 export, so the two are compared at the same precision."""
    try:
        import onnxruntime_genai as og
    except ImportError:
        return None
    if quant.get("method") == "int4":
        block = quant.get("block_size")
        path = genai_model(args, "int4", block if block != 32 else None)
    else:
        path = genai_model(args, "fp32")
    config = og.Config(str(path))
    if args.threads:
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": args.threads}}}}))
    model = og.Model(config)
    n = args.prompt_tokens
    rng = np.random.default_rng(0)
    prompts = np.array([[1, *rng.integers(3, vocab, n - 1).tolist()] for _ in range(clients)], dtype=np.int32)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=n + args.new_tokens, batch_size=clients, do_sample=False)
    generator = og.Generator(model, params)
    start = time.perf_counter()
    generator.append_tokens(prompts)
    steps = 0
    while not generator.is_done() and steps < args.new_tokens:
        generator.generate_next_token()
        steps += 1
    wall = time.perf_counter() - start
    tokens = steps * clients
    return {"requests": clients, "generated_tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall}


def matmul_limit(args, manifest: dict, rows: int) -> dict:
    """One decoder-shaped MatMul (hidden x intermediate, fp32) on the engines' threads at 1 row and at `rows`."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    hidden = manifest["model"]["hidden_size"]
    inter = int(json.loads((args.checkpoint / "config.json").read_text())["text_config"]["intermediate_size"])
    weight = np.random.default_rng(0).standard_normal((hidden, inter), dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", hidden])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", inter])],
        [numpy_helper.from_array(weight, "w")],
    )
    options = ort.SessionOptions()
    if args.threads:
        options.intra_op_num_threads = args.threads
    session = ort.InferenceSession(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString(), options
    )
    del onnx

    def timed(m: int) -> float:
        x = np.ones((m, hidden), dtype=np.float32)
        for _ in range(3):
            session.run(None, {"x": x})
        best = float("inf")
        for _ in range(20):
            start = time.perf_counter()
            session.run(None, {"x": x})
            best = min(best, time.perf_counter() - start)
        return best

    one, many = timed(1), timed(rows)
    return {"rows": rows, "one_row_ms": one * 1e3, "rows_ms": many * 1e3, "best_gain": rows * one / many}


def decode_gain(run: dict) -> tuple[int, float]:
    """The engine's decode-only gain at the widest row count it ran at least 5 steps with: rows x the one-row step
    time over that row count's step time (both from the same run's step times by row count)."""
    steps = {int(k): v for k, v in run["step_ms_by_rows"].items()}
    one = steps.get(1)
    counted = [r for r in steps if r > 1]
    if one is None or not counted:
        return 1, 1.0
    rows = max(counted, key=lambda r: (r >= 5, r))
    return rows, rows * one / steps[rows]


def batching_bound(one: dict, gain: float) -> float:
    """Amdahl's bound on the aggregate gain over --max-batch 1: vision and prefill are the same work at any batch
    size, only the decode part shrinks, by at most `gain`."""
    fixed = one["vision_s"] + one["prefill_s"]
    return (fixed + one["decode_s"]) / (fixed + one["decode_s"] / gain)


def row(name: str, r: dict) -> str:
    return (
        f"{name:<40}{r['aggregate_tokens_per_s']:>10.1f}{r['ttft_ms']['p50']:>10.1f}/{r['ttft_ms']['p95']:<9.1f}"
        f"{r['inter_token_ms']['p50']:>8.1f}/{r['inter_token_ms']['p95']:<9.1f}{r['mean_batch']:>8.2f}"
        f"{r['vision_s']:>7.1f}/{r['prefill_s']:.1f}/{r['decode_s']:.1f}"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--model", type=Path, required=True, help="llama3v export of --checkpoint")
    p.add_argument("--work", type=Path, default=Path("/tmp/llama3v-batch-peers"))
    p.add_argument("--binary", type=Path, default=REPO / "target" / "release" / "llama3v")
    p.add_argument("--concurrency", default="1,4,8,16")
    p.add_argument("--requests-per-client", type=int, default=3)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--fused-model", type=Path, help="llama3v export of --checkpoint with --decoder fused")
    p.add_argument(
        "--step-tokens", default="", help="also run the top concurrency at these decode.step_tokens, e.g. 0,128"
    )
    p.add_argument("--skip", nargs="*", default=[], choices=["transformers", "genai"])
    p.add_argument("--json-out", type=Path)
    args = p.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    levels = [int(c) for c in args.concurrency.split(",")]
    top = max(levels)
    manifest = json.loads((args.model / "manifest.json").read_text())
    vocab = manifest["model"]["vocab_size"]

    results: dict = {"machine": machine(), "threads": args.threads}
    results["llama3v"] = run_llama3v(args, levels)
    results["llama3v_max_batch_1"] = run_llama3v(args, [top], max_batch=1)[0]
    # The peers decode text only: llama3v on the same text-only mix, for the side-by-side ratio.
    results["llama3v_text"] = run_llama3v(args, [top], image_every=0)[0]
    results["llama3v_text_max_batch_1"] = run_llama3v(args, [top], max_batch=1, image_every=0)[0]
    if args.fused_model:
        results["llama3v_fused"] = run_llama3v(args, [1, top], model=args.fused_model)
        results["llama3v_fused_text"] = run_llama3v(args, [top], model=args.fused_model, image_every=0)[0]
    results["step_tokens"] = {
        budget: run_llama3v(args, [top], options=[f"decode.step_tokens={budget}"])[0]
        for budget in filter(None, args.step_tokens.split(","))
    }
    if "transformers" not in args.skip:
        log(f"transformers continuous batching: {top * args.requests_per_client} requests")
        results["transformers"] = run_transformers(args, top, vocab)
    if "genai" not in args.skip:
        results["genai"] = run_genai(args, top, vocab, manifest.get("quantization") or {})
    results["matmul"] = matmul_limit(args, manifest, top)

    print(f"machine: {results['machine']}, {args.threads} threads per engine")
    print(
        f"{'engine':<40}{'tokens/s':>10}{'TTFT p50/p95 ms':>20}{'ITL p50/p95 ms':>18}{'batch':>8}"
        f"{'  vision/prefill/decode s'}"
    )
    for r in results["llama3v"]:
        print(row(f"llama3v, {r['config']['concurrency']} clients", r))
    one = results["llama3v_max_batch_1"]
    print(row(f"llama3v --max-batch 1, {top} clients", one))
    print(row(f"llama3v text only, {top} clients", results["llama3v_text"]))
    print(row(f"llama3v text only --max-batch 1, {top} clients", results["llama3v_text_max_batch_1"]))
    for r in results.get("llama3v_fused", []):
        print(row(f"llama3v fused, {r['config']['concurrency']} clients", r))
    if "llama3v_fused_text" in results:
        print(row(f"llama3v fused text only, {top} clients", results["llama3v_fused_text"]))
    for budget, r in results["step_tokens"].items():
        print(row(f"llama3v step_tokens={budget}, {top} clients", r))
    peers = {}
    for name in ("transformers", "genai"):
        r = results.get(name)
        if r:
            peers[name] = r["tokens_per_s"]
            print(f"{name + ', ' + str(r['requests']) + ' requests':<34}{r['tokens_per_s']:>10.1f}")
        elif name not in args.skip:
            print(f"{name:<34}{'not measured (package not installed)':>40}")
    m = results["matmul"]
    print(
        f"MatMul {manifest['model']['hidden_size']}x(intermediate): 1 row {m['one_row_ms']:.3f} ms, {m['rows']} rows "
        f"{m['rows_ms']:.3f} ms: a batched step can be at most {m['best_gain']:.1f}x one row's throughput"
    )

    top_run = next(r for r in results["llama3v"] if r["config"]["concurrency"] == top)
    single = next((r for r in results["llama3v"] if r["config"]["concurrency"] == 1), None)
    gain = top_run["aggregate_tokens_per_s"] / one["aggregate_tokens_per_s"]
    rows, step_gain = decode_gain(top_run)
    fixed = one["vision_s"] + one["prefill_s"]
    print(
        f"where the time goes (--max-batch 1): vision + prefill {fixed:.1f} s, decode {one['decode_s']:.1f} s "
        f"({fixed / (fixed + one['decode_s']):.0%} of the engine's work is the same at any batch size)"
    )
    print(
        f"decode steps @ {top} clients: {rows} rows take {rows / step_gain:.2f}x one row's step, a {step_gain:.1f}x "
        f"decode gain (matrix limit {m['best_gain']:.1f}x); with that gain this workload's aggregate can rise at "
        f"most {batching_bound(one, step_gain):.2f}x over --max-batch 1 (at the matrix limit "
        f"{batching_bound(one, m['best_gain']):.2f}x)"
    )
    results["analysis"] = {
        "fixed_s": fixed,
        "decode_rows": rows,
        "decode_gain": step_gain,
        "bound_at_decode_gain": batching_bound(one, step_gain),
        "bound_at_matrix_limit": batching_bound(one, m["best_gain"]),
    }
    text_gain = (
        results["llama3v_text"]["aggregate_tokens_per_s"]
        / results["llama3v_text_max_batch_1"]["aggregate_tokens_per_s"]
    )
    goals = [
        (f"aggregate @ {top} vs --max-batch 1 (image mix)", gain, 4.0),
        (f"aggregate @ {top} vs --max-batch 1 (text only)", text_gain, 4.0),
    ]
    if peers:
        best = max(peers.values())
        text = max(results[k]["aggregate_tokens_per_s"] for k in ("llama3v_text", "llama3v_fused_text") if k in results)
        goals.append((f"text-only aggregate @ {top} (best flavour) vs best batched peer", text / best, 1.5))
    if single:
        step = single["inter_token_ms"]["p50"]
        goals.append((f"ITL p95 @ {top} / batch-1 step (image mix)", top_run["inter_token_ms"]["p95"] / step, -4.0))
        text_itl = results["llama3v_text"]["inter_token_ms"]["p95"] / step
        goals.append((f"ITL p95 @ {top} / batch-1 step (text only)", text_itl, -4.0))
    for what, value, target in goals:
        met = value <= -target if target < 0 else value >= target
        bound = f"<= {-target}" if target < 0 else f">= {target}"
        print(f"goal: {what}: {value:.2f} (target {bound}) {'met' if met else 'NOT met'}")
    results["goals"] = [{"goal": w, "value": v, "target": t} for w, v, t in goals]
    if args.json_out:
        args.json_out.write_text(json.dumps(results, indent=2))
    os.sync()
    return 0


if __name__ == "__main__":
    sys.exit(main())
