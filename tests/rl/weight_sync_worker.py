"""One rank of the gloo weight-sync round trip (tests/rl/test_weight_sync.py runs two of these as scripts):

    python tests/rl/weight_sync_worker.py RANK PORT OUT_DIR

Rank 0 sends, rank 1 receives; each saves what it sent or received under OUT_DIR for the test to compare. Run as
a script (not spawned from the test module) so that nothing depends on how pytest names the test package."""

import sys

import pytest
import torch
import torch.distributed as dist

from openk2.rl.weight_sync import BucketedSync

BUCKET = 4096


def sample_tensors() -> list[tuple[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(7)
    return [
        ("embed.weight", torch.randn(40, 16, generator=gen)),                       # 2560 B
        ("big.weight", torch.randn(3000, generator=gen).to(torch.bfloat16)),        # 6000 B > one bucket
        ("layer.0.scale", torch.randn(33, generator=gen).to(torch.float16)),        # odd byte count
        ("steps", torch.tensor(12345678901, dtype=torch.int64)),                    # 0-dim
        ("mask", torch.rand(17, generator=gen) > 0.5),                               # bool
        ("empty", torch.empty(0, 4)),
        ("nan_and_inf", torch.tensor([float("nan"), float("inf"), -0.0, 1e-45])),   # bit patterns, not values
        ("double", torch.randn(5, 3, generator=gen, dtype=torch.float64).t()),      # non-contiguous
    ]


def main(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        received = {}
        # Both buffering modes, two syncs each through one object (buffers and state are reusable).
        for double_buffer in (True, False):
            sync = BucketedSync(bucket_bytes=BUCKET, double_buffer=double_buffer)
            for version in (1, 2):
                if rank == 0:
                    sync.send(iter(sample_tensors()), version=version)
                    assert sync.stats["buckets"] >= 3
                else:
                    received[(double_buffer, version)] = list(sync.receive())
                    assert sync.version == version
        # A sender that fails mid-sync: both sides raise, nobody hangs, and the group stays usable.
        sync = BucketedSync(bucket_bytes=BUCKET)

        def failing():
            yield from sample_tensors()[:3]
            raise ValueError("trainer lost a shard")

        with pytest.raises((ValueError, RuntimeError), match="trainer lost a shard"):
            if rank == 0:
                sync.send(failing(), version=3)
            else:
                list(sync.receive())
        if rank == 0:
            sync.send(iter(sample_tensors()[:2]), version=4)
            torch.save(sample_tensors(), f"{out_dir}/sent.pt")
        else:
            received["after_error"] = list(sync.receive())
            torch.save(received, f"{out_dir}/received.pt")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
