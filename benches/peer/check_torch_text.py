"""Checks the PyTorch code that `shoal model torch` prints for a language model against
shoal's own losses: runs the code (`build()`, `preprocess(x)`, `targets(x)`), loads shoal's
safetensors export with `load_state_dict(strict=True)`, computes each text window's mean
cross-entropy per token in eval mode and compares it with what shoal's `score` batch job wrote
for the same windows. Not used by CI (it needs torch and numpy: benches/peer/setup.sh).

    benches/.venv/bin/python benches/peer/check_torch_text.py model.py model.safetensors \
        windows.safetensors scores.safetensors [--tol 1e-4]

- windows: a text dataset's shard (tensor `x`, u8 [N, context + 1]);
- scores: the score job's output shard for the same windows (tensor `x`, f32 [N, 1]).

Prints one line,

    torch_text_check: strict_load=ok max_abs_diff=D mean_loss_torch=L mean_loss_shoal=S records=N tol=T result=ok

and exits 0 on a match, 1 on a mismatch.
"""

import argparse
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file


def main():
    p = argparse.ArgumentParser()
    p.add_argument("code")
    p.add_argument("export")
    p.add_argument("windows")
    p.add_argument("scores")
    p.add_argument("--tol", type=float, default=1e-4)
    p.add_argument("--batch", type=int, default=64)
    a = p.parse_args()
    ns = {"__name__": "shoal_torch_model", "__file__": a.code}
    exec(compile(Path(a.code).read_text(), a.code, "exec"), ns)
    model = ns["build"]()
    model.load_state_dict(load_file(a.export), strict=True)
    model.eval()
    x = load_file(a.windows)["x"]
    want = load_file(a.scores)["x"].reshape(-1).double()
    n = min(len(x), len(want))
    got = []
    with torch.no_grad():
        for i in range(0, n, a.batch):
            rec = x[i : i + a.batch]
            logits = model(ns["preprocess"](rec))
            t = ns["targets"](rec)
            ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).double(), t.reshape(-1), reduction="none")
            got.append(ce.reshape(t.shape).mean(dim=1))
    got = torch.cat(got)[:n]
    diff = (got - want[:n]).abs().max().item()
    ok = diff <= a.tol * max(1.0, want[:n].abs().max().item())
    print(
        f"torch_text_check: strict_load=ok max_abs_diff={diff:.3g} mean_loss_torch={got.mean().item():.6f} "
        f"mean_loss_shoal={want[:n].mean().item():.6f} records={n} tol={a.tol} result={'ok' if ok else 'mismatch'}"
    )
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
