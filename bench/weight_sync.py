"""Weight-sync benchmark: `BucketedSync` over gloo between two local processes (trainer rank 0 → engine rank 1).

    PYTHONPATH=src python bench/weight_sync.py [--mb 256] [--buckets 4 16 64] [--rounds 3]

Sends `--mb` MiB of fp32/bf16 tensors (a model-like mix of sizes, one tensor larger than the smallest bucket)
per sync, for each bucket size with and without double buffering, and reports the median seconds per sync and
GB/s as the receiver saw them (header + bucket broadcasts and the rebuilding of every tensor). Loopback gloo on
CPU bounds nothing about NCCL on GPUs; the point is the cost of the bucketing itself and the effect of its knobs.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import time

import torch
import torch.multiprocessing as mp

from openk2.rl.weight_sync import BucketedSync


def tensors(total_mb: int) -> list[tuple[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    out, left, i = [], total_mb << 20, 0
    sizes = [8 << 20, 1 << 20, 64 << 10, 4 << 10]  # bytes: big matrices, medium, small, norms
    while left > 0:
        nbytes = min(sizes[i % len(sizes)], left)
        dtype = torch.bfloat16 if i % 2 else torch.float32
        n = max(1, nbytes // torch.tensor([], dtype=dtype).element_size())
        out.append((f"layer{i}.weight", torch.randn(n, generator=gen).to(dtype)))
        left -= nbytes
        i += 1
    return out


def worker(rank: int, port: int, args: argparse.Namespace, results: dict) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    payload = tensors(args.mb) if rank == 0 else None
    for bucket_mb in args.buckets:
        for double_buffer in (True, False):
            sync = BucketedSync(bucket_bytes=bucket_mb << 20, double_buffer=double_buffer)
            times = []
            for version in range(args.rounds):
                dist.barrier()
                t0 = time.perf_counter()
                if rank == 0:
                    sync.send(payload, version)
                else:
                    n = sum(t.numel() * t.element_size() for _, t in sync.receive())
                times.append(time.perf_counter() - t0)
            if rank == 1:
                s = statistics.median(times)
                results[(bucket_mb, double_buffer)] = {"bucket_mb": bucket_mb, "double_buffer": double_buffer,
                                                       "s": round(s, 3), "GB/s": round(n / s / 1e9, 3)}
    # Reference: the same bytes as one flat broadcast (no headers, packing or rebuilding).
    flat = torch.empty(args.mb << 20, dtype=torch.uint8)
    times = []
    for _ in range(args.rounds):
        dist.barrier()
        t0 = time.perf_counter()
        dist.broadcast(flat, src=0)
        times.append(time.perf_counter() - t0)
    if rank == 1:
        s = statistics.median(times)
        results[(1 << 30, False)] = {"bucket_mb": "one flat broadcast", "double_buffer": None, "s": round(s, 3),
                                     "GB/s": round(flat.numel() / s / 1e9, 3)}
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=256)
    parser.add_argument("--buckets", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        results = manager.dict()
        mp.start_processes(worker, args=(port, args, results), nprocs=2, start_method="spawn", join=True)
        for key in sorted(results.keys(), key=str):
            print(json.dumps({"MiB": args.mb, **results[key]}))


if __name__ == "__main__":
    main()
