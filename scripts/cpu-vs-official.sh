#!/usr/bin/env bash
# Side-by-side CPU timing of `qalign bench` and the official PyTorch scorer, one run after the
# other on the same machine, so PERFORMANCE.md can quote ratios measured together.
#
# Needs a release build of qalign and the official reference set up as ../shared/reference
# describes (a venv with the pinned torch/transformers, the official sources). Not part of CI.
#
#   REF_VENV=/path/to/venv QALIGN_SRC=/path/to/Q-Align scripts/cpu-vs-official.sh OUTDIR [MODEL_DIR ...]
#
# MODEL_DIR is a folder with config.json + preprocessor_config.json + tokenizer files (the official
# side builds its model from it with random init; qalign uses --random-weights), or `tiny` for the
# fixture checkpoint. Default: tiny. DTYPES (default "f32 bf16") and ITERS (default 3) are env knobs.
# Writes OUTDIR/<name>-<dtype>.{qalign,official}.json and prints one summary line per pair.
set -euo pipefail

out=${1:?usage: cpu-vs-official.sh OUTDIR [MODEL_DIR|tiny ...]}
shift
models=("$@")
[ ${#models[@]} -gt 0 ] || models=(tiny)
root=$(cd "$(dirname "$0")/.." && pwd)
qalign=${QALIGN:-$root/target/release/qalign}
shared=${SHARED:-$root/../shared}
image=${IMAGE:-$root/tests/fixtures/images/boy_colorful.jpg}
iters=${ITERS:-3}
: "${REF_VENV:?set REF_VENV to the official reference venv}"
: "${QALIGN_SRC:?set QALIGN_SRC to the official Q-Align sources}"
[ -x "$qalign" ] || { echo "no qalign binary at $qalign (cargo build --release -p qalign-cli)" >&2; exit 2; }
mkdir -p "$out"

for model in "${models[@]}"; do
  if [ "$model" = tiny ]; then
    name=tiny
    qargs=(--model "$root/tests/fixtures/tiny-onealign")
    ref_model=tiny
  else
    name=$(basename "$model")
    qargs=(--model "$model" --random-weights)
    ref_model=$model
  fi
  for dtype in ${DTYPES:-f32 bf16}; do
    q="$out/$name-$dtype.qalign.json"
    o="$out/$name-$dtype.official.json"
    "$qalign" bench "$image" "${qargs[@]}" --dtype "$dtype" --batch-sizes 1 --frames 0 \
      --warmup 1 --iters "$iters" --format json > "$q"
    TINY_DIR="$root/tests/fixtures/tiny-onealign" QALIGN_SRC="$QALIGN_SRC" \
      "$REF_VENV/bin/python" "$shared/reference/official_cpu_bench.py" --model "$ref_model" \
      --dtype "$dtype" --images "$image" --warmup 1 --iters "$iters" --split > "$o"
    python3 - "$q" "$o" "$name" "$dtype" <<'EOF'
import json, sys
q, o = (json.load(open(p)) for p in sys.argv[1:3])
rows = {r["stage"]: r for r in q["rows"] if r.get("batch") in (None, 1)}
pre = rows["preprocess"]["median_ms_per_item"] / 1e3
score = rows["score_1q"]["median_ms"] / 1e3
enc = rows["encode"]["median_ms"] / 1e3
call = o["scorer_call_s_median"]
print(json.dumps({
    "model": sys.argv[3], "dtype": sys.argv[4],
    "official_scorer_call_s": round(call, 4),
    "qalign_preprocess_plus_score_1q_s": round(pre + score, 4),
    "speedup_call": round(call / (pre + score), 3),
    "official_forward_s": round(o.get("forward_s_median", float("nan")), 4),
    "qalign_score_1q_s": round(score, 4),
    "official_encode_s": round(o.get("encode_images_s_median", float("nan")), 4),
    "qalign_encode_s": round(enc, 4),
    "official_peak_rss_mib": round(o["vmhwm_mb"]),
    "qalign_peak_rss_mib": round(q["peak_rss_mib"]),
}))
EOF
  done
done
