#!/usr/bin/env python3
"""Side-by-side benchmark, in one run on one machine, of the same random-weight LLaVA checkpoint in:

- llama3v (`llama3v bench --json` on the exported model directory),
- transformers (`LlavaForConditionalGeneration.generate` on CPU, fp32),
- onnxruntime-genai (its model builder's graph for the checkpoint's Llama weights, driven by its own
  generator; it gets only the decoder, so its prompts are text-only of the same length).

With `--int4` (and `--int4-model`, an int4 export of the same checkpoint: `llama3v-export --quant int4`), also
llama3v on that export and onnxruntime-genai's int4 graph (the export's block size, symmetric, accuracy level 4),
with the ratio llama3v-int4 / genai-int4.

Also measures the machine's memory bandwidth (a large copy) and reports decode against the bandwidth
floor (decoder weight bytes read per token), and the same floor at the rate a one-row MatMul streams its weight
on the engines' thread count (with one thread, a core cannot draw the machine's whole bandwidth). Prints a table
with ratios ours / best peer.

Usage (from the repository root):
    .venv/bin/llama3v-tiny --preset mid --out /tmp/mid-ckpt
    .venv/bin/llama3v-export --checkpoint /tmp/mid-ckpt --out /tmp/mid
    .venv/bin/python scripts/bench_compare.py --checkpoint /tmp/mid-ckpt --model /tmp/mid \
        --work /tmp/mid-peers --json-out /tmp/mid-compare.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from statistics import median

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --- machine -------------------------------------------------------------------------------------


def machine() -> dict:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "platform": platform.platform(),
        "loadavg_at_start": load,
    }


def memory_bandwidth(gib: float = 1.0, repeats: int = 5) -> dict:
    """Bytes/s of large transfers, best of several runs each: a single-threaded copy (read + write
    counted) and a multi-threaded read (torch sum over every core). The highest is the floor's
    bandwidth: the most the machine showed it can stream."""
    import torch

    n = int(gib * 2**30) // 4
    src = np.ones(n, dtype=np.float32)
    dst = np.empty_like(src)

    def best(fn) -> float:
        fastest = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            fastest = min(fastest, time.perf_counter() - t)
        return fastest

    copy = 2 * n * 4 / best(lambda: np.copyto(dst, src))
    tensor = torch.from_numpy(src)
    read = n * 4 / best(lambda: tensor.sum())
    return {"copy_bytes_per_s": copy, "read_bytes_per_s": read, "best": max(copy, read)}


def gemv_bandwidth(threads: int | None, rows: int = 4096, cols: int = 16384, repeats: int = 20) -> float:
    """Bytes/s at which ONNX Runtime's CPU MatMul streams a 256 MiB fp32 weight for one input row, on the
    engines' intra-op thread count: what a decode step's MatMuls can reach at best, when one core cannot
    draw the machine's whole bandwidth."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    weight = np.random.default_rng(0).standard_normal((rows, cols), dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "gemv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, rows])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, cols])],
        [numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    x = np.ones((1, rows), np.float32)
    for _ in range(3):
        session.run(None, {"x": x})
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        session.run(None, {"x": x})
        times.append(time.perf_counter() - t)
    return weight.nbytes / median(times)


# --- llama3v -------------------------------------------------------------------------------------


def run_llama3v(args, contexts: list[int], model: Path | None = None) -> dict:
    cmd = [
        str(args.llama3v),
        "bench",
        "--model",
        str(model or args.model),
        "--no-verify-hashes",
        "--prompt-tokens",
        str(args.prompt_tokens),
        "--new-tokens",
        str(args.new_tokens),
        "--images",
        str(args.images),
        "--contexts",
        ",".join(map(str, contexts)),
        "--repeats",
        str(args.repeats),
        "--json",
    ]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    log("llama3v: " + " ".join(cmd))
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    report = json.loads(out.stdout)
    return {
        "command": " ".join(cmd),
        "vision_ms_per_image": report["vision_ms_per_image"],
        "prefill_tokens": report["prefill_tokens"],
        "prefill_tokens_per_s": report["prefill_tokens_per_s"],
        "ttft_ms": report["ttft_ms"],
        # Keyed by the requested context (the first point runs 3 untimed warm-up steps first).
        "decode": {
            c: {"tokens_per_s": 1e3 / d["step_ms"], "step_ms": d["step_ms"]}
            for c, d in zip(contexts, report["decode"], strict=True)
        },
        "overhead": {c: [d["overhead_us"], d["overhead_pct"]] for c, d in zip(contexts, report["decode"], strict=True)},
        "peak_rss_mib": (report["peak_rss_bytes"] or 0) / 2**20,
        "decoder_weight_bytes": report["decoder_weight_bytes"],
        "kv_cache_bytes": report["kv_cache_bytes"],
        "raw": report,
    }


# --- transformers --------------------------------------------------------------------------------


def run_transformers(args, manifest: dict, contexts: list[int]) -> dict:
    import torch
    from transformers import LlavaForConditionalGeneration
    from transformers.generation.streamers import BaseStreamer

    if args.threads:
        torch.set_num_threads(args.threads)

    class Clock(BaseStreamer):
        """Timestamps each `put`: the first is the prompt, then one per generated token."""

        def __init__(self):
            self.times: list[float] = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    log("transformers: loading")
    model = LlavaForConditionalGeneration.from_pretrained(args.checkpoint, dtype=torch.float32)
    model.eval()
    rng = np.random.default_rng(args.seed)
    image = manifest["image"]
    text = manifest["text"]
    img_tok = image["image_token_id"]

    def ids_of(n_text: int, n_images: int) -> torch.Tensor:
        vocab = manifest["model"]["vocab_size"]
        ids = rng.integers(0, vocab, size=max(n_text - 1, 0))
        ids[ids == img_tok] = 0
        seq = [text["bos_token_id"]] + [img_tok] * (n_images * image["tokens_per_image"])
        return torch.tensor([seq + ids.tolist()], dtype=torch.long)

    def generate(ids, pixels, new_tokens):
        clock = Clock()
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                # Text-only prompts pass no pixel_values at all: generate would encode None.
                **({"pixel_values": pixels} if pixels is not None else {}),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                streamer=clock,
            )
        # times[0]: prompt handed in; times[1]: first token; then one per decode step.
        ttft = (clock.times[1] - start) * 1e3
        steps = [(b - a) * 1e3 for a, b in zip(clock.times[1:], clock.times[2:], strict=False)]
        return ttft, steps

    pixels = torch.randn(args.images, 3, image["height"], image["width"]) if args.images else None
    ids = ids_of(args.prompt_tokens, args.images)
    vision, ttfts = [], []
    short_steps: list[float] = []
    for rep in range(args.repeats + 1):
        log(f"transformers: image + prompt {rep}/{args.repeats} ({ids.shape[1]} tokens)")
        if pixels is not None:
            with torch.inference_mode():
                t = time.perf_counter()
                model.model.get_image_features(pixel_values=pixels)
                v = (time.perf_counter() - t) * 1e3
        else:
            v = 0.0
        ttft, steps = generate(ids, pixels, 2 if rep < args.repeats else args.new_tokens + 1)
        if rep > 0:
            vision.append(v)
            ttfts.append(ttft)
        if rep == args.repeats:
            short_steps = steps
    ttft = median(ttfts)
    vision_ms = median(vision) if vision else 0.0
    decode = {}
    for context in contexts:
        if context == args.prompt_tokens + args.images * image["tokens_per_image"]:
            steps = short_steps
        else:
            log(f"transformers: decode at context {context}")
            _, steps = generate(ids_of(context, 0), None, args.new_tokens + 1)
        decode[context] = {"tokens_per_s": 1e3 / median(steps), "step_ms": median(steps)}
    prefill_ms = ttft - vision_ms
    n = ids.shape[1]
    result = {
        "vision_ms_per_image": vision_ms / max(args.images, 1),
        "prefill_tokens": n,
        # generate's first token = vision + prefill + first sampling; vision is timed separately.
        "prefill_tokens_per_s": n / (prefill_ms / 1e3),
        "ttft_ms": ttft,
        "decode": decode,
        "threads": torch.get_num_threads(),
    }
    return result


