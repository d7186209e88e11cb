#!/usr/bin/env bash
# The container's entry point: `llama3v serve` with flags from the environment, then any arguments.
#
# Every variable LLAMA3V_SERVE_<NAME>=VALUE becomes the flag --<name> VALUE (NAME lower-cased, `_` -> `-`):
#   LLAMA3V_SERVE_PORT=8000             -> --port 8000
#   LLAMA3V_SERVE_MAX_BATCH=8      -> --max-batch 8
#   LLAMA3V_SERVE_EP=tensorrt,cuda,cpu  -> --ep tensorrt,cuda,cpu
#   LLAMA3V_SERVE_NO_VERIFY_HASHES=true -> --no-verify-hashes   (true: the bare flag; false or empty: left out)
# in the variables' sorted order; arguments given to the container come after them, so they can add a
# repeatable flag (--ep-option ...). LLAMA3V_MODEL (the model directory) and LLAMA3V_API_KEY are read
# by llama3v itself; the key is never put on a command line, where the process list would show it.
# LLAMA3V_BIN names the binary (default: llama3v on PATH).
set -euo pipefail

flags=()
while IFS= read -r name; do
    value=${!name}
    flag=${name#LLAMA3V_SERVE_}
    flag=--$(printf '%s' "$flag" | tr '[:upper:]_' '[:lower:]-')
    case "$value" in
        true) flags+=("$flag") ;;
        false | "") ;;
        *) flags+=("$flag" "$value") ;;
    esac
done < <(compgen -e | grep '^LLAMA3V_SERVE_' | LC_ALL=C sort)

exec "${LLAMA3V_BIN:-llama3v}" serve "${flags[@]}" "$@"
