#!/usr/bin/env python3
"""PyTorch DDP peer of `shoal demo`: the same workload, for the end-to-end comparison.

With `--model cnn3` it is the peer of examples/mnist-cnn3.toml (three conv blocks of 32, 64 and
128 channels, then Linear(1152, 128), ReLU, Linear(128, 10)). `--workers 1 --threads 2` runs
the same training in one process with two compute threads (no DDP traffic: the second peer).

With `--model cnn --optimizer adamw --lr 0.001 --weight-decay 0.01 --epochs 2 --seed 7` it is
the peer of examples/mnist-cnn.toml instead: Conv2d(1,16,3,pad 1), ReLU, MaxPool2d(2),
Conv2d(16,32,3,pad 1), ReLU, MaxPool2d(2), Flatten, Linear(1568,128), ReLU, Linear(128,10),
the layers shoal's CNN has (and exports under the same names).

The workload, as in examples/mnist-mlp.toml: an MLP 784-512-256-10 (ReLU, PyTorch's default init)
on the bundled 10,000-digit MNIST (data/mnist, pixels / 255, nothing else), records 0..8000 to
train and 8000..10000 to test; cross-entropy, SGD lr 0.05 momentum 0.9, global batch 128 split
evenly over the processes (64 each with 2), 5 epochs. Each epoch shuffles the training range with
a permutation seeded by (seed, epoch) and cuts it into global batches, dropping the last partial
one (8000 // 128 = 62 steps per epoch); rank r takes the r-th contiguous slice of each global
batch, as shoal does. Processes are started with torch.multiprocessing.spawn, use the gloo backend
on 127.0.0.1 with a free ephemeral port, and one compute thread each.

After each epoch the model is scored on the test range (each rank half of it, counts summed with
an all-reduce), outside the training clock. The final line:

    pytorch_ddp: workers=2 epochs=5 test_accuracy=0.XXXX samples_per_s=NNNN train_s=NN.N

where samples_per_s = training samples processed by all ranks / training wall time on rank 0
(evaluation excluded).

Batches are gathered by indexing the in-memory tensors directly rather than via a DataLoader,
which would only add per-sample Python overhead to the PyTorch side.
"""

import argparse
import gzip
import os
import socket
import struct
import sys
import time

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def read_idx(path):
    """Reads a (gzip) IDX file into a numpy array of uint8."""
    import numpy as np

    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    zero, dtype, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    dims = struct.unpack(">" + "I" * ndim, raw[4 : 4 + 4 * ndim])
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    expected = 1
    for d in dims:
        expected *= d
    if body.size != expected:
        raise ValueError(f"{path}: header says {dims}, body has {body.size} bytes")
    return body.reshape(dims)


def load_mnist(data_dir):
    import torch

    images = read_idx(os.path.join(data_dir, "mnist10k-images-idx3-ubyte.gz"))
    labels = read_idx(os.path.join(data_dir, "mnist10k-labels-idx1-ubyte.gz"))
    x = torch.from_numpy(images.reshape(images.shape[0], -1).astype("float32") / 255.0)
    y = torch.from_numpy(labels.astype("int64"))
    return x, y


def build_model(kind="mlp"):
    import torch.nn as nn

    if kind == "cnn3":
        # examples/mnist-cnn3.toml: three conv blocks (32, 64, 128), then 1152-128-10.
        blocks = []
        for c_in, c_out in [(1, 32), (32, 64), (64, 128)]:
            blocks += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        return nn.Sequential(*blocks, nn.Flatten(), nn.Linear(128 * 3 * 3, 128), nn.ReLU(), nn.Linear(128, 10))
    if kind == "cnn":
        return nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * 7 * 7, 128),
            nn.ReLU(),
            nn.Linear(128, 10),
        )
    return nn.Sequential(
        nn.Linear(784, 512),
        nn.ReLU(),
        nn.Linear(512, 256),
        nn.ReLU(),
        nn.Linear(256, 10),
    )