# --- onnxruntime-genai ---------------------------------------------------------------------------


def extract_llama(checkpoint: Path, out: Path) -> None:
    """The checkpoint's Llama text model (decoder + LM head) as a LlamaForCausalLM directory."""
    import torch
    from transformers import LlamaForCausalLM, LlavaForConditionalGeneration

    llava = LlavaForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32)
    llama = LlamaForCausalLM(llava.config.text_config)
    state = {"model." + k: v for k, v in llava.model.language_model.state_dict().items()}
    state["lm_head.weight"] = llava.lm_head.weight
    missing, unexpected = llama.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise SystemExit(f"Llama extraction: missing {missing}, unexpected {unexpected}")
    llama.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (checkpoint / name).exists():
            (out / name).write_bytes((checkpoint / name).read_bytes())


def genai_model(args, precision: str, block_size: int | None = None) -> Path:
    """Builds (once) onnxruntime-genai's graph of the checkpoint's Llama weights; int4 with `block_size` (genai's
    default, 32, when None)."""
    out = args.work / (f"genai-{precision}" if block_size is None else f"genai-{precision}-block{block_size}")
    if (out / "genai_config.json").exists():
        return out
    llama = args.work / "llama"
    if not (llama / "config.json").exists():
        log(f"extracting the Llama text model to {llama}")
        extract_llama(args.checkpoint, llama)
    cmd = [
        sys.executable,
        "-m",
        "onnxruntime_genai.models.builder",
        "-m",
        str(llama),
        "-i",
        str(llama),
        "-o",
        str(out),
        "-p",
        precision,
        "-e",
        "cpu",
        "-c",
        str(args.work / "cache"),
    ]
    if block_size is not None:
        cmd += ["--extra_options", f"block_size={block_size}"]
    log("onnxruntime-genai builder: " + " ".join(cmd))
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return out


