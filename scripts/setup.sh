#!/usr/bin/env bash
# Sets up everything on a fresh machine: the Python environment in .venv (export stage, ONNX Runtime's
# shared library, test tools), the Rust build, and the default model in models/default with an example
# image. Safe to run again: finished steps are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=.venv
py=$venv/bin/python
if [ ! -x "$py" ]; then
    echo "== creating $venv"
    python3 -m venv "$venv"
fi
if ! "$py" -c "import llama3v_export, llama_models, pytest" 2>/dev/null; then
    echo "== installing the export stage and test tools into $venv (torch is large: a few minutes)"
    "$py" -m pip install -q --upgrade pip
    "$py" -m pip install -q -e "export[test]"
    # Only the Llama-3 tokenizer file is needed from llama-models, not its dependencies.
    "$py" -m pip install -q --no-deps "llama-models==0.3.*"
fi

echo "== building the runtime and CLI (release)"
cargo build --release --quiet

model=models/default
if [ ! -f "$model/manifest.json" ]; then
    # No trained default model ships yet: the default is a tiny random-weight checkpoint, so its answers
    # are gibberish; it exercises the whole pipeline.
    echo "== exporting the default model (tiny random-weight checkpoint) to $model"
    "$venv/bin/llama3v-tiny" --preset tiny-a --out models/default-checkpoint
    "$venv/bin/llama3v-export" --checkpoint models/default-checkpoint --out "$model" --reference
fi
if [ ! -f models/example.png ]; then
    "$py" -c "from PIL import Image; from skimage import data; Image.fromarray(data.chelsea()).save('models/example.png')"
fi
echo "== setup done: ./target/release/llama3v generate --image models/example.png --prompt 'What is in this image?'"
