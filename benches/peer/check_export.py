"""Loads a model exported by `shoal checkpoint export` into the PyTorch module that README
documents for its kind and evaluates it on MNIST records, to compare with the test accuracy
that shoal reported. Not used by CI (it needs torch: benches/peer/setup.sh).

    benches/.venv/bin/python benches/peer/check_export.py model.safetensors --kind mlp \
        --hidden 512 256 [--channels 32 64] [--data data/mnist] [--records 8000 10000]
"""

import argparse
import gzip
import struct
from pathlib import Path

import torch
from safetensors.torch import load_file


def read_idx(path):
    data = gzip.open(path).read() if str(path).endswith(".gz") else Path(path).read_bytes()
    _, _, dtype, ndim = struct.unpack(">BBBB", data[:4])
    assert dtype == 0x08, "unsigned bytes expected"
    dims = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    return torch.frombuffer(bytearray(data[4 + 4 * ndim :]), dtype=torch.uint8).reshape(dims)


def module(kind, hidden, channels, classes=10, side=28):
    """The layouts README documents: names 0.weight, 0.bias, 2.weight, ... for the MLP."""
    layers = []
    if kind == "mlp":
        features = side * side
    else:
        c1, c2 = channels
        layers += [
            torch.nn.Conv2d(1, c1, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(c1, c2, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Flatten(),
        ]
        features = c2 * (side // 4) * (side // 4)
    for width in hidden:
        layers += [torch.nn.Linear(features, width), torch.nn.ReLU()]
        features = width
    layers.append(torch.nn.Linear(features, classes))
    return torch.nn.Sequential(*layers)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--kind", choices=["mlp", "cnn"], required=True)
    p.add_argument("--hidden", type=int, nargs="+", required=True)
    p.add_argument("--channels", type=int, nargs=2, default=[32, 64])
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "data" / "mnist"))
    p.add_argument("--records", type=int, nargs=2, default=[8000, 10000])
    a = p.parse_args()

    net = module(a.kind, a.hidden, a.channels)
    net.load_state_dict(load_file(a.model), strict=True)
    net.eval()
    images = read_idx(Path(a.data) / "mnist10k-images-idx3-ubyte.gz")
    labels = read_idx(Path(a.data) / "mnist10k-labels-idx1-ubyte.gz")
    lo, hi = a.records
    x = images[lo:hi].float() / 255.0
    x = x.reshape(hi - lo, -1) if a.kind == "mlp" else x.reshape(hi - lo, 1, 28, 28)
    with torch.no_grad():
        pred = net(x).argmax(dim=1)
    correct = int((pred == labels[lo:hi].long()).sum())
    print(f"pytorch: kind={a.kind} records={hi - lo} correct={correct} test_accuracy={correct / (hi - lo):.4f}")


if __name__ == "__main__":
    main()
