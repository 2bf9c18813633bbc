"""The explicit dtype policy: fp32 on CPU (bf16 matmuls are ~100x slower there), bf16 compute on CUDA.

Parameters and optimizer state stay fp32 (master weights); on CUDA the forward runs under a bf16 autocast
that this policy opens explicitly, never implicitly.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class DtypePolicy:
    device: torch.device
    compute_dtype: torch.dtype

    @classmethod
    def resolve(cls, device: str = "auto", dtype: str = "auto") -> DtypePolicy:
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' requested but torch.cuda.is_available() is False")
        dev = torch.device(device)
        if dtype == "auto":
            compute = torch.bfloat16 if dev.type == "cuda" else torch.float32
        elif dtype in _NAMES:
            compute = _NAMES[dtype]
        else:
            raise ValueError(f"dtype must be auto, float32 or bfloat16; got {dtype!r}")
        return cls(dev, compute)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.compute_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.compute_dtype)
