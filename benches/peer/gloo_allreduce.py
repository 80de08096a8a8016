"""The all-reduce peer: torch.distributed.all_reduce over gloo, WORLD local processes (one
thread each), f32 buffers of each size, median of ITERS timed calls after WARMUP, a barrier
before each (as `shoal bench allreduce` does). Rank 0 prints one JSON line per size:
{"bytes": N, "times_ms": [...]}.

    python gloo_allreduce.py --world 2 --sizes 1024,67108864 --iters 20 --warmup 3

With --rank R --master HOST:PORT it runs that one rank (the others are started apart, on
other hosts: benches/examples/hosts.rs starts one per test host, GLOO_SOCKET_IFNAME=eth0).
"""

import argparse
import json
import os
import socket
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def iters_for(n_bytes, iters):
    # Small buffers are cheap: more iterations for a stable median; huge ones fewer.
    if n_bytes <= 1 << 20:
        return max(iters, 50)
    if n_bytes >= 256 << 20:
        return max(3, iters // 4)
    return iters


def run(rank, world, master, sizes, iters, warmup):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://{master}", rank=rank, world_size=world)
    for n_bytes in sizes:
        buf = torch.empty(n_bytes // 4, dtype=torch.float32)
        times = []
        k = iters_for(n_bytes, iters)
        for it in range(warmup + k):
            buf.fill_(float(rank + 1))
            dist.barrier()
            t = time.perf_counter()
            dist.all_reduce(buf)
            if it >= warmup:
                times.append((time.perf_counter() - t) * 1e3)
        want = world * (world + 1) / 2
        if buf[0].item() != want or buf[-1].item() != want:
            raise SystemExit(f"gloo all-reduce gave {buf[0].item()}, expected {want}")
        if rank == 0:
            print(json.dumps({"bytes": n_bytes, "times_ms": times}), flush=True)
    dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--sizes", default=str(64 << 20))
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rank", type=int, default=None, help="run this one rank (with --master)")
    p.add_argument("--master", default=None, help="HOST:PORT of rank 0's rendezvous")
    a = p.parse_args()
    sizes = [int(s) for s in a.sizes.split(",")]
    if a.rank is not None:
        if not a.master:
            raise SystemExit("--rank needs --master HOST:PORT")
        run(a.rank, a.world, a.master, sizes, a.iters, a.warmup)
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(run, args=(a.world, f"127.0.0.1:{port}", sizes, a.iters, a.warmup), nprocs=a.world, join=True)


if __name__ == "__main__":
    sys.exit(main())
