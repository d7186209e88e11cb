#!/usr/bin/env bash
# The whole test suite: setup (idempotent), format and lint checks, Rust unit tests, and the end-to-end
# Python tests that cross-check the runtime against transformers.
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/setup.sh

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --release --all-targets --quiet -- -D warnings
echo "== ruff"
.venv/bin/ruff check export train tests scripts
.venv/bin/ruff format --check export train tests scripts
echo "== cargo test"
cargo test --release --quiet
echo "== pytest"
LLAMA3V_BIN="$PWD/target/release/llama3v" .venv/bin/python -m pytest -q tests/python "$@"
