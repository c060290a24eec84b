#!/usr/bin/env bash
# One-shot GPU check of a `qalign` built with `--features cuda` (see scripts/cuda-env.sh), run from
# the repository root on a machine with an NVIDIA GPU, its driver and NVIDIA's cuBLAS/cuRAND 13
# libraries (e.g. PyTorch's pip wheels). It checks the tiny fixture model's scores on CUDA
# against tests/fixtures/expected (f32: score15 within 8e-6; f16/bf16: deviations reported), then
# times `qalign bench` on the tiny model and on the real OneAlign dimensions with random weights
# (f16/bf16/f32, then `--quant q4k|q8_0` with the peak GPU memory), then checks the LoRA training
# fixture on CUDA and times `bench --train` at the real dimensions. Given qalign-model's unit test
# binary built with `--features cuda` (`cargo test --release -p qalign-model --features cuda --lib
# --no-run` prints its path), it first runs the fused CUDA kernels against candle's compositions
# (`cuda_fused::gpu_tests`); the f16 bench also runs with QALIGN_CUDA_KERNELS=composed, so the two
# are compared in one run.
# With target/gpu-official (scripts/gpu-official-prep.sh, carried to the GPU machine) it also times
# the official PyTorch code on the same card and writes bench-official-comparison-cuda-f16.json
# with `speedup_vs_official`.
#   scripts/gpu-check.sh QALIGN_BINARY_OR_XZ [OUT_DIR] [MODEL_TESTS_BINARY_OR_XZ]
# Every step runs even if an earlier one failed; results land in OUT_DIR (default ./gpu-check-out),
# packed after each step, so a run cut short still returns what it finished.
#
# A GPU session is short (one command of at most 10 minutes), so the steps run in order of what
# the open issues need most, within a time budget: GPU_CHECK_BUDGET_S (default 540) seconds from
# the start; a step that cannot get GPU_CHECK_MIN_S (default 30) seconds is skipped and logged, and
# every command's timeout is cut to what is left. GPU_CHECK_STEPS (comma-separated) runs only the
# steps named, e.g. the ones a first call skipped:
#   kernels   the fused kernels' GPU tests (needs the test binary)
#   fixtures  the tiny model's scores on CUDA f32/f16/bf16 and the CPU against expected.json
#   f16       bench at the real OneAlign dims, f16, batch 1/8/32/64, with files_1q rows
#   official  the official PyTorch code on the same card (needs target/gpu-official), speed-up
#   composed  the f16 bench with QALIGN_CUDA_KERNELS=composed (the fused kernels' gain)
#   bf16      the bench in bf16
#   quant     the bench with --quant q4k and q8_0, with the peak GPU memory
#   tiny      the bench of the tiny fixture model
#   train     the LoRA fixture's two AdamW steps on CUDA
#   f32       the bench in f32
#   trainbench  bench --train at the real dims, bf16
# A rehearsal on a machine without a GPU runs the same steps on the CPU with a small model, to catch
# a broken step before GPU time is spent on it (file names still say "cuda"):
#   GPU_CHECK_DEVICE=cpu GPU_CHECK_REAL_MODEL=tests/fixtures/tiny-onealign GPU_CHECK_BATCH_SIZES=1,8 \
#     scripts/gpu-check.sh target/release/qalign OUT
set -u
start=$(date +%s)
budget=${GPU_CHECK_BUDGET_S:-540}
min_step=${GPU_CHECK_MIN_S:-30}
steps=",${GPU_CHECK_STEPS:-kernels,fixtures,f16,official,composed,bf16,quant,tiny,train,f32,trainbench},"
bin_src=${1:?usage: scripts/gpu-check.sh QALIGN_BINARY_OR_XZ [OUT_DIR] [MODEL_TESTS_BINARY_OR_XZ]}
out=${2:-gpu-check-out}
tests_src=${3:-}
dev=${GPU_CHECK_DEVICE:-cuda}
real=${GPU_CHECK_REAL_MODEL:-docs/bench-configs/onealign}
# Batch sizes of the real-dims benches (f16 and bf16 add 64); a CPU rehearsal wants fewer.
batches=${GPU_CHECK_BATCH_SIZES:-1,8,32}
batches_half=${GPU_CHECK_BATCH_SIZES:-1,8,32,64}
mkdir -p "$out"
work=$(mktemp -d)
log() { echo "== $*"; }
left() { echo $((budget - ($(date +%s) - start))); }
# `cap SECONDS`: a command's timeout, cut to what is left of the budget (at least 1).
cap() { local l; l=$(left); ((l < $1)) && echo $((l > 1 ? l : 1)) || echo "$1"; }
# `step NAME`: whether to run step NAME (asked for, and time left); logs the step or the skip.
step() {
    if [[ $steps != *",$1,"* ]]; then return 1; fi
    if (($(left) < min_step)); then
        log "step $1 skipped: $(left) s of the ${budget} s budget left"
        echo "$1" >> "$work/skipped-steps.txt"
        return 1
    fi
    log "step $1 ($(left) s left)"
}

