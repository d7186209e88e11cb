#!/bin/sh
# Installs ONNX Runtime's GPU build and TensorRT's libraries into the virtual environment $1, the way
# `LLAMA3V_GPU=1 scripts/setup.sh` does: onnxruntime-gpu 1.31 (CUDA 13 and cuDNN 9 come from the image's
# NVIDIA base, so the wheel's cuda/cudnn extras are left out) and tensorrt-cu13-libs of the major version
# that ONNX Runtime's TensorRT provider library links against (read from the library itself).
set -eu
venv=$1
py=$venv/bin/python
"$py" -m pip install --no-cache-dir "onnxruntime-gpu==1.31.*"
capi=$("$py" -c "import onnxruntime, os; print(os.path.join(os.path.dirname(onnxruntime.__file__), 'capi'))")
trt_major=$("$py" - "$capi/libonnxruntime_providers_tensorrt.so" <<'PYEOF'
import re, sys
data = open(sys.argv[1], "rb").read()
found = sorted(set(re.findall(rb"libnvinfer\.so\.(\d+)", data)))
if not found:
    sys.exit("no libnvinfer.so.N named in " + sys.argv[1])
print(found[0].decode())
PYEOF
)
echo "TensorRT provider links libnvinfer.so.$trt_major: installing tensorrt-cu13-libs==$trt_major.*"
"$py" -m pip install --no-cache-dir "tensorrt-cu13-libs==$trt_major.*"
