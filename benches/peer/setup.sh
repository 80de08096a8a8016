#!/usr/bin/env bash
# Creates benches/.venv with PyTorch (CPU is all we use) and numpy for the PyTorch DDP peer
# (benches/peer/ddp_mnist.py) that `cargo run --release -p shoal-benches --example e2e` compares
# shoal against. Not used by CI.
#
# Prefers the CPU-only wheel index (a ~200 MB download); where that index cannot be reached,
# falls back to plain PyPI, whose Linux torch wheel pulls in the CUDA runtime packages as well
# (several GB; they are loaded but unused on a machine without a GPU).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="$here/../.venv"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --upgrade pip

cpu_index="https://download.pytorch.org/whl/cpu"
if "$venv/bin/python" - "$cpu_index" <<'PY'
import sys, urllib.request
try:
    urllib.request.urlopen(sys.argv[1] + "/torch/", timeout=10)
except Exception as e:
    print(f"setup: the CPU-only index is not reachable ({e}); using PyPI", file=sys.stderr)
    sys.exit(1)
PY
then
    "$venv/bin/python" -m pip install torch --index-url "$cpu_index"
    "$venv/bin/python" -m pip install numpy
else
    "$venv/bin/python" -m pip install torch numpy
fi

"$venv/bin/python" -c 'import torch, numpy; print(f"setup: torch {torch.__version__}, numpy {numpy.__version__}, gloo {torch.distributed.is_gloo_available()}")'
echo "setup: done; the peer runs as $venv/bin/python benches/peer/ddp_mnist.py"
