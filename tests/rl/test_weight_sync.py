"""Weight sync: in-process copy into a module/engine, and the bucketed torch.distributed broadcast over gloo
(two real processes; bit-exact tensors of mixed dtypes, one larger than a bucket)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from openk2.rl.weight_sync import BucketedSync, InProcessSync, load_named_tensors

WORKER = Path(__file__).with_name("weight_sync_worker.py")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_bucketed_sync_round_trip_over_gloo_is_bit_exact(tmp_path):
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    ranks = [subprocess.Popen([sys.executable, str(WORKER), str(rank), str(port), str(tmp_path)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    try:
        for proc in ranks:
            out, _ = proc.communicate(timeout=120)
            assert proc.returncode == 0, out[-3000:]
    finally:
        for proc in ranks:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    sent = torch.load(tmp_path / "sent.pt")
    runs = torch.load(tmp_path / "received.pt")
    assert [name for name, _ in runs.pop("after_error")] == ["embed.weight", "big.weight"]
    assert len(runs) == 4
    for received in runs.values():
        check_bit_exact(received, sent)


def check_bit_exact(received, sent):
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

