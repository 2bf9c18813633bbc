"""How one optimizer step's global batch splits over a parallel layout.

`train.batch_size` is the **global** batch: sequences per optimizer step, whatever the layout. Every rank reads
the same global sample order (one packed stream, `PackedLoader.next_batch`), data-parallel rank r keeps the
contiguous rows `[r * B / dp, (r + 1) * B / dp)`, and cuts them into `train.micro_batch_size`-row micro-batches
for gradient accumulation (each one a pipeline batch under pp, split again into `parallel.microbatches`). So one
process, any data/expert/pipeline layout and any micro-batch size see the same sequences at every step, the loss
curve does not depend on the layout, and a run can resume on a different number of ranks (Megatron's global
sampler; MosaicML Streaming's elastic determinism).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from openk2.train.config import TrainConfigError


@dataclass(frozen=True)
class BatchPlan:
    global_batch: int  # sequences per optimizer step (train.batch_size)
    dp: int  # data-parallel ranks (those that read different rows)
    dp_rank: int
    micro_batch: int  # sequences per forward/backward on one rank

    @classmethod
    def build(cls, global_batch: int, micro_batch: int, dp: int, dp_rank: int = 0,
              pipeline_microbatches: int = 1) -> BatchPlan:
        """`micro_batch = 0` means no accumulation (global batch / dp). Raises TrainConfigError naming the keys."""
        if global_batch % dp:
            raise TrainConfigError(
                f"train.batch_size={global_batch} (the global batch) is not divisible by the {dp} data-parallel "
                "ranks (parallel.dp_replicate x parallel.dp_shard): every rank must get the same number of sequences"
            )
        per_rank = global_batch // dp
        micro = micro_batch or per_rank
        if per_rank % micro:
            raise TrainConfigError(
                f"train.batch_size={global_batch} does not split into data-parallel ranks x micro-batches: "
                f"{dp} ranks x train.micro_batch_size={micro} does not divide it (each rank gets {per_rank} "
                "sequences); choose train.micro_batch_size dividing batch_size / dp"
            )
        if micro % pipeline_microbatches:
            raise TrainConfigError(
                f"train.micro_batch_size={micro} sequences must split into parallel.microbatches="
                f"{pipeline_microbatches} equal pipeline micro-batches"
            )
        return cls(global_batch, dp, dp_rank, micro)

    @property
    def per_rank(self) -> int:
        return self.global_batch // self.dp

    @property
    def grad_accum(self) -> int:
        """Forward/backward passes per optimizer step on each rank."""
        return self.per_rank // self.micro_batch

    @property
    def rows(self) -> slice:
        """This rank's rows of the global batch."""
        return slice(self.dp_rank * self.per_rank, (self.dp_rank + 1) * self.per_rank)

    def micro_batches(self, x_BT: Tensor, y_BT: Tensor) -> list[tuple[Tensor, Tensor]]:
        """This rank's rows (`x_BT` holds only them, or the whole global batch) as micro-batches."""
        if x_BT.shape[0] == self.global_batch and self.dp > 1:
            x_BT, y_BT = x_BT[self.rows], y_BT[self.rows]
        assert x_BT.shape[0] == self.per_rank, (x_BT.shape, self)
        return list(zip(x_BT.split(self.micro_batch), y_BT.split(self.micro_batch), strict=True))

    def describe(self) -> str:
        return (f"global batch {self.global_batch} = {self.dp} data-parallel ranks x {self.grad_accum} "
                f"micro-batches x {self.micro_batch} sequences")
