"""Weight sync: in-process copy into a module/engine, and the bucketed torch.distributed broadcast over gloo
(two real processes; bit-exact tensors of mixed dtypes, one larger than a bucket)."""

import pytest
import torch
import torch.multiprocessing as mp

from openk2.rl.weight_sync import BucketedSync, InProcessSync, load_named_tensors

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


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out_path: str) -> None:
    import torch.distributed as dist

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
        else:
            received["after_error"] = list(sync.receive())
        if rank == 1:
            torch.save(received, out_path)
    finally:
        dist.destroy_process_group()


def test_bucketed_sync_round_trip_over_gloo_is_bit_exact(tmp_path):
    out_path = str(tmp_path / "received.pt")
    mp.start_processes(_worker, args=(_free_port(), out_path), nprocs=2, start_method="spawn", join=True)
    runs = torch.load(out_path)
    assert [name for name, _ in runs.pop("after_error")] == ["embed.weight", "big.weight"]
    assert len(runs) == 4
    for received in runs.values():
        check_bit_exact(received)


def check_bit_exact(received):
    sent = sample_tensors()
    assert [name for name, _ in received] == [name for name, _ in sent]
    for (name, got), (_, want) in zip(received, sent, strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape, name
        want = want.contiguous()
        if want.numel():
            assert torch.equal(got.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8)), name


def test_in_process_sync_into_a_module_and_an_engine():
    trainer, rollout = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    sync = InProcessSync(rollout)
    sync.send(trainer.named_parameters(), version=3)
    assert torch.equal(rollout.weight, trainer.weight) and rollout.weight is not trainer.weight
    assert sync.version == 3 and [n for n, _ in sync.receive()] == ["weight", "bias"]

    class Engine:
        version = 0

        def update_weights(self, named_tensors, version):
            self.got, self.version = dict(named_tensors), version

    engine = Engine()
    InProcessSync(engine).send(trainer.named_parameters(), version=5)
    assert engine.version == 5 and torch.equal(engine.got["bias"], trainer.bias)


def test_load_errors_name_the_tensor():
    with pytest.raises(KeyError, match="no tensor named 'decoder.weight'.*weight, bias"):
        load_named_tensors(torch.nn.Linear(2, 2), [("decoder.weight", torch.zeros(2, 2))], 1)
    with pytest.raises(ValueError, match=r"weight has shape \(3, 2\)"):
        load_named_tensors(torch.nn.Linear(2, 2), [("weight", torch.zeros(3, 2))], 1)
    with pytest.raises(ValueError, match="bucket_bytes must be at least"):
        BucketedSync(bucket_bytes=8)

