"""PyTorch peer of the scoring benchmark (benches/examples/score.rs): a model exported by
`shoal checkpoint export`, in the module README documents for its kind (check_export.py),
scores every record of an IDX file in one process with 2 threads, batch 1024, under
`torch.inference_mode()`: logits, softmax probabilities and predicted classes, as shoal's
`score` writes them. The data is read into memory (u8, then / 255 per batch) before the clock
starts; the clock covers the scoring loop only.

    benches/.venv/bin/python benches/peer/score_torch.py model.safetensors images.idx labels.idx \
        --kind mlp --hidden 512 256 [--channels 32 64] [--threads 2] [--batch 1024] [--runs 3]

Prints, per run: `torch_score: records=N seconds=S records_per_s=R correct=C`.
"""

import argparse
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from check_export import module, read_idx


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("images")
    p.add_argument("labels")
    p.add_argument("--kind", choices=["mlp", "cnn"], required=True)
    p.add_argument("--hidden", type=int, nargs="+", required=True)
    p.add_argument("--channels", type=int, nargs=2, default=[32, 64])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--runs", type=int, default=3)
    a = p.parse_args()

    torch.set_num_threads(a.threads)
    net = module(a.kind, a.hidden, a.channels)
    net.load_state_dict(load_file(a.model), strict=True)
    net.eval()
    images = read_idx(Path(a.images))
    labels = read_idx(Path(a.labels)).long()
    n = images.shape[0]
    for _ in range(a.runs):
        correct = 0
        start = time.perf_counter()
        with torch.inference_mode():
            for i in range(0, n, a.batch):
                x = images[i : i + a.batch].float() / 255.0
                x = x.reshape(x.shape[0], -1) if a.kind == "mlp" else x.reshape(x.shape[0], 1, 28, 28)
                probs = torch.softmax(net(x), dim=1)
                pred = probs.argmax(dim=1)
                correct += int((pred == labels[i : i + a.batch]).sum())
        seconds = time.perf_counter() - start
        print(f"torch_score: records={n} seconds={seconds:.4f} records_per_s={n / seconds:.1f} correct={correct}", flush=True)


if __name__ == "__main__":
    main()