if [[ $bin_src == *.xz ]]; then xz -dc "$bin_src" > "$work/qalign"; else cp "$bin_src" "$work/qalign"; fi
chmod +x "$work/qalign"
q=$work/qalign
if [ -n "$tests_src" ]; then
    if [[ $tests_src == *.xz ]]; then xz -dc "$tests_src" > "$work/model-tests"; else cp "$tests_src" "$work/model-tests"; fi
    chmod +x "$work/model-tests"
fi

# cuBLAS / cuRAND from the Python wheels next to PyTorch, libcuda from the driver.
nv=$(python3 -c 'import nvidia, sys; print(list(nvidia.__path__)[0])' 2>/dev/null)
if [ -n "$nv" ]; then
    libdirs=$(find "$nv" -name 'lib*.so*' -printf '%h\n' 2>/dev/null | sort -u | tr '\n' ':')
    export LD_LIBRARY_PATH=${libdirs}/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}
fi

summarize() {
    python3 - "$1" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"-- {sys.argv[1].rsplit('/', 1)[-1]}: {r['weights']} weights, {r['device']} {r['dtype']}")
for row in r["rows"]:
    b = row["batch"] if row["batch"] is not None else "-"
    print(f"{row['label']:<62} {b:>3} {row['median_ms']:>10.2f} {row['min_ms']:>10.2f} "
          f"{row['median_ms_per_item']:>9.2f} ms/item {row['items_per_s']:>9.1f}/s")
for x in r["ratios"]:
    print(f"  {x['value']:.2f}  {x['meaning']}")
EOF
}
# Results are packed after every step, so a run cut short still returns what it finished.
# Only results: the binaries and the official code's packages stay out (the device tool brings back
# files of at most 16 MiB).
save() {
    tar -C "$work" -cf "$out/results.tar" --exclude ./qalign --exclude ./model-tests --exclude ./official-pylib .
}

log "machine"
date -u
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || echo "no nvidia-smi"
nproc
grep -m1 'model name' /proc/cpuinfo
echo "ffmpeg: $(command -v ffmpeg || echo none)"
ldd "$q" | grep -E 'cuda|cublas|curand|nvrtc|not found'
echo "device ${dev}, real-dims model ${real}, budget ${budget} s, steps ${steps}"

if [ -n "$tests_src" ] && step kernels; then
    log "fused CUDA kernels against candle's compositions (cuda_fused::gpu_tests)"
    timeout "$(cap 120)" "$work/model-tests" cuda_fused --nocapture --test-threads 1 2>&1 | tee "$work/fused-kernel-tests.txt"
    echo "exit ${PIPESTATUS[0]}"
    save
fi