def run_genai(args, path: Path, manifest: dict, prefill_tokens: int, contexts: list[int]) -> dict:
    import onnxruntime_genai as og

    log(f"onnxruntime-genai: loading {path}")
    config = og.Config(str(path))
    if args.threads:
        session = {"intra_op_num_threads": args.threads}
        config.overlay(json.dumps({"model": {"decoder": {"session_options": session}}}))
    model = og.Model(config)
    rng = np.random.default_rng(args.seed)
    vocab = manifest["model"]["vocab_size"]
    bos = manifest["text"]["bos_token_id"]

    def run(n_prompt: int, new_tokens: int):
        ids = np.concatenate([[bos], rng.integers(0, vocab - 1, size=n_prompt - 1)]).astype(np.int32)
        params = og.GeneratorParams(model)
        params.set_search_options(
            max_length=n_prompt + new_tokens + 1, do_sample=False, min_length=n_prompt + new_tokens
        )
        gen = og.Generator(model, params)
        t = time.perf_counter()
        gen.append_tokens(ids)
        prefill = (time.perf_counter() - t) * 1e3
        steps = []
        for _ in range(new_tokens):
            t = time.perf_counter()
            gen.generate_next_token()
            steps.append((time.perf_counter() - t) * 1e3)
        return prefill, steps

    run(16, 2)  # warm-up
    prefills, ttfts = [], []
    for rep in range(args.repeats):
        log(f"onnxruntime-genai: prefill {rep + 1}/{args.repeats} ({prefill_tokens} tokens)")
        prefill, steps = run(prefill_tokens, 1)
        prefills.append(prefill)
        ttfts.append(prefill + steps[0])
    decode = {}
    for context in contexts:
        log(f"onnxruntime-genai: decode at context {context}")
        _, steps = run(context, args.new_tokens + 1)
        # The first generate_next_token after append_tokens only samples the prefill's logits.
        decode[context] = {
            "tokens_per_s": 1e3 / median(steps[1:]),
            "step_ms": median(steps[1:]),
        }
    return {
        "prefill_tokens": prefill_tokens,
        "prefill_tokens_per_s": prefill_tokens / (median(prefills) / 1e3),
        "ttft_ms": median(ttfts),
        "decode": decode,
    }


# --- report --------------------------------------------------------------------------------------


def merge_rounds(rounds: list[dict]):
    """The median over rounds of every number (recursively through dicts); other values from round 1.

    On a shared machine the load moves between engines' turns; whole rounds repeated and medians taken
    keep one engine's bad minute from deciding a ratio."""
    first = rounds[0]
    if isinstance(first, dict):
        return {k: merge_rounds([r[k] for r in rounds if k in r]) for k in first}
    if isinstance(first, (int, float)) and not isinstance(first, bool):
        return median(rounds)
    return first


