"""Checks the PyTorch code that `shoal model torch NAME@X` prints against shoal's own outputs:
runs the code (its `build()`, `preprocess(x)` and `INPUT_SHAPE`), loads shoal's safetensors
export into the model with `load_state_dict(strict=True)`, computes the outputs of the raw
records in eval mode and compares them with what shoal's batch scoring computed for the same
records. Not used by CI (it needs torch and numpy: benches/peer/setup.sh).

    benches/.venv/bin/python benches/peer/check_torch.py model.py model.safetensors \
        records.npy expected.npy [--tol 1e-4] [--compare auto|raw|softmax] [--batch 1024]

- records: the raw records, [N] + the dataset's feature shape (u8 or f32, as stored: the code's
  `preprocess` reshapes them and scales u8 by 1/255);
- expected: [N, outputs] float32, shoal's outputs for those records. A score job writes class
  probabilities (the softmax of the logits): `--compare auto` (the default) compares the
  softmax of the model's outputs when the expected rows are probabilities (values in [0, 1],
  rows summing to 1) and the model's are not, its raw outputs otherwise (logits, or a
  regression's values). Either file may also be a safetensors file (its tensor `x`, as in
  dataset and score shards; `--tensor` names another).
- a score job with `[operator] transform` applies a fitted transform before the model, which
  the generated code does not: give records that went through it (a transform job's output,
  f32, with code generated for that dataset's dtype) or score without one.

Passes when every output is within `tol * max(1, max |expected|)` of shoal's and the predicted
classes (argmax, first on ties, as shoal counts them) agree on every record whose expected top
two are further apart than twice that tolerance. Prints one line,

    torch_check: strict_load=ok max_abs_diff=D argmax_agree=A/N compare=C records=N outputs=K tol=T result=ok

and exits 0 on a match, 1 on a mismatch and 2 when the model cannot be built or loaded or
the inputs do not fit it.
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file


def fail(what):
    """A failure before any comparison: one summary line, exit status 2."""
    print(f"torch_check: {what} result=error")
    sys.exit(2)


def one_line(error):
    return " ".join(str(error).split())


def load_code(path):
    """The generated module's namespace (run as a module, so its `__main__` block does not)."""
    source = Path(path).read_text()
    namespace = {"__name__": "shoal_torch_model", "__file__": str(path)}
    exec(compile(source, str(path), "exec"), namespace)
    missing = [name for name in ("build", "preprocess", "INPUT_SHAPE") if name not in namespace]
    if missing:
        fail(f"strict_load=not_run error=\"{path} defines no {', '.join(missing)}\"")
    return namespace


def load_array(path, tensor):
    if str(path).endswith(".safetensors"):
        from safetensors.numpy import load_file as load_numpy

        tensors = load_numpy(str(path))
        if tensor not in tensors:
            fail(f"strict_load=not_run error=\"{path} holds no tensor {tensor!r} (it holds {sorted(tensors)})\"")
        return tensors[tensor]
    return np.load(path, allow_pickle=False)


def softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def are_probabilities(y):
    """Rows of at least 2 values in [0, 1] summing to 1 (what a score job writes)."""
    if y.ndim != 2 or y.shape[1] < 2 or y.size == 0 or not np.all(np.isfinite(y)):
        return False
    return bool(np.all(y >= 0) and np.all(y <= 1) and np.allclose(y.sum(axis=1), 1.0, rtol=0, atol=1e-3))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("code", help="the file `shoal model torch` printed")
    p.add_argument("export", help="shoal's safetensors export of the same model")
    p.add_argument("records", help="raw records, .npy ([N] + feature shape) or .safetensors")
    p.add_argument("expected", help="shoal's outputs, .npy ([N, outputs] float32) or .safetensors")
    p.add_argument("--tol", type=float, default=1e-4, help="max abs difference, relative to max(1, max |expected|)")
    p.add_argument("--compare", choices=["auto", "raw", "softmax"], default="auto")
    p.add_argument("--batch", type=int, default=1024, help="records per forward pass")
    p.add_argument("--tensor", default="x", help="the tensor of a .safetensors records or expected file")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a = p.parse_args()
    if a.threads > 0:
        torch.set_num_threads(a.threads)

    ns = load_code(a.code)
    try:
        model = ns["build"]()
    except Exception as e:  # noqa: BLE001 - any failure of the generated code is reported
        fail(f"strict_load=not_run error=\"build(): {one_line(e)}\"")
    state = load_file(a.export)
    not_f32 = sorted(k for k, v in state.items() if v.dtype != torch.float32)
    if not_f32:
        fail(f"strict_load=failed error=\"tensors that are not float32: {not_f32}\"")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        fail(f"strict_load=failed error=\"{one_line(e)}\"")
    model.eval()
    count = sum(t.numel() for t in model.parameters())
    if "PARAMETERS" in ns and count != ns["PARAMETERS"]:
        fail(f"strict_load=ok error=\"{count} parameters, the code says {ns['PARAMETERS']}\"")

    records = load_array(a.records, a.tensor)
    expected = np.asarray(load_array(a.expected, a.tensor), dtype=np.float64)
    n = len(records)
    if expected.ndim == 1:
        expected = expected.reshape(-1, 1)
    expected = expected.reshape(len(expected), -1)
    if len(expected) != n:
        fail(f"strict_load=ok error=\"{n} records but {len(expected)} expected rows\"")
    if n == 0:
        fail("strict_load=ok error=\"no records\"")

    input_shape = tuple(ns["INPUT_SHAPE"])
    outputs = []
    with torch.no_grad():
        for i in range(0, n, max(1, a.batch)):
            try:
                x = ns["preprocess"](records[i : i + max(1, a.batch)])
            except Exception as e:  # noqa: BLE001
                fail(f"strict_load=ok error=\"preprocess: {one_line(e)}\"")
            if tuple(x.shape[1:]) != input_shape or x.dtype != torch.float32:
                fail(f"strict_load=ok error=\"preprocess gave {x.dtype} {tuple(x.shape)}, not float32 [N] + {input_shape}\"")
            outputs.append(model(x).detach().cpu().numpy().reshape(x.shape[0], -1))
    out = np.concatenate(outputs).astype(np.float64)
    if out.shape != expected.shape:
        fail(f"strict_load=ok error=\"the model gives {out.shape[1]} outputs per record, expected has {expected.shape[1]}\"")

    mode = a.compare
    if mode == "auto":
        mode = "softmax" if are_probabilities(expected) and not are_probabilities(out) else "raw"
    got = softmax(out) if mode == "softmax" else out

    same = (got == expected) | (np.isnan(got) & np.isnan(expected))
    diff = np.where(same, 0.0, np.abs(got - expected))
    diff = np.where(np.isnan(diff), np.inf, diff)
    max_abs = float(diff.max())
    finite = expected[np.isfinite(expected)]
    scale = max(1.0, float(np.abs(finite).max()) if finite.size else 1.0)
    tol = a.tol * scale

    want, pred = expected.argmax(axis=1), out.argmax(axis=1)
    agree = int((want == pred).sum())
    if expected.shape[1] >= 2:
        top2 = np.sort(expected, axis=1)[:, -2:]
        clear = (top2[:, 1] - top2[:, 0]) > 2 * tol
    else:
        clear = np.ones(n, dtype=bool)
    real_disagreements = int(((want != pred) & clear).sum())

    ok = max_abs <= tol and real_disagreements == 0
    print(
        f"torch_check: strict_load=ok max_abs_diff={max_abs:.3g} argmax_agree={agree}/{n} compare={mode} "
        f"records={n} outputs={expected.shape[1]} tol={tol:.3g} result={'ok' if ok else 'mismatch'}"
    )
    if not ok:
        worst = np.argsort(-diff.max(axis=1))[:5]
        for r in worst:
            print(
                f"  record {r}: max diff {diff[r].max():.3g}, argmax torch {pred[r]} shoal {want[r]}, "
                f"torch {np.array2string(got[r][:8], precision=5)} shoal {np.array2string(expected[r][:8], precision=5)}",
                file=sys.stderr,
            )
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
