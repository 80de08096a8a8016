#!/usr/bin/env bash
# Training throughput of two shoal builds on the same job, runs alternating (which goes first
# alternates too), in one invocation: `shoal bench train SPEC --workers ${WORKERS:-2}` with each binary,
# then the medians of samples/s and their ratio after / before.
#
#     benches/compare_builds.sh BEFORE_SHOAL AFTER_SHOAL SPEC [RUNS]
#
# For the presets (issue "Models you describe"): build the commit before layer lists in a
# worktree (git worktree add /tmp/before b8ce966 && cargo build --release --manifest-path
# /tmp/before/Cargo.toml -p shoal), then run this with examples/mnist-mlp.toml and
# examples/mnist-cnn.toml.
set -euo pipefail
before="$1"; after="$2"; spec="$3"; runs="${4:-5}"
declare -a b a
for i in $(seq 1 "$runs"); do
    if (( i % 2 )); then order=("$before" "$after"); else order=("$after" "$before"); fi
    for exe in "${order[@]}"; do
        line=$("$exe" bench train "$spec" --workers ${WORKERS:-2} 2>/dev/null | grep '^bench train:')
        sps=$(sed -E 's/.*samples_per_s=([0-9.]+).*/\1/' <<<"$line")
        if [[ "$exe" == "$before" ]]; then b+=("$sps"); tag=before; else a+=("$sps"); tag=after; fi
        echo "run $i $tag samples_per_s $sps" >&2
    done
done
median() { printf '%s\n' "$@" | sort -n | awk '{v[NR]=$1} END {print (NR%2 ? v[(NR+1)/2] : (v[NR/2]+v[NR/2+1])/2)}'; }
mb=$(median "${b[@]}"); ma=$(median "${a[@]}")
echo "spec=$spec runs=$runs before=[${b[*]}] after=[${a[*]}] median_before=$mb median_after=$ma ratio=$(awk -v x="$ma" -v y="$mb" 'BEGIN{printf "%.3f", x/y}')"
