#!/usr/bin/env bash
# The prepared GPU session (issue 16): install the project on the GPU machine, then run benchmarks/gpu.py, whose
# figures land in OUT/results.json (log: OUT/gpu.log, tests: OUT/pytest.log). Everything, install included, ends
# within GPU_TOTAL_S seconds (default 450: 7.5 minutes, under the 8 asked for): gpu.py gets what the install left,
# less a margin to write its results, and is stopped (SIGINT, then SIGKILL 15 s later) at that deadline.
#   bash benchmarks/gpu.sh OUT [gpu.py options, e.g. --sections dit e2e]
# The GPU machine has torch (its own CUDA build, whatever version), transformers, pytest..., but no diffusers and
# no network: diffusers comes from wheels/ (made here by benchmarks/gpu_wheels.sh, carried along with the tree).
# Nothing here assumes a torch version, and nothing installs or upgrades torch.
set -uo pipefail
out=${1:?usage: bash benchmarks/gpu.sh OUT_DIR [gpu.py options]}
shift
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
log="$out/gpu.log"
py=${PYTHON:-python3}
{
    echo "== $(date -u +%FT%TZ) $(hostname); $($py -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__, "CUDA", torch.version.cuda)')"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>&1 || true
    if ! $py -c "import diffusers" 2>/dev/null; then
        if ls wheels/*.whl >/dev/null 2>&1; then
            $py -m pip install -q --no-index --find-links wheels --no-deps wheels/*.whl
        else
            echo "warning: no diffusers here and no wheels/ (run benchmarks/gpu_wheels.sh and carry wheels)"
        fi
    fi
    # The package itself: editable, no dependencies, no build isolation (which would try to fetch setuptools).
    # DIFFFEAT_NO_INSTALL=1 skips it (a machine whose environment must not change; PYTHONPATH=src does as well).
    if [ -z "${DIFFFEAT_NO_INSTALL:-}" ]; then
        $py -m pip install -q --no-deps --no-build-isolation -e . || echo "warning: editable install failed; using PYTHONPATH=src"
    fi
} 2>&1 | tee "$log"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
total=${GPU_TOTAL_S:-450}
left=$((total - SECONDS - 15))  # 15 s for the SIGINT -> SIGKILL grace
echo "== install took ${SECONDS} s; gpu.py gets ${left} s (its sections $((left - 20)) s)" | tee -a "$log"
timeout --signal=INT --kill-after=15 "$left" $py benchmarks/gpu.py --out "$out" --budget-s "$((left - 20))" "$@" 2>&1 \
    | tee -a "$log"
status=${PIPESTATUS[0]}
echo "== gpu.py exit status $status; results in $out/results.json" | tee -a "$log"
exit "$status"
