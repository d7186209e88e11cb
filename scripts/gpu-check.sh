#!/usr/bin/env bash
# The GPU check, in one go on a machine with an NVIDIA GPU (about 10 minutes): sets up with the
# onnxruntime-gpu wheel (LLAMA3V_GPU=1 ./scripts/setup.sh; needs the package index, or a .venv already set
# up that way), exports a tiny and a mid checkpoint in fp32, fp16 and fp16 with the fused decoder, runs
# `llama3v check` on cpu, cuda and tensorrt (the fused decoder: cpu and cuda; each GPU list also against cpu,
# stage by stage), runs `llama3v bench` on each provider where that
# subcommand exists, and prints one table:
#   model, provider, pass, max logits diff vs cpu, greedy agreement vs cpu, TTFT, decode tok/s.
# The full reports stay in $LLAMA3V_GPU_CHECK_DIR (default: a new temporary directory).
#
#   ./scripts/gpu-check.sh                      # everything
#   LLAMA3V_GPU_CHECK_SKIP_SETUP=1 ./scripts/gpu-check.sh   # .venv and target/release already GPU-ready
#   LLAMA3V_GPU_CHECK_PRESETS="tiny-a" ./scripts/gpu-check.sh
set -uo pipefail
cd "$(dirname "$0")/.."

if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu-check: no NVIDIA GPU here (nvidia-smi -L failed)" >&2
    exit 2
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader

if [ "${LLAMA3V_GPU_CHECK_SKIP_SETUP:-0}" != 1 ]; then
    LLAMA3V_GPU=1 ./scripts/setup.sh || { echo "gpu-check: setup failed" >&2; exit 2; }
fi
py=.venv/bin/python
bin=./target/release/llama3v
[ -x "$bin" ] || { echo "gpu-check: $bin missing (cargo build --release)" >&2; exit 2; }
"$py" -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())"

work=${LLAMA3V_GPU_CHECK_DIR:-$(mktemp -d /tmp/llama3v-gpu-check.XXXXXX)}
mkdir -p "$work"
# Engines and the timing cache live with this run: the second command on a model reuses the first's.
export LLAMA3V_CACHE_DIR="$work/cache"
echo "== reports and caches in $work"

presets=${LLAMA3V_GPU_CHECK_PRESETS:-"tiny-a mid"}
# Export variants: the float type, and `-fused` for `--decoder fused` (ONNX Runtime contrib ops, which
# TensorRT does not take; CUDA's GroupQueryAttention is float16 only).
variants="fp32 fp16 fp16-fused"
providers_for() {
    case "$1" in
        *-fused) echo "cuda" ;;
        *) echo "cuda tensorrt,cuda" ;;
    esac
}
have_bench=0
"$bin" bench --help >/dev/null 2>&1 && have_bench=1

# Checkpoints, then every export side by side (each validates against PyTorch and computes the
# reference: the longest part of the run on one core each).
pids=()
for preset in $presets; do
    ckpt="$work/$preset-ckpt"
    [ -f "$ckpt/config.json" ] || .venv/bin/llama3v-tiny --preset "$preset" --out "$ckpt" >"$work/$preset-tiny.log" 2>&1 \
        || { echo "gpu-check: llama3v-tiny $preset failed (see $work/$preset-tiny.log)" >&2; exit 2; }
    for variant in $variants; do
        model="$work/$preset-$variant"
        [ -f "$model/manifest.json" ] && continue
        decoder=plain
        [ "${variant%-fused}" != "$variant" ] && decoder=fused
        echo "== export $preset $variant"
        .venv/bin/llama3v-export --checkpoint "$ckpt" --out "$model" --dtype "${variant%-fused}" \
            --decoder "$decoder" --reference >"$work/$preset-$variant-export.log" 2>&1 &
        pids+=($!)
    done
done
for pid in "${pids[@]}"; do
    wait "$pid" || { echo "gpu-check: an export failed (see $work/*-export.log)" >&2; exit 2; }
done

