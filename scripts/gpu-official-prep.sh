#!/usr/bin/env bash
# Gathers what the official Q-Align code needs to run on the GPU machine, which has PyTorch but no
# network: the official sources (exported from a git directory of Q-Future/Q-Align, unchanged) and
# wheels of transformers 4.36.1 and the official code's other imports. Writes target/gpu-official/
# (git-ignored); pass it to the device run in `carry`, and scripts/gpu-check.sh runs
# scripts/official_gpu_bench.py from it.
#   scripts/gpu-official-prep.sh Q_ALIGN_GIT_DIR
set -euo pipefail
git_dir=${1:?usage: scripts/gpu-official-prep.sh Q_ALIGN_GIT_DIR (a clone or mirror of Q-Future/Q-Align)}
cd "$(dirname "$0")/.."
out=target/gpu-official
rm -rf "$out"
mkdir -p "$out/src" "$out/wheels"
# File by file: stored mirrors may lack large blobs that `git archive` would stop at.
git --git-dir="$git_dir" ls-tree -r --name-only HEAD -- q_align | while read -r f; do
    mkdir -p "$out/src/$(dirname "$f")"
    git --git-dir="$git_dir" cat-file blob "HEAD:$f" > "$out/src/$f" || rm -f "$out/src/$f"
done
git --git-dir="$git_dir" rev-parse HEAD > "$out/src/COMMIT"
# Pure-Python wheels once; the compiled ones for the GPU machine's Python (3.12 on the lent
# machines; GPU_PYTHON="3.11 3.12" for several). Only one Python's: with the repository's tracked
# files, what travels must stay under the device tool's 64 MiB (scripts/gpu-pack.sh size).
pythons=${GPU_PYTHON:-3.12}
pip_dl() { python3 -m pip download -q --no-deps --dest "$out/wheels" --only-binary=:all: \
    --platform manylinux2014_x86_64 "$@"; }
pip_dl --python-version "${pythons%% *}" transformers==4.36.1 einops==0.6.1 accelerate==0.21.0 icecream==2.1.3 \
    executing asttokens colorama pygments huggingface_hub==0.19.4 fsspec requests urllib3 idna \
    certifi tqdm packaging filelock typing_extensions
for py in $pythons; do
    for pkg in "tokenizers>=0.15,<0.16" "safetensors>=0.4.1" "sentencepiece>=0.2.0" regex pyyaml \
        charset_normalizer; do
        pip_dl --python-version "$py" "$pkg" || echo "no $pkg wheel for Python $py"
    done
done
du -sh "$out"
