#!/usr/bin/env bash
# Gets a GPU check ready to travel. The device tool sends the repository's tracked files plus the
# carried paths, 64 MiB at most, and the tracked files alone are ~54 MB (mostly test fixtures), so
# the CUDA binaries and the official code's wheels only fit once the fixtures that
# scripts/gpu-check.sh never reads stay behind.
#   scripts/gpu-pack.sh build     CUDA binaries → target/gpu-artifacts/{qalign.xz,model-tests.xz,COMMIT}
#                                 (scripts/cuda-env.sh; own target dir target/cuda; ~20 min on 2 cores)
#   scripts/gpu-pack.sh hide      delete from the working tree the tracked files gpu-check.sh does not
#                                 read (they stay in git; refuses if any of them has local changes)
#   scripts/gpu-pack.sh size      what would travel with `carry: target/gpu-artifacts target/gpu-official`
#   scripts/gpu-pack.sh restore   check the hidden files out again (git status is clean after it)
# Then, between hide and restore, one device call carrying target/gpu-artifacts and
# target/gpu-official (scripts/gpu-official-prep.sh):
#   scripts/gpu-check.sh target/gpu-artifacts/qalign.xz $OUT target/gpu-artifacts/model-tests.xz 2>&1 | tee $OUT/gpu-check.log
set -euo pipefail
cd "$(dirname "$0")/.."
limit=$((64 * 1024 * 1024))
carried=(target/gpu-artifacts target/gpu-official)
# Read by no step of gpu-check.sh: preprocessing goldens, label files, the official .bin copies of
# the tiny model (qalign reads its model.safetensors) and the video fixtures but the one it scores.
hidden() {
    git ls-files -- tests/fixtures/preprocess tests/fixtures/labels 'tests/fixtures/tiny-onealign/pytorch_model*' \
        tests/fixtures/video | grep -v '^tests/fixtures/video/baby.mp4$'
}

travelling_bytes() {
    {
        # Tracked files still present (hidden ones are listed but gone), and untracked ones.
        git ls-files -z --cached --others --exclude-standard |
            xargs -0 -r sh -c 'for f; do if [ -f "$f" ]; then printf "%s\0" "$f"; fi; done' sh
        for p in "${carried[@]}"; do
            if [ -e "$p" ]; then find "$p" -type f -print0; fi
        done
    } | du -cb --files0-from=- | tail -1 | cut -f1
}

case ${1:-} in
build)
    # shellcheck source=/dev/null
    source scripts/cuda-env.sh
    export CARGO_TARGET_DIR=$PWD/target/cuda
    cargo build --release -p qalign-cli --features cuda --locked
    tests=$(cargo test --release -p qalign-model --features cuda --lib --no-run --locked --message-format json 2>/dev/null |
        python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "qalign_model" and m["profile"]["test"]:
        print(m["executable"])')
    [ -n "$tests" ] || { echo "gpu-pack.sh: no qalign-model test binary was built" >&2; exit 1; }
    out=target/gpu-artifacts
    rm -rf "$out"
    mkdir -p "$out"
    for pair in "$CARGO_TARGET_DIR/release/qalign:qalign" "$tests:model-tests"; do
        cp "${pair%%:*}" "$out/${pair##*:}"
        strip "$out/${pair##*:}"
        xz -T0 -9 "$out/${pair##*:}"
    done
    git rev-parse HEAD > "$out/COMMIT"
    if [ -n "$(git status --porcelain -- crates Cargo.toml Cargo.lock)" ]; then
        echo "(with local changes)" >> "$out/COMMIT"
    fi
    ls -l "$out"
    ;;
hide)
    files=()
    while read -r f; do [ -e "$f" ] && files+=("$f"); done < <(hidden)
    if ((${#files[@]})) && ! git diff --quiet HEAD -- "${files[@]}"; then
        echo "gpu-pack.sh: some of the files to hide have local changes; commit or stash them first" >&2
        exit 1
    fi
    ((${#files[@]} == 0)) || rm -f -- "${files[@]}"
    echo "hid ${#files[@]} tracked files: run scripts/gpu-pack.sh restore after the device call, and commit nothing before"
    "$0" size
    ;;
size)
    bytes=$(travelling_bytes)
    echo "would travel: $((bytes / 1024 / 1024)) MiB of the device tool's 64 MiB (tracked and untracked files here, plus ${carried[*]})"
    ((bytes <= limit)) || { echo "gpu-pack.sh: over the limit; run scripts/gpu-pack.sh hide first" >&2; exit 1; }
    ;;
restore)
    mapfile -t files < <(hidden)
    git checkout -- "${files[@]}"
    echo "restored ${#files[@]} tracked files"
    ;;
*)
    echo "usage: scripts/gpu-pack.sh build|hide|size|restore" >&2
    exit 2
    ;;
esac