for preset in $presets; do
    for variant in $variants; do
        model="$work/$preset-$variant"
        tag="$preset-$variant"
        read -r -a providers <<<"$(providers_for "$variant")"
        echo "== check $tag on cpu"
        "$bin" check --model "$model" --ep cpu --json >"$work/$tag.cpu.check.json" 2>"$work/$tag.cpu.check.err"
        for ep in "${providers[@]}"; do
            name=${ep%%,*}
            echo "== check $tag on $ep against cpu"
            start=$SECONDS
            "$bin" check --model "$model" --ep "$ep" --against cpu --json \
                >"$work/$tag.$name.check.json" 2>"$work/$tag.$name.check.err"
            echo "   exit $?, $((SECONDS - start)) s (first TensorRT load builds engines)"
        done
        if [ "$have_bench" = 1 ]; then
            for ep in cpu "${providers[@]}"; do
                name=${ep%%,*}
                echo "== bench $tag on $ep"
                "$bin" bench --model "$model" --ep "$ep" --json --repeats 2 --new-tokens 32 --contexts 128,1024 \
                    >"$work/$tag.$name.bench.json" 2>"$work/$tag.$name.bench.err"
            done
            # The batch engine on CUDA under 1, 4 and 8 concurrent clients.
            echo "== bench $tag on cuda, batched"
            "$bin" bench --model "$model" --ep cuda --json --concurrency 1,4,8 --new-tokens 32 \
                >"$work/$tag.cuda-batch.bench.json" 2>"$work/$tag.cuda-batch.bench.err"
        fi
    done
done

"$py" - "$work" "$presets" "$variants" <<'EOF'
import json
import sys
from pathlib import Path

work, presets, variants = Path(sys.argv[1]), sys.argv[2].split(), sys.argv[3].split()


def load(path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def fell_back(tag, name):
    err = work / f"{tag}.{name}.check.err"
    return err.exists() and "falling back" in err.read_text()


rows = []
for preset in presets:
    for variant in variants:
        tag = f"{preset}-{variant}"
        # TensorRT does not take the fused decoder's contrib ops: it is not run there.
        for name in ("cpu", "cuda") if variant.endswith("-fused") else ("cpu", "cuda", "tensorrt"):
            check = load(work / f"{tag}.{name}.check.json")
            bench = load(work / f"{tag}.{name}.bench.json")
            if name == "cpu":
                ok = None if check is None else all(
                    all(m["pass"] for m in c["measures"]) for c in check["cases"]
                )
                diff, agree = "-", "-"
            elif check is None:
                ok, diff, agree = None, "-", "-"
            else:
                s = check["summary"]
                ok = check["pass"]
                diff = f"{s['max_logits_diff']:.2e}"
                agree = f"{s['greedy_agreement']}/{s['greedy_steps']}"
            status = {True: "pass", False: "FAIL", None: "ERROR"}[ok]
            if name != "cpu" and fell_back(tag, name):
                status += " (fell back)"
            ttft, tps = "-", "-"
            if bench:
                ttft = f"{bench['ttft_ms']:.1f}"
                tps = " / ".join(f"{d['tokens_per_s']:.0f}@{d['context']}" for d in bench.get("decode", []))
            rows.append((tag, name, status, diff, agree, ttft, tps))
        batched = load(work / f"{tag}.cuda-batch.bench.json")
        if batched:
            tps = " / ".join(f"{r['aggregate_tokens_per_s']:.0f}@{r['config']['concurrency']}" for r in batched)
            ttft = " / ".join(f"{r['ttft_ms']['p50']:.1f}" for r in batched)
            rows.append((tag, "cuda, batched (tok/s@clients)", "bench only", "-", "-", ttft, tps))

head = ("model", "provider", "check", "max logit diff vs cpu", "greedy vs cpu", "TTFT ms", "decode tok/s")
widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
for r in [head, *rows]:
    print("  ".join(str(v).ljust(w) for v, w in zip(r, widths)))
for tag, name, status, *_ in rows:
    if status == "ERROR":
        err = work / f"{tag}.{name}.check.err"
        lines = [line for line in err.read_text().splitlines() if line.startswith("error:")] if err.exists() else []
        print(f"{tag} {name}: {lines[-1] if lines else 'no report (see ' + str(err) + ')'}")
print("logit diffs: fp32 absolute (tolerance 1e-4), fp16 relative to the largest logit (tolerance 1e-2)")
print(f"full reports: {work}")
sys.exit(0 if all(r[2] in ("pass", "bench only") for r in rows) else 1)
EOF