def evaluate(model, x, y, rank, world):
    import torch
    import torch.distributed as dist

    n = x.shape[0]
    lo, hi = n * rank // world, n * (rank + 1) // world
    correct = 0
    model.eval()
    with torch.no_grad():
        for i in range(lo, hi, 512):
            j = min(i + 512, hi)
            correct += (model(x[i:j]).argmax(dim=1) == y[i:j]).sum().item()
    model.train()
    counts = torch.tensor([correct, hi - lo], dtype=torch.float64)
    dist.all_reduce(counts)
    return counts[0].item() / max(counts[1].item(), 1.0)


def worker(rank, args, port, queue):
    import torch
    import torch.distributed as dist
    import torch.nn as nn
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    world = args.workers
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        x, y = load_mnist(args.data)
        if args.model in ("cnn", "cnn3"):
            x = x.reshape(-1, 1, 28, 28)
        train_x, train_y = x[: args.train_end], y[: args.train_end]
        test_x, test_y = x[args.train_end :], y[args.train_end :]

        torch.manual_seed(args.seed)
        model = DDP(build_model(args.model))  # broadcasts rank 0's parameters
        loss_fn = nn.CrossEntropyLoss()
        if args.optimizer == "adamw":
            opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
        else:
            opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)

        global_batch = args.batch_size
        local_batch = global_batch // world
        n = train_x.shape[0]
        steps_per_epoch = n // global_batch
        train_s = 0.0
        steps = 0
        accuracy = -1.0
        loss_val = float("nan")
        for epoch in range(args.epochs):
            g = torch.Generator()
            g.manual_seed(args.seed + epoch)
            order = torch.randperm(n, generator=g)
            dist.barrier()
            t0 = time.perf_counter()
            for step in range(steps_per_epoch):
                first = step * global_batch + rank * local_batch
                idx = order[first : first + local_batch]
                xb, yb = train_x[idx], train_y[idx]
                opt.zero_grad(set_to_none=True)
                loss = loss_fn(model(xb), yb)
                loss.backward()  # DDP all-reduces (averages) the gradients here
                opt.step()
                steps += 1
            loss_val = loss.item()
            train_s += time.perf_counter() - t0
            accuracy = evaluate(model.module, test_x, test_y, rank, world)
            if rank == 0 and args.verbose:
                print(
                    f"pytorch_ddp: epoch {epoch + 1}/{args.epochs} loss {loss_val:.4f} "
                    f"test_accuracy {accuracy:.4f} train_s {train_s:.2f}",
                    file=sys.stderr,
                    flush=True,
                )
        if rank == 0:
            queue.put((accuracy, steps * local_batch * world, train_s))
        # Leave together: a rank that tears gloo down while its peer still talks to it aborts.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=["mlp", "cnn", "cnn3"], default="mlp")
    p.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW's")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=128, help="global batch, split evenly over the workers")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, default=1, help="compute threads per process")
    p.add_argument("--train-end", type=int, default=8000, help="records [0, N) train, [N, end) test")
    p.add_argument("--data", default=os.path.join(REPO, "data", "mnist"))
    p.add_argument("--verbose", action="store_true", help="per-epoch lines on stderr")
    args = p.parse_args()
    if args.workers < 1 or args.batch_size % args.workers != 0:
        p.error("--batch-size must be a positive multiple of --workers")

    # Keep every library's thread pool at the requested size in the children.
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")

    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    try:
        mp.spawn(worker, args=(args, free_port(), queue), nprocs=args.workers, join=True)
    except mp.ProcessExitedException as e:
        # gloo sometimes aborts a process while it shuts down, after the run is complete;
        # the result counts only if rank 0 delivered it.
        if queue.empty():
            raise
        print(f"pytorch_ddp: a process failed while shutting down ({e}); the run had completed", file=sys.stderr)
    accuracy, samples, train_s = queue.get()
    print(
        f"pytorch_ddp: model={args.model} workers={args.workers} epochs={args.epochs} test_accuracy={accuracy:.4f} "
        f"samples_per_s={samples / max(train_s, 1e-9):.0f} train_s={train_s:.1f}",
        flush=True,
    )


if __name__ == "__main__":
    main()
