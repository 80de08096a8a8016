#!/usr/bin/env python3
"""PyTorch peer of shoal's GPT benchmark (benches/gpt.sh): the same model, data, order and
optimizer, so throughput and loss compare.

The model is the one `shoal model torch` prints for `[model] kind = "gpt"`: Embedding(256, D),
a learned position embedding [T, D], B pre-LayerNorm blocks (qkv Linear(D, 3D), causal
scaled_dot_product_attention with H heads, proj Linear(D, D), GELU MLP of 4D), LayerNorm(D),
Linear(D, 256, bias=False). Init as shoal's: embeddings N(0, 0.02), Linear weights and biases
U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (PyTorch's default), LayerNorm ones and zeros.

Data: data/text/python-docs.txt as byte tokens, windows of T + 1 every T tokens (shoal's
`data import --format text --context T`); the first --train windows train. Each epoch visits
them in shoal's order (SplitMix64 `epoch_permutation(n, seed, epoch)`, reimplemented here), cut
into global batches; rank r takes the r-th contiguous slice, as shoal does. Loss: the mean
cross-entropy over every position. AdamW(lr, betas (0.9, 0.999), eps 1e-8, weight_decay) on
every parameter, constant rate; gloo over 127.0.0.1, one compute thread per process
(`--workers 1 --threads 2`: one process with two threads, no DDP).

The final line:

    pytorch_gpt: workers=W threads=T steps=S tokens_per_s=N loss_last20=L train_s=X peak_rss_mb=R

tokens_per_s = the tokens of every rank's steps / rank 0's training time; loss_last20: the mean
of the last 20 steps' losses, each the global batch's (the ranks' means averaged, as shoal's
`loss` is); peak_rss_mb: rank 0's peak resident memory.
"""

import argparse
import os
import resource
import socket
import sys
import time

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
MASK = (1 << 64) - 1


class SplitMix64:
    def __init__(self, seed):
        self.state = seed & MASK

    @staticmethod
    def derive(seed, tag):
        m = SplitMix64(seed ^ ((tag * 0xD1B54A32D192ED03) & MASK))
        m.next_u64()
        return m

    def next_u64(self):
        self.state = (self.state + 0x9E3779B97F4A7C15) & MASK
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
        return z ^ (z >> 31)

    def below(self, n):
        return (self.next_u64() * n) >> 64


def epoch_permutation(n, seed, epoch):
    order = list(range(n))
    rng = SplitMix64.derive(seed, 0x5EED0000 + epoch)
    for i in range(n - 1, 0, -1):
        j = rng.below(i + 1)
        order[i], order[j] = order[j], order[i]
    return order


def build(d, heads, blocks, t):
    import torch
    import torch.nn as nn

    class Positions(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(t, d))

        def forward(self, x):
            return x + self.weight

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(d, 3 * d)
            self.proj = nn.Linear(d, d)

        def forward(self, x):
            n, tt, dd = x.shape
            q, k, v = self.qkv(x).split(dd, dim=-1)
            q, k, v = (z.view(n, tt, heads, dd // heads).transpose(1, 2) for z in (q, k, v))
            y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.proj(y.transpose(1, 2).reshape(n, tt, dd))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln1 = nn.LayerNorm(d)
            self.attn = Attention()
            self.ln2 = nn.LayerNorm(d)
            self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(approximate="none"), nn.Linear(4 * d, d))

        def forward(self, x):
            x = x + self.attn(self.ln1(x))
            return x + self.mlp(self.ln2(x))

    layers = [nn.Embedding(256, d), Positions()] + [Block() for _ in range(blocks)] + [nn.LayerNorm(d), nn.Linear(d, 256, bias=False)]
    model = nn.Sequential(*layers)
    with torch.no_grad():
        nn.init.normal_(model[0].weight, std=0.02)
        nn.init.normal_(model[1].weight, std=0.02)
    return model


def worker(rank, args, port, queue):
    import numpy as np
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    world = args.workers
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        text = np.frombuffer(open(os.path.join(REPO, "data", "text", "python-docs.txt"), "rb").read(), dtype=np.uint8)
        t = args.context
        n_windows = (len(text) - (t + 1)) // t + 1
        n = min(args.train, n_windows)
        starts = np.arange(n) * t
        windows = torch.from_numpy(np.stack([text[s : s + t + 1] for s in starts]).astype(np.int64))
        torch.manual_seed(args.seed)
        model = build(args.d_model, args.heads, args.blocks, t)
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            model = DDP(model)
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=args.weight_decay)
        gb = args.batch_size
        local = gb // world
        steps_per_epoch = n // gb
        losses = []
        order, order_epoch = None, None
        if world > 1:
            dist.barrier()
        t0 = time.perf_counter()
        for step in range(args.steps):
            epoch = step // steps_per_epoch
            if order_epoch != epoch:
                order, order_epoch = epoch_permutation(n, args.seed, epoch), epoch
            first = (step % steps_per_epoch) * gb + rank * local
            batch = windows[order[first : first + local]]
            x, y = batch[:, :t], batch[:, 1:]
            opt.zero_grad(set_to_none=True)
            logits = model(x)
            loss = F.cross_entropy(logits.reshape(-1, 256), y.reshape(-1))
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        train_s = time.perf_counter() - t0
        last = torch.stack(losses[-20:]).mean()
        if world > 1:
            dist.all_reduce(last)
            last /= world
        if rank == 0:
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            queue.put((args.steps * gb * t / train_s, last.item(), train_s, rss))
        if world > 1:
            dist.barrier()
    finally:
        if world > 1:
            dist.destroy_process_group()


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32, help="global; split evenly over the workers")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--train", type=int, default=20000, help="windows [0, N) train")
    p.add_argument("--lr", type=float, default=0.001)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=7)
    args = p.parse_args()
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.spawn(worker, args=(args, free_port(), queue), nprocs=args.workers, join=True)
    tps, loss, train_s, rss = queue.get()
    print(
        f"pytorch_gpt: workers={args.workers} threads={args.threads} steps={args.steps} tokens_per_s={tps:.0f} "
        f"loss_last20={loss:.4f} train_s={train_s:.1f} peak_rss_mb={rss:.0f}",
        flush=True,
    )


if __name__ == "__main__":
    main()
