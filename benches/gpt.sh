#!/usr/bin/env bash
# The GPT benchmark of issue 19: shoal (release build, 2 workers of 1 thread on a local
# cluster) against the same model in PyTorch DDP (gloo, 2 processes of 1 thread) and in one
# PyTorch process with 2 threads, in one invocation, runs alternating. Model: 4 blocks,
# d_model 256, 4 heads, context 128; 16 windows per worker (global batch 32); AdamW lr 1e-3,
# weight decay 0.01, constant rate; the same windows in the same order on both sides
# (benches/peer/ddp_gpt.py reimplements shoal's permutation). Prints per run tokens/s, the
# mean loss of the last 20 steps and peak RSS per worker, then the medians and ratios.
#
#     benches/gpt.sh [STEPS [RUNS]]        (defaults 60 and 3; SHOAL=..., PY=... to override)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SHOAL=${SHOAL:-$ROOT/target/release/shoal}
PY=${PY:-$ROOT/benches/.venv/bin/python}
STEPS=${1:-60}
RUNS=${2:-3}
TRAIN=$((32 * STEPS))
dir=$(mktemp -d)
trap '"$SHOAL" down --dir "$dir/c" >/dev/null 2>&1 || true; rm -rf "$dir"' EXIT
"$SHOAL" up --workers 2 --dir "$dir/c" >/dev/null
"$SHOAL" data import docs "$ROOT/data/text/python-docs.txt" --format text --context 128 --dir "$dir/c" >/dev/null
cat > "$dir/gpt.toml" <<TOML
name = "gpt-bench"
[model]
kind = "gpt"
blocks = 4
heads = 4
d_model = 256
context = 128
[dataset]
name = "docs"
train = [0, $TRAIN]
[training]
epochs = 1
batch_size = 32
seed = 7
[training.optimizer]
kind = "adamw"
lr = 0.001
weight_decay = 0.01
[cluster]
workers = 2
TOML
lscpu | grep -E "Model name|^CPU\(s\)" | sed 's/  */ /g'
echo "avx512: $(grep -c avx512f /proc/cpuinfo | head -1 | awk '{print ($1 > 0) ? "yes" : "no"}')"
for run in $(seq 1 "$RUNS"); do
  out=$("$SHOAL" job submit "$dir/gpt.toml" --follow --json --dir "$dir/c")
  id=$(echo "$out" | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["id"])')
  echo "$out" | "$PY" -c '
import json, sys
j = json.load(sys.stdin)
p = j["phase_ms"]
tps = j["samples_per_s"] * 128
print(f"shoal: tokens_per_s={tps:.0f} step_ms={sum(p.values()):.1f} phase_ms=" + ",".join(f"{k}:{v:.1f}" for k, v in p.items()))'
  "$SHOAL" job metrics "$id" --keys loss --json --dir "$dir/c" | "$PY" -c '
import json, sys
s = json.load(sys.stdin)["series"][0]["values"]
print(f"shoal: loss_last20={sum(s[-20:]) / len(s[-20:]):.4f}")'
  for pid in $("$SHOAL" worker list --json --dir "$dir/c" | "$PY" -c 'import json,sys; print(" ".join(str(w["pid"]) for w in json.load(sys.stdin) if w.get("pid")))'); do
    echo "shoal: worker $pid peak_rss_mb=$(awk '/VmHWM/ {print int($2 / 1024)}' /proc/$pid/status)"
  done
  "$PY" "$ROOT/benches/peer/ddp_gpt.py" --workers 2 --threads 1 --steps "$STEPS" --train "$TRAIN"
  "$PY" "$ROOT/benches/peer/ddp_gpt.py" --workers 1 --threads 2 --steps "$STEPS" --train "$TRAIN"
done