if step fixtures; then
    log "score on CUDA and CPU (tiny model)"
    inputs=(tests/fixtures/images)
    if command -v ffmpeg > /dev/null; then inputs+=(tests/fixtures/video/baby.mp4); fi
    for run in cuda:f32 cuda:f16 cuda:bf16 cpu:f32; do
        label=${run%%:*} dtype=${run##*:}
        device=$label
        [ "$label" = cuda ] && device=$dev
        timeout "$(cap 60)" "$q" score "${inputs[@]}" --model tests/fixtures/tiny-onealign --task all \
            --format json --device "$device" --dtype "$dtype" > "$work/score-$label-$dtype.json"
        echo "score $label ($device) $dtype: exit $?"
    done
    python3 - "$work" <<'PY' | tee "$work/score-vs-expected.txt"
import json, pathlib, sys
work = pathlib.Path(sys.argv[1])
exp = json.load(open("tests/fixtures/expected/expected.json"))
def expected(rec):
    name = pathlib.Path(rec["path"]).name
    if rec["input"] == "video":
        return exp["video"]["video_all_frames"] if rec["task"] == "quality" else None
    return exp["images"].get(name, {}).get("tasks", {}).get(rec["task"])
cpu = {}
for name in ["score-cpu-f32", "score-cuda-f32", "score-cuda-f16", "score-cuda-bf16"]:
    try:
        recs = json.load(open(work / f"{name}.json"))
    except Exception as e:
        print(f"{name}: no result ({e})")
        continue
    worst_s = worst_l = worst_cpu = 0.0
    n = 0
    for r in recs:
        key = (r["path"], r["task"])
        if name == "score-cpu-f32":
            cpu[key] = r["score"]
        elif key in cpu:
            worst_cpu = max(worst_cpu, abs(r["score"] - cpu[key]))
        e = expected(r)
        if e is None:
            continue
        n += 1
        worst_s = max(worst_s, abs(r["score"] - e["score15"]))
        worst_l = max(worst_l, max(abs(a - b) for a, b in zip(r["logits"], e["level_logits"])))
    bound = {"f32": 8e-6, "f16": 1e-3, "bf16": 1e-2}[name.rsplit("-", 1)[-1]]
    verdict = "PASS" if n and worst_s <= bound else "FAIL"
    if name.endswith("f32") and worst_l > 1e-5:
        verdict = "FAIL"
    print(f"{name}: {n} records vs expected.json: max |score15 diff| {worst_s:.3g} (bound {bound:g}), "
          f"max |level logit diff| {worst_l:.3g}, max |score diff vs CPU f32| {worst_cpu:.3g} {verdict}")
PY
    save
fi

# `bench_real NAME DTYPE BATCHES FILE_BATCHES CAP [ENV=VALUE...]`: qalign bench at the real OneAlign
# dimensions with random weights, into bench-onealign-cuda-NAME.json.
bench_real() {
    local name=$1 dtype=$2 batches=$3 files=$4 limit=$5
    shift 5
    env "$@" timeout "$(cap "$limit")" "$q" bench tests/fixtures/images --model "$real" \
        --random-weights --device "$dev" --dtype "$dtype" --batch-sizes "$batches" --iters 5 \
        --file-batches "$files" --format json > "$work/bench-onealign-cuda-$name.json"
    echo "exit $?"
    save
    summarize "$work/bench-onealign-cuda-$name.json"
}

if step f16; then
    log "bench, OneAlign dimensions, random weights, f16 (files_1q rows: decoding overlapped with scoring)"
    bench_real f16 f16 "$batches_half" 4 180
fi

# The official code on the same card, when scripts/gpu-official-prep.sh's folder came along:
# transformers 4.36.1 and the official code's imports go to a private folder ahead of the
# machine's packages (only those pinned or missing, so PyTorch keeps its own).
off=${QALIGN_OFFICIAL:-target/gpu-official}
if [ -d "$off/src/q_align" ] && step official; then
    log "the official Q-Align code on the same card: fp16, real OneAlign dims, random weights"
    pylib=$work/official-pylib
    pkgs=(transformers==4.36.1 "tokenizers<0.16" huggingface_hub==0.19.4 accelerate==0.21.0 einops==0.6.1
          icecream==2.1.3 executing asttokens colorama)
    for pair in sentencepiece:sentencepiece safetensors:safetensors regex:regex pyyaml:yaml requests:requests \
        urllib3:urllib3 idna:idna certifi:certifi charset_normalizer:charset_normalizer tqdm:tqdm \
        packaging:packaging filelock:filelock typing_extensions:typing_extensions fsspec:fsspec pygments:pygments; do
        python3 -c "import ${pair#*:}" 2>/dev/null || pkgs+=("${pair%%:*}")
    done
    python3 -m pip install -q --no-index --no-deps --find-links "$off/wheels" --target "$pylib" "${pkgs[@]}"
    echo "pip exit $?"
    PYTHONPATH=$pylib timeout "$(cap 240)" python3 scripts/official_gpu_bench.py --src "$off/src" \
        --device "$dev" --model "$real" --tokenizer tests/fixtures/tiny-onealign \
        --images tests/fixtures/images/*.jpg --batch-sizes "$batches" --iters 5 > "$work/bench-official-onealign-cuda-f16.json"
    echo "exit $?"
    python3 - "$work" <<'PY'
import json, sys
work = sys.argv[1]
try:
    q = json.load(open(f"{work}/bench-onealign-cuda-f16.json"))
    o = json.load(open(f"{work}/bench-official-onealign-cuda-f16.json"))
except Exception as e:
    sys.exit(f"no comparison: {e}")
# Like for like: the official time per image covers pad + resize + normalise of decoded images
# and the model, so qalign's is `files_1q` (decode too, overlapped with scoring) where the bench
# has it, else `score_1q` (from pixels) plus the bench's per-image preprocessing.
def best(stage):
    rows = [r for r in q["rows"] if r["stage"] == stage]
    return min(rows, key=lambda r: r["median_ms_per_item"]) if rows else None
pre = next((r["median_ms_per_item"] for r in q["rows"] if r["stage"] == "preprocess"), 0.0)
files, pixels = best("files_1q"), best("score_1q")
if files is not None:
    ours, basis = files["median_ms_per_item"], f"files_1q at batch {files['batch']} (decode + preprocess + score)"
else:
    ours, basis = pixels["median_ms_per_item"] + pre, f"score_1q at batch {pixels['batch']} + preprocess"
theirs_row = min(o["rows"], key=lambda r: r["median_ms_per_item"])
theirs = theirs_row["median_ms_per_item"]
out = {"speedup_vs_official": theirs / ours,
       "qalign_best_ms_per_image": ours, "qalign_basis": basis,
       "official_best_ms_per_image": theirs, "official_batch": theirs_row["batch"],
       "speedup_vs_official_score_1q_from_pixels": theirs / pixels["median_ms_per_item"],
       "qalign_rows": [r for r in q["rows"] if r["stage"] in ("score_1q", "files_1q", "preprocess")],
       "official": o}
json.dump(out, open(f"{work}/bench-official-comparison-cuda-f16.json", "w"), indent=1)
print(f"qalign {ours:.2f} ms/image ({basis}), official {theirs:.2f} ms/image "
      f"(batch {theirs_row['batch']}): {theirs / ours:.2f}x")
PY
    save
fi

if step composed; then
    log "bench, OneAlign dimensions, random weights, f16, QALIGN_CUDA_KERNELS=composed (no fused kernels)"
    bench_real f16-composed f16 "$batches" 0 120 QALIGN_CUDA_KERNELS=composed
fi

if step bf16; then
    log "bench, OneAlign dimensions, random weights, bf16"
    bench_real bf16 bf16 "$batches_half" 4 180
fi

# --quant on CUDA (candle's quantised CUDA kernels, f32 activations): speed, and the most GPU
# memory in use while it ran (nvidia-smi sampled every 0.2 s; the card's total, so nothing else
# should run on it meanwhile).
if step quant; then
    for quant in q4k q8_0; do
        log "bench, OneAlign dimensions, random weights, --quant $quant"
        nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 > "$work/gpu-mem-$quant.txt" 2>/dev/null &
        smi=$!
        timeout "$(cap 150)" "$q" bench tests/fixtures/images --model "$real" --random-weights \
            --device "$dev" --quant "$quant" --batch-sizes "$batches" --iters 5 --file-batches 0 --format json \
            > "$work/bench-onealign-cuda-$quant.json"
        echo "exit $?"
        kill $smi 2>/dev/null
        echo "peak GPU memory used (MiB): $(sort -n "$work/gpu-mem-$quant.txt" | tail -1)" | tee "$work/gpu-mem-$quant.peak.txt"
        save
        summarize "$work/bench-onealign-cuda-$quant.json"
    done
fi

if step tiny; then
    log "bench, tiny model"
    timeout "$(cap 90)" "$q" bench tests/fixtures/images --model tests/fixtures/tiny-onealign --device "$dev" \
        --batch-sizes 1,8 --iters 10 --format json > "$work/bench-tiny-cuda-f32.json"
    echo "exit $?"
    save
    summarize "$work/bench-tiny-cuda-f32.json"
fi

if step train; then
    log "training parity on CUDA (tiny model, f32): the LoRA fixture's two AdamW steps"
    F=tests/fixtures
    timeout "$(cap 120)" "$q" train --model $F/tiny-onealign --data $F/training/sft_batch.json --image-folder $F/images \
        --lora-init $F/lora/q-align-tiny-lora --lr 2e-4 --lr-schedule constant --warmup-ratio 0 --weight-decay 0 \
        --max-grad-norm 0 --lora-dropout 0 --batch-size 3 --max-steps 2 --device "$dev" --dtype f32 \
        --log-json "$work/train-cuda-f32.jsonl" --output "$work/train-cuda-f32"
    echo "exit $?"
    python3 - "$work/train-cuda-f32.jsonl" <<'PY'
import json, sys
exp = json.load(open("tests/fixtures/lora/expected.json"))["training"]["steps"]
got = [json.loads(l) for l in open(sys.argv[1])]
for g, e in zip(got, exp):
    dl = abs(g["loss"] - e["loss"]) / e["loss"]
    dn = abs(g["grad_norm"] - e["total_trainable_grad_norm_l2"]) / e["total_trainable_grad_norm_l2"]
    print(f"step {g['step']}: loss rel {dl:.2e}, grad norm rel {dn:.2e} {'PASS' if dl <= 1e-5 and dn <= 1e-4 else 'FAIL'}")
PY
    save
fi

if step f32; then
    log "bench, OneAlign dimensions, random weights, f32"
    bench_real f32 f32 "$batches" 0 150
fi

if step trainbench; then
    log "bench --train, OneAlign dimensions, random weights, bf16 (LoRA r 128 + abstractor)"
    timeout "$(cap 300)" "$q" bench --train --model "$real" --random-weights --device "$dev" --dtype bf16 \
        --batch-sizes 1,16 --iters 3 --warmup 1 --format json > "$work/bench-train-onealign-cuda-bf16.json"
    echo "exit $?"
    cat "$work/bench-train-onealign-cuda-bf16.json"
    save
fi

log "done in $(($(date +%s) - start)) s; skipped: $(tr '\n' ' ' 2>/dev/null < "$work/skipped-steps.txt")"
save
