#!/usr/bin/env bash
# Run HERE (a machine with package-registry access), before a GPU session: downloads into wheels/ the pure-Python
# wheels that the GPU machine lacks (it has torch, transformers, tokenizers, safetensors, huggingface_hub, pytest...
# but no diffusers, and no network). Never torch: the GPU machine's own CUDA build must stay.
# Versions are the ones installed here (what the test suite ran with), so both machines run the same diffusers.
# Then carry wheels/ along: run(..., carry=["wheels"]); benchmarks/gpu.sh installs from it. See benchmarks/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
version() { python3 -c "import importlib.metadata as m; print(m.version('$1'))"; }
# diffusers needs importlib_metadata, which needs lazy-importer (and zipp, already there).
pkgs=(diffusers importlib_metadata lazy-importer)
specs=()
for p in "${pkgs[@]}"; do specs+=("$p==$(version "$p")"); done
rm -rf wheels && mkdir -p wheels
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any -d wheels "${specs[@]}"
ls -l wheels
if ls wheels | grep -qi '^torch'; then echo "error: a torch wheel slipped into wheels/" >&2; exit 1; fi
