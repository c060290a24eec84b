#!/usr/bin/env bash
# Server throughput against the CLI on the same images, interleaved in one run (docs/PERFORMANCE.md,
# "Serving"): `qalign score --batch-size 8` over N image files, then `qalign serve --max-batch-size 8`
# driven by `qalign loadtest --concurrency C` with one file per request; ROUNDS times each, in turn.
#
#   scripts/serve-bench.sh MODEL_DIR N OUT.json [extra model flags, e.g. --random-weights]
#
# Env: QALIGN_BIN (default target/release/qalign), CONCURRENCY (32), ROUNDS (2).
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${QALIGN_BIN:-target/release/qalign}
model=$1 n=$2 out=$3
shift 3
extra=("$@")
concurrency=${CONCURRENCY:-32}
rounds=${ROUNDS:-2}
work=$(mktemp -d)
pid=
cleanup() {
  [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# N distinct files: the fixture images copied under numbered names.
mkdir "$work/img"
i=0
while [ "$i" -lt "$n" ]; do
  for f in tests/fixtures/images/*; do
    [ "$i" -lt "$n" ] || break
    cp "$f" "$work/img/$(printf %04d "$i")-$(basename "$f")"
    i=$((i + 1))
  done
done

now() { date +%s.%N; }

cli_round() {
  local start end load
  start=$(now)
  "$bin" -q score --model "$model" "${extra[@]}" --batch-size 8 --format jsonl "$work/img" \
    >"$work/cli.jsonl" 2>"$work/cli.err"
  end=$(now)
  load=$(sed -n 's/^model loaded in \([0-9.]*\) s.*/\1/p' "$work/cli.err")
  python3 - "$start" "$end" "$load" "$n" "$work/cli.jsonl" <<'PY'
import json, sys
start, end, load, n, path = float(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
records = sum(1 for _ in open(path))
assert records == n, f"{records} records for {n} images"
scoring = end - start - load
print(json.dumps({"wall_s": end - start, "load_s": load, "scoring_s": scoring, "images_per_s": n / scoring}))
PY
}

server_round() {
  "$bin" serve --model "$model" "${extra[@]}" --port 0 --max-batch-size 8 \
    --max-concurrent-requests $((concurrency * 2)) 2>"$work/serve.err" &
  pid=$!
  local url=
  for _ in $(seq 1 600); do
    url=$(sed -n 's/^listening on //p' "$work/serve.err")
    if [ -n "$url" ] && curl -sf "$url/health" >/dev/null; then break; fi
    sleep 0.1
  done
  "$bin" loadtest "$url" --concurrency "$concurrency" --requests "$n" --images "$work/img" \
    --timeout-s 3600 >"$work/load.json"
  kill -TERM "$pid"
  wait "$pid"
  pid=
  cat "$work/load.json"
}

results=()
for r in $(seq 1 "$rounds"); do
  echo "round $r/$rounds: qalign score" >&2
  cli=$(cli_round)
  echo "round $r/$rounds: qalign serve + loadtest" >&2
  server=$(server_round)
  results+=("{\"cli\": $cli, \"server\": $server}")
done

python3 - "$out" "$model" "$n" "$concurrency" "${extra[*]:-}" "$(nproc)" "$(lscpu | sed -n 's/^Model name: *//p')" \
  "${results[@]}" <<'PY'
import datetime, json, statistics, sys
out, model, n, concurrency, extra, cpus, cpu = sys.argv[1:8]
rounds = [json.loads(r) for r in sys.argv[8:]]
cli = statistics.median(r["cli"]["images_per_s"] for r in rounds)
server = statistics.median(r["server"]["images_per_s"] for r in rounds)
report = {
    "date": datetime.date.today().isoformat(),
    "machine": f"{cpus} CPUs, {cpu}",
    "model": model,
    "flags": extra,
    "images": int(n),
    "concurrency": int(concurrency),
    "cli_images_per_s": cli,
    "server_images_per_s": server,
    "server_vs_cli": server / cli,
    "server_p99_ms": statistics.median(r["server"]["latency_ms"]["p99"] for r in rounds),
    "rounds": rounds,
}
json.dump(report, open(out, "w"), indent=2)
print(json.dumps({k: report[k] for k in ["model", "cli_images_per_s", "server_images_per_s", "server_vs_cli", "server_p99_ms"]}))
PY