def table(results: dict, contexts: list[int], floor: dict) -> str:
    names = [n for n in ("llama3v", "transformers", "genai-fp32", "llama3v-int4", "genai-int4") if n in results]
    rows = [("vision ms/image (lower)", "vision_ms_per_image", None, False)]
    rows += [("prefill tokens/s", "prefill_tokens_per_s", None, True)]
    rows += [("ttft ms (lower)", "ttft_ms", None, False)]
    rows += [(f"decode tok/s @ {c}", "decode", c, True) for c in contexts]
    width = 26
    int4_pair = "llama3v-int4" in results and "genai-int4" in results
    head = f"{'':{width}}" + "".join(f"{n:>14}" for n in names) + f"{'ours/best':>12}"
    head += f"{'int4 ours/genai':>16}" if int4_pair else ""
    lines = [head, "-" * len(head)]
    for label, key, ctx, higher in rows:
        vals = {}
        for n in names:
            v = results[n].get(key)
            if ctx is not None:
                v = (v or {}).get(ctx, {}).get("tokens_per_s")
            vals[n] = v
        # int4 is a different precision: it is shown but never the fp32 comparison's "best peer".
        peers = [v for n, v in vals.items() if n not in ("llama3v", "llama3v-int4", "genai-int4") and v is not None]
        ours = vals.get("llama3v")
        ratio = ""
        if ours is not None and peers:
            best = max(peers) if higher else min(peers)
            ratio = f"{(ours / best if higher else best / ours):.2f}x"
        cells = "".join(f"{v:>14.1f}" if v is not None else f"{'-':>14}" for v in vals.values())
        int4 = ""
        if vals.get("llama3v-int4") is not None and vals.get("genai-int4") is not None:
            a, b = vals["llama3v-int4"], vals["genai-int4"]
            int4 = f"{(a / b if higher else b / a):.2f}x"
        lines.append(f"{label:{width}}{cells}{ratio:>12}{int4:>16}")
    lines.append("(ratio > 1: llama3v faster; int4 rows are compared only with each other)")
    lines.append(
        f"memory bandwidth {floor['bandwidth_gb_s']:.1f} GB/s (best of 1 GiB copy "
        f"{floor['copy_gb_s']:.1f}, read {floor['read_gb_s']:.1f}); "
        f"decoder weights {floor['decoder_weight_mb']:.1f} MB/token -> floor "
        f"{floor['floor_tokens_per_s']:.1f} tok/s; llama3v decode @ {contexts[0]} is "
        f"{100 * floor['fraction']:.0f}% of it"
    )
    lines.append(
        f"one-row MatMul on the engines' threads streams {floor['gemv_gb_s']:.1f} GB/s -> floor "
        f"{floor['gemv_floor_tokens_per_s']:.1f} tok/s at that rate; llama3v decode @ {contexts[0]} is "
        f"{100 * floor['gemv_fraction']:.0f}% of it"
    )
    return "\n".join(lines)


