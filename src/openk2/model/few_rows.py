"""Products of a few rows on x86-64 CPUs: y = x @ w.T in fp32 for 1 to `MAX_ROWS` rows, by a kernel of our own.

Why: a decode step multiplies one row per sequence by every weight of the model. At 1-8 rows a product does 2-16
FLOPs per weight element it reads, so it should stream each weight at the memory bandwidth, or at 8 rows run near
the FMA peak. The GEMMs torch ships are tuned for many rows: on the AMD EPYC hosts we measure on, oneDNN streams a
large weight at 8 rows at half the speed of this kernel, and takes ~90 us for one row of a 2 MiB weight where this
kernel takes ~35 (docs/benchmarks.md, "Few-row products"). llama.cpp's decode runs kernels of this kind.

The kernel (`csrc/few_rows.cpp`, AVX2 + FMA) keeps 4 input rows x 3 weight rows of dot products in registers (for
one input row: 8 weight rows, or short rows one after another as one linear stream), prefetches the next weight
rows at several input rows (without, a weight read from DRAM at 8 rows streamed at half the bandwidth of one row),
and splits the weight's rows over torch's intra-op threads; its experts op runs the routed SwiGLU experts of a
decode step or of a prefill of up to a few hundred tokens on the same tiles, each chosen expert read once, in one
call instead of several per expert. The same library holds the decode step's absorbed MLA attention over the
latent cache (`csrc/latent_attention.cpp`, `latent_attention`), whose sum over keys Inductor compiles into
latency-bound chains, a cached prefill's masked attention (`csrc/masked_attention.cpp`, `masked_attention`:
register-tiled scores where batched matmuls make five passes over them), training's causal attention and its
backward (`csrc/causal_attention.cpp`, `causal_attention`, `causal_attention_backward`: one head at a time in a
thread's cache, where MLA's small heads ran batched matmuls at half the fp32 peak), training's one-pass SwiGLU and
RMSNorm forward and backward (`csrc/swiglu.cpp`, `csrc/rms_norm.cpp`), the transposing copy oneDNN's weight-gradient
operands need (`csrc/transpose.cpp`), and the training steps' caching allocator (`csrc/block_cache.cpp`,
`openk2.model.block_cache`).
It is compiled on first use with the C++ compiler torch.compile's CPU backend needs anyway (~5-15 s), into
`~/.cache/openk2/kernels` (`OPENK2_KERNEL_CACHE`), keyed by the sources, torch's version and the flags, and loaded as
the ops `torch.ops.openk2_kernels.few_rows_mm`, `.few_rows_experts`, `.latent_attention`, `.masked_attention`,
`.causal_attention`, `.causal_attention_backward`, `.swiglu`, `.rms_norm` (each with its backward) and
`.transpose_copy`, which Dynamo and Inductor see as plain ops.

The ops have no autograd formulas: the decode step and other inference code call them, and training calls the
backward ops from its own autograd functions (`attention._KernelCausalAttention`, `moe._SwiGLU`,
`norm._KernelRMSNorm`). CPUs without AVX2 and FMA, other architectures, or
a failed build fall back to the caller's path (oneDNN or aten's), with one warning for a failed build.
`OPENK2_FEW_ROWS=0` in the environment turns it off.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch

from openk2.model.switches import env_switch

log = logging.getLogger(__name__)

#: Products with at most this many rows take the kernel. At 32 rows it still ran at 1.2-1.5x oneDNN on every
#: weight shape of the bench configs (2 threads); beyond, oneDNN's blocked GEMM, which reuses each loaded input
#: row across many weight rows, is the right tool.
MAX_ROWS = 32
#: The experts op takes up to this many (token, expert) slots per expert on average. Grouped by expert, a prefill's
#: slots are many small products (config A at 512 tokens: 48 per layer of ~64 x 256 x 128), and per-call costs
#: dominate them: at 64 slots per expert the op ran at 2.0x (config A) and 1.0x (config C) the per-expert oneDNN
#: products, at 128 at 1.6x / 1.9x, at 256 at 1.2x / 1.0x (2 threads; docs/benchmarks.md, "Prefill").
MAX_SLOTS_PER_EXPERT = 128
_CSRC = Path(__file__).with_name("csrc")
SOURCES = tuple(_CSRC / name for name in ("few_rows.cpp", "latent_attention.cpp", "masked_attention.cpp",
                                          "causal_attention.cpp", "transpose.cpp", "swiglu.cpp",
                                          "rms_norm.cpp", "block_cache.cpp"))
# Included by the sources: part of the cache key.
HEADERS = (_CSRC / "tiles.h", _CSRC / "attention_tiles.h", _CSRC / "work_split.h")
_FLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC", "-std=c++20")

_lock = threading.Lock()
_state: dict[str, bool | str] = {}  # "enabled" (the switch), "available" (the library): bool, "error": why not


def enabled_by_env() -> bool:
    return env_switch("OPENK2_FEW_ROWS")


def cpu_supports() -> bool:
    """x86-64 with AVX2 and FMA (torch's own CPU capability check: AVX2 implies FMA on every CPU torch knows)."""
    return (platform.machine().lower() in ("x86_64", "amd64")
            and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"))


def cache_dir() -> Path:
    if os.environ.get("OPENK2_KERNEL_CACHE"):
        return Path(os.environ["OPENK2_KERNEL_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "openk2" / "kernels"


def _compile_command(out: Path) -> list[str]:
    from torch.utils import cpp_extension

    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        raise RuntimeError("no C++ compiler (g++ or c++) on PATH")
    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    # torch's own libgomp (torch/lib): the kernel's threads are torch's intra-op pool, not a second OpenMP runtime.
    libs = [flag for p in cpp_extension.library_paths() for flag in (f"-L{p}", f"-Wl,-rpath,{p}")]
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    return [cxx, *_FLAGS, abi, *includes, *map(str, SOURCES), "-o", str(out), *libs, "-lc10", "-ltorch_cpu", "-lgomp"]


def library_path() -> Path:
    sources = b"".join(path.read_bytes() for path in (*SOURCES, *HEADERS))
    key = hashlib.sha256(sources + f"{torch.__version__}|{' '.join(_FLAGS)}".encode()).hexdigest()
    return cache_dir() / f"few_rows-{key[:16]}.so"


def _build(path: Path) -> None:
    """Compile into a temporary file beside `path`, then rename: concurrent builds (test workers, a server and
    its clients) each finish with a whole library and never load a half-written one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp.so")
    os.close(fd)
    try:
        cmd = _compile_command(Path(tmp))
        log.info("building the few-row product kernel: %s", " ".join(cmd))
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{cmd[0]} failed ({done.returncode}):\n{done.stderr[-3000:]}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load() -> None:
    path = library_path()
    if not path.exists():
        _build(path)
    torch.ops.load_library(str(path))

    @torch.library.register_fake("openk2_kernels::few_rows_mm")
    def _(x_MK: torch.Tensor, w_NK: torch.Tensor) -> torch.Tensor:
        return x_MK.new_empty(x_MK.shape[0], w_NK.shape[0])

    @torch.library.register_fake("openk2_kernels::few_rows_experts")
    def _(x_TD, ids_TK, gates_TK, gate_EFD, up_EFD, down_EDF) -> torch.Tensor:
        return x_TD.new_empty(x_TD.shape)

    @torch.library.register_fake("openk2_kernels::latent_attention")
    def _(q_BHL, latent_BSL, key_valid_BS, new_BL, scale, c) -> torch.Tensor:
        return q_BHL.new_empty(q_BHL.shape[0], q_BHL.shape[1], c)

    @torch.library.register_fake("openk2_kernels::masked_attention")
    def _(q_BHTQ, k_BHSQ, v_BHSV, mask_BTS, scale) -> torch.Tensor:
        return q_BHTQ.new_empty(*q_BHTQ.shape[:3], v_BHSV.shape[3])

    @torch.library.register_fake("openk2_kernels::transpose_copy")
    def _(x_RC: torch.Tensor) -> torch.Tensor:
        return x_RC.new_empty(x_RC.shape)

    @torch.library.register_fake("openk2_kernels::swiglu")
    def _(gate_SF: torch.Tensor, up_SF: torch.Tensor) -> torch.Tensor:
        return gate_SF.new_empty(gate_SF.shape)

    @torch.library.register_fake("openk2_kernels::swiglu_backward")
    def _(grad_SF, gate_SF, up_SF, grad_gate_SF, grad_up_SF) -> None:
        return None

    @torch.library.register_fake("openk2_kernels::rms_norm")
    def _(x_ND: torch.Tensor, w_D: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        return x_ND.new_empty(x_ND.shape), x_ND.new_empty(x_ND.shape[0])

    @torch.library.register_fake("openk2_kernels::rms_norm_backward")
    def _(grad_ND, x_ND, rstd_N, w_D, need_dx, need_dw) -> tuple[torch.Tensor, torch.Tensor]:
        N, D = x_ND.shape
        return x_ND.new_empty(N if need_dx else 0, D), x_ND.new_empty(D if need_dw else 0)

    @torch.library.register_fake("openk2_kernels::causal_attention")
    def _(q_BHTQ, k_BHTQ, v_BHTV, scale):
        B, H, T, _ = q_BHTQ.shape
        out_BTHV = q_BHTQ.new_empty(B, T, H, v_BHTV.shape[3])
        return out_BTHV.transpose(1, 2), q_BHTQ.new_empty(B, H, T), q_BHTQ.new_empty(B, H)

    @torch.library.register_fake("openk2_kernels::causal_attention_backward")
    def _(dout_BHTV, q_BHTQ, k_BHTQ, v_BHTV, out_BHTV, lse_BHT, scale):
        B, H, T, Q = q_BHTQ.shape
        return tuple(q_BHTQ.new_empty(B, T, H, n).transpose(1, 2) for n in (Q, Q, v_BHTV.shape[3]))


@torch.compiler.assume_constant_result  # compiled code asks too: a constant of the trace, not a graph break
def available() -> bool:
    """Whether `mm` can run here: switched on, a CPU it supports, and the library built and loaded (built on the
    first call; a failed build warns once and stays unavailable for the process)."""
    if "enabled" not in _state:
        _state["enabled"] = enabled_by_env()
    return bool(_state["enabled"]) and library_loaded()


def library_loaded() -> bool:
    """Whether the kernel library is loaded on a CPU it supports (built and loaded on the first call, whatever
    `OPENK2_FEW_ROWS` says: `block_cache` lives in it too; a failed build warns once and stays unavailable)."""
    if "available" in _state:
        return bool(_state["available"])
    with _lock:
        if "available" not in _state:
            ok = cpu_supports()
            if ok:
                try:
                    _load()
                except Exception as exc:  # no compiler, no headers, a linker error: fall back, say why once
                    ok = False
                    _state["error"] = str(exc)
                    warnings.warn(f"openk2: the few-row kernel library is unavailable ({exc}); decode falls back "
                                  "to oneDNN's products, training to torch's own CPU allocator", stacklevel=2)
            _state["available"] = ok
    return bool(_state["available"])


if torch.distributed.is_available():
    from torch.distributed.tensor import DTensor
else:  # a torch built without distributed has no DTensor to keep out
    DTensor = ()


def _kernel_operands(*tensors: torch.Tensor) -> bool:
    """fp32 CPU tensors, not DTensors (a sharded weight keeps torch's ops)."""
    return all(t.dtype == torch.float32 and t.device.type == "cpu" and not isinstance(t, DTensor) for t in tensors)


def takes(x_MK: torch.Tensor, w_NK: torch.Tensor) -> bool:
    """fp32 CPU operands (not DTensors: a sharded weight keeps torch's ops), at most `MAX_ROWS` rows, and the
    kernel available."""
    return x_MK.dim() == 2 and x_MK.shape[0] <= MAX_ROWS and _kernel_operands(x_MK, w_NK) and available()


def takes_experts(x_TD: torch.Tensor, expert_ids_TK: torch.Tensor, gate_EFD: torch.Tensor) -> bool:
    """`takes` for the experts op: fp32 CPU operands, not DTensors, at most `MAX_SLOTS_PER_EXPERT` slots per expert
    on average, and the kernel available."""
    return (expert_ids_TK.numel() <= MAX_SLOTS_PER_EXPERT * gate_EFD.shape[0] and _kernel_operands(x_TD, gate_EFD)
            and available())


def mm(x_MK: torch.Tensor, w_NK: torch.Tensor) -> torch.Tensor:
    """x @ w.T (x [M, K], w [N, K] with unit stride along K, as `nn.Linear` keeps its weight). Forward only."""
    return torch.ops.openk2_kernels.few_rows_mm(x_MK, w_NK)


def experts(x_TD: torch.Tensor, expert_ids_TK: torch.Tensor, gates_TK: torch.Tensor, gate_EFD: torch.Tensor,
            up_EFD: torch.Tensor, down_EDF: torch.Tensor) -> torch.Tensor:
    """The routed SwiGLU experts of a few tokens, `sum_k gates[t, k] * expert_{ids[t, k]}(x[t])`, with each chosen
    expert's weights read once for all the tokens that chose it (`RoutedExperts.forward_gathered`'s numbers).
    Forward only."""
    return torch.ops.openk2_kernels.few_rows_experts(x_TD, expert_ids_TK, gates_TK, gate_EFD, up_EFD, down_EDF)


def takes_attention(q_BHL: torch.Tensor, latent_BSL: torch.Tensor) -> bool:
    """`takes` for `latent_attention`: fp32 CPU operands, not DTensors, and the kernel available."""
    return _kernel_operands(q_BHL, latent_BSL) and available()


def latent_attention(q_BHL: torch.Tensor, latent_BSL: torch.Tensor, key_valid_BS: torch.Tensor, new_BL: torch.Tensor,
                     scale: float, c: int) -> torch.Tensor:
    """A decode step's absorbed MLA attention [B, H, c]: softmax over the cached latents (masked by `key_valid_BS`)
    and the row's own new latent of `scale * q . latent`, weighting the latents' first `c` dims
    (`decode._attention_step`'s numbers; `csrc/latent_attention.cpp`). Forward only."""
    return torch.ops.openk2_kernels.latent_attention(q_BHL, latent_BSL, key_valid_BS, new_BL, scale, c)


def takes_masked_attention(q_BHTQ: torch.Tensor, k_BHSQ: torch.Tensor, v_BHSV: torch.Tensor) -> bool:
    """`takes` for `masked_attention`: fp32 CPU operands, not DTensors, and the kernel available."""
    return _kernel_operands(q_BHTQ, k_BHSQ, v_BHSV) and available()


def masked_attention(q_BHTQ: torch.Tensor, k_BHSQ: torch.Tensor, v_BHSV: torch.Tensor, mask_BTS: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """Softmax attention under a boolean mask (True: attend), [B, H, T, V]: `attention.blocked_masked_attention`'s
    numbers (`csrc/masked_attention.cpp`), for a cached prefill. A row that sees no key gets zeros. Forward only."""
    return torch.ops.openk2_kernels.masked_attention(q_BHTQ, k_BHSQ, v_BHSV, mask_BTS, scale)


def takes_causal_attention(q_BHTQ: torch.Tensor, k_BHTQ: torch.Tensor, v_BHTV: torch.Tensor) -> bool:
    """`takes` for `causal_attention`: fp32 CPU operands, not DTensors, and the kernel available."""
    return _kernel_operands(q_BHTQ, k_BHTQ, v_BHTV) and available()


def causal_attention(q_BHTQ: torch.Tensor, k_BHTQ: torch.Tensor, v_BHTV: torch.Tensor,
                     scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Causal softmax attention for training: the output [B, H, T, V] (a view of a [B, T, H, V] tensor), each
    query's log-sum-exp of its scaled scores [B, H, T], which the backward takes, and each head's largest scaled
    score [B, H] (QK-Clip's max logit) (`csrc/causal_attention.cpp`; `attention.blocked_causal_attention`'s
    numbers)."""
    return torch.ops.openk2_kernels.causal_attention(q_BHTQ, k_BHTQ, v_BHTV, scale)


def causal_attention_backward(grad_BHTV: torch.Tensor, q_BHTQ: torch.Tensor, k_BHTQ: torch.Tensor,
                              v_BHTV: torch.Tensor, out_BHTV: torch.Tensor, lse_BHT: torch.Tensor,
                              scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of `causal_attention`'s output with respect to q, k and v (views of [B, T, H, *] tensors)."""
    return torch.ops.openk2_kernels.causal_attention_backward(grad_BHTV, q_BHTQ, k_BHTQ, v_BHTV, out_BHTV, lse_BHT,
                                                              scale)


def transpose_copy(x_RC: torch.Tensor) -> torch.Tensor:
    """`x.contiguous()` of a 2-D fp32 CPU tensor, by 8 x 8 register transposes on torch's threads when x is a
    transposed view (unit stride along its rows; `csrc/transpose.cpp`), where aten copies on one thread. Call it
    where `available()`."""
    return torch.ops.openk2_kernels.transpose_copy(x_RC)


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """x as [rows, last dim] with unit stride along the last dim, as the training kernels take it (a view where it
    can be)."""
    x_RF = x.reshape(-1, x.shape[-1])
    return x_RF if x_RF.stride(-1) == 1 else x_RF.contiguous()


def swiglu(gate_SF: torch.Tensor, up_SF: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up [S, F] in one pass (`csrc/swiglu.cpp`); gate and up 2-D fp32 CPU with unit stride along F."""
    return torch.ops.openk2_kernels.swiglu(gate_SF, up_SF)


def swiglu_backward(grad_SF: torch.Tensor, gate_SF: torch.Tensor, up_SF: torch.Tensor, grad_gate_SF: torch.Tensor,
                    grad_up_SF: torch.Tensor) -> None:
    """`swiglu`'s gradients written into grad_gate and grad_up (views of one buffer where the caller wants them
    together), one pass recomputing the sigmoid from gate."""
    torch.ops.openk2_kernels.swiglu_backward(grad_SF, gate_SF, up_SF, grad_gate_SF, grad_up_SF)


def rms_norm(x_ND: torch.Tensor, w_D: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm's output [N, D] and each row's 1 / rms [N], one pass over x (`csrc/rms_norm.cpp`); x with unit
    stride along D."""
    return torch.ops.openk2_kernels.rms_norm(x_ND, w_D, eps)


def rms_norm_backward(grad_ND: torch.Tensor, x_ND: torch.Tensor, rstd_N: torch.Tensor, w_D: torch.Tensor,
                      need_dx: bool = True, need_dw: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """`rms_norm`'s gradients (dx [N, D], dw [D]; empty where not asked for), one pass over the rows; dw the same
    on any number of threads."""
    return torch.ops.openk2_kernels.rms_norm_backward(grad_ND, x_ND, rstd_N, w_D, need_dx, need_dw)
