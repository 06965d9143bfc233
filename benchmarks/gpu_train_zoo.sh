#!/usr/bin/env bash
# Train the v2 demo models on one GPU (benchmarks/README.md, "GPU session"): the pool once, then the DiT and the
# DDiTs (score entropy, MDLM, CE over all positions) in parallel processes on the same card. Writes
# OUT/demo-dit-v2, OUT/demo-ddit-v2-{sedd,mdlm,ceall} (fp16 EMA weights, config, recipe.json, tokenizer), OUT/log/*.
#   OUT=/some/dir bash benchmarks/gpu_train_zoo.sh            # on the GPU machine ($OUT is set by the device tool)
#   OUT=/tmp/x bash benchmarks/gpu_train_zoo.sh --smoke       # on a CPU, seconds
# MAX_SECONDS (default 330) caps each model's training loop so the whole script ends within ~7 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:?set OUT to the output folder}"
SMOKE=()
POOL=(--pool 100000)
if [[ "${1:-}" == "--smoke" ]]; then SMOKE=(--smoke); POOL=(--pool 64 --workers 1); fi
CACHE="$(mktemp -d)/pool.npz"
mkdir -p "$OUT/log"
python - <<'PY' > "$OUT/log/env.txt" 2>&1 || true
import platform, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "python", platform.python_version())
print("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")
PY
python benchmarks/gpu_train_zoo.py pool --cache "$CACHE" "${POOL[@]}" 2>&1 | tee "$OUT/log/pool.txt"
MAX=(--max-seconds "${MAX_SECONDS:-330}")
pids=()
python benchmarks/gpu_train_zoo.py dit --cache "$CACHE" --out "$OUT/demo-dit-v2" "${SMOKE[@]}" "${MAX[@]}" \
  > "$OUT/log/dit.txt" 2>&1 & pids+=($!)
python benchmarks/gpu_train_zoo.py ddit --loss score_entropy --cache "$CACHE" --out "$OUT/demo-ddit-v2-sedd" \
  "${SMOKE[@]}" "${MAX[@]}" > "$OUT/log/ddit-sedd.txt" 2>&1 & pids+=($!)
python benchmarks/gpu_train_zoo.py ddit --loss mdlm --cache "$CACHE" --out "$OUT/demo-ddit-v2-mdlm" \
  "${SMOKE[@]}" "${MAX[@]}" > "$OUT/log/ddit-mdlm.txt" 2>&1 & pids+=($!)
python benchmarks/gpu_train_zoo.py ddit --loss ce_all --cache "$CACHE" --out "$OUT/demo-ddit-v2-ceall" \
  "${SMOKE[@]}" "${MAX[@]}" > "$OUT/log/ddit-ceall.txt" 2>&1 & pids+=($!)
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
rm -f "$CACHE"
tail -n 3 "$OUT"/log/*.txt
for f in "$OUT"/demo-*/recipe.json; do python -c "import json,sys; r=json.load(open(sys.argv[1])); \
print(sys.argv[1], r['device_name'], r['steps_done'], 'steps', r['seconds'], 's, loss', round(r['first_loss'],3), '->', round(r['final_loss'],3))" "$f"; done
exit $status