def goal_lines(results: dict, contexts: list[int]) -> list[str]:
    """Each goal of the performance issue: the measured value beside its target, and met or not."""
    ours = results["llama3v"]
    fp32_peers = [results[n] for n in ("transformers", "genai-fp32") if n in results]
    lines = []

    def line(what: str, value: float, target: str, met: bool) -> None:
        lines.append(f"goal {what}: {value:.2f} (target {target}) {'met' if met else 'NOT met'}")

    if fp32_peers:
        for ctx in contexts:
            best = max(p["decode"][ctx]["tokens_per_s"] for p in fp32_peers)
            ratio = ours["decode"][ctx]["tokens_per_s"] / best
            line(f"fp32 decode @ {ctx} / best fp32 peer", ratio, ">= 1.2", ratio >= 1.2)
        best = max(p["prefill_tokens_per_s"] for p in fp32_peers)
        ratio = ours["prefill_tokens_per_s"] / best
        line("prefill tokens/s / best fp32 peer", ratio, ">= 1.2", ratio >= 1.2)
    if "llama3v-int4" in results and "genai-int4" in results:
        for ctx in contexts:
            ours4, theirs4 = results["llama3v-int4"]["decode"][ctx], results["genai-int4"]["decode"][ctx]
            ratio = ours4["tokens_per_s"] / theirs4["tokens_per_s"]
            line(f"int4 decode @ {ctx} / genai-int4", ratio, ">= 1.2", ratio >= 1.2)
    for ctx, (_, pct) in ours["overhead"].items():
        line(f"runtime overhead % of a decode step @ {ctx}", pct, "<= 2", pct <= 2)
    if len(contexts) > 1:
        long_short = ours["decode"][contexts[-1]]["tokens_per_s"] / ours["decode"][contexts[0]]["tokens_per_s"]
        line(f"decode @ {contexts[-1]} / decode @ {contexts[0]}", long_short, ">= 0.85", long_short >= 0.85)
    weights = ours["raw"]["weight_bytes"]
    budget = (weights + ours["kv_cache_bytes"]) / 2**20
    memory = ours["peak_rss_mib"] / budget
    line(f"peak RSS / (graph files + KV cache = {budget:.0f} MiB)", memory, "<= 1.2", memory <= 1.2)
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True, help="Hugging Face LLaVA checkpoint")
    p.add_argument("--model", type=Path, required=True, help="its llama3v export")
    p.add_argument("--work", type=Path, required=True, help="folder for the peers' models")
    p.add_argument("--llama3v", type=Path, default=REPO / "target/release/llama3v")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--images", type=int, default=1)
    p.add_argument("--long-context", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="default: every core")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=1, help="repeat every engine; report medians")
    p.add_argument("--int4", action="store_true", help="also onnxruntime-genai int4, and llama3v on --int4-model")
    p.add_argument("--int4-model", type=Path, help="llama3v-export --quant int4 of the same checkpoint")
    p.add_argument("--skip", nargs="*", default=[], choices=["transformers", "genai"])
    p.add_argument("--json-out", type=Path)
    args = p.parse_args(argv)
    if args.int4_model and not args.int4:
        p.error("--int4-model needs --int4")
    int4_block = None
    if args.int4_model:
        quant = json.loads((args.int4_model / "manifest.json").read_text()).get("quantization") or {}
        if quant.get("method") != "int4":
            p.error(f"{args.int4_model} is not an int4 export (manifest quantization: {quant or None})")
        # genai quantizes with the same block size, so both engines run the same weights' layout.
        int4_block = quant.get("block_size")
    args.work.mkdir(parents=True, exist_ok=True)

    manifest = json.loads((args.model / "manifest.json").read_text())
    max_context = manifest["model"]["max_context"]
    prefill_tokens = args.prompt_tokens + args.images * manifest["image"]["tokens_per_image"]
    long_ctx = min(args.long_context, max_context - args.new_tokens - 2)
    contexts = [prefill_tokens, long_ctx] if long_ctx > prefill_tokens else [prefill_tokens]

    info = machine()
    log(f"machine: {info}")
    peers = {}
    if "genai" not in args.skip:
        peers["genai-fp32"] = genai_model(args, "fp32")
        if args.int4:
            peers["genai-int4"] = genai_model(args, "int4", int4_block if int4_block != 32 else None)

    rounds = []
    for round_ in range(args.rounds):
        log(f"round {round_ + 1}/{args.rounds}")
        results = {"llama3v": run_llama3v(args, contexts)}
        if args.int4_model:
            results["llama3v-int4"] = run_llama3v(args, contexts, args.int4_model)
        if "transformers" not in args.skip:
            results["transformers"] = run_transformers(args, manifest, contexts)
        for name, path in peers.items():
            results[name] = run_genai(args, path, manifest, prefill_tokens, contexts)
        rounds.append(results)
    results = merge_rounds(rounds)

    log("memory bandwidth: 1 GiB copy and read")
    bw = memory_bandwidth()
    bandwidth = bw["best"]
    weights = results["llama3v"]["decoder_weight_bytes"]
    floor_tps = bandwidth / weights
    ours = results["llama3v"]["decode"][contexts[0]]["tokens_per_s"]
    log(f"MatMul streaming rate on {args.threads or 'every'} thread(s)")
    gemv = gemv_bandwidth(args.threads)
    floor = {
        "copy_gb_s": bw["copy_bytes_per_s"] / 1e9,
        "read_gb_s": bw["read_bytes_per_s"] / 1e9,
        "bandwidth_gb_s": bandwidth / 1e9,
        "decoder_weight_mb": weights / 1e6,
        "floor_tokens_per_s": floor_tps,
        "fraction": ours / floor_tps,
        "gemv_gb_s": gemv / 1e9,
        "gemv_floor_tokens_per_s": gemv / weights,
        "gemv_fraction": ours / (gemv / weights),
    }
    info["loadavg_at_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    text = table(results, contexts, floor)
    print(f"machine: {info['nproc']} CPUs, {info['cpu']}; load average {info['loadavg_at_start']}")
    print(f"intra-op threads: {args.threads or 'every core (each engine default)'}")
    print(f"medians over {args.rounds} round(s) of every engine")
    print(text)
    over = results["llama3v"]["overhead"]
    for ctx, (us, pct) in over.items():
        print(f"llama3v runtime overhead per decode step @ {ctx}: {us:.0f} us = {pct:.2f} %")
    print(
        f"llama3v peak RSS {results['llama3v']['peak_rss_mib']:.0f} MiB "
        f"(decoder weights {weights / 2**20:.0f} MiB, "
        f"KV cache {results['llama3v']['kv_cache_bytes'] / 2**20:.1f} MiB)"
    )
    goals = goal_lines(results, contexts)
    print("\n".join(goals))
    if args.json_out:
        args.json_out.write_text(
            json.dumps(
                {"machine": info, "floor": floor, "results": results, "rounds": rounds, "goals": goals},
                indent=2,
                default=str,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
