"""The parallel layout of a run (`[parallel]` in a training config) and its validation.

A world of `pp x dp_replicate x dp_shard` ranks. Expert parallelism does not add ranks: as in K2 and torchtitan
it borrows from data parallelism, so the `ep` ranks of an expert group hold different experts *and* read
different data; `ep` must divide `dp_shard`, and the experts are FSDP-sharded over the remaining
`efsdp = dp_shard / ep`. Rank order, outermost first: pp, dp_replicate, efsdp, ep, so an expert group (the
all-to-all) spans neighbouring ranks (one node, when it fits).

Every check runs before any process group, model or data is touched, so a bad layout fails in seconds with a
message that names the key to change.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from openk2.model.config import ModelConfig

PP_SCHEDULES = ("1f1b", "interleaved_1f1b")
RECOMPUTE_MODES = ("none", "selective", "selective+moe_down")


class LayoutError(ValueError):
    """A parallel layout that cannot run: the message names the `parallel.*` key to change."""


@dataclass(frozen=True)
class ParallelLayout:
    dp_replicate: int = 1
    dp_shard: int = -1  # -1: the ranks left after pp and dp_replicate
    ep: int = 1
    pp: int = 1
    pp_schedule: str = "1f1b"
    pp_virtual_stages: int = 1  # pipeline stages per pp rank (interleaved 1F1B)
    pp_layers: tuple[int, ...] = ()  # decoder layers per pipeline stage (empty: even split)
    microbatches: int = 0  # pipeline micro-batches per batch; 0: one per pipeline stage
    recompute: str = "none"  # "none" | "selective" (K2's list) | "selective+moe_down"
    fp8_activations: bool = False  # FP8 (e4m3, 1x128 tiles) storage of MoE up-proj and SwiGLU inputs
    offload_activations: bool = False  # remaining saved activations in host memory (no-op on a CPU device)
    # Ranks (filled in by `resolve`).
    world_size: int = field(default=1, compare=False)

    # ------------------------------------------------------------------ derived
    @property
    def dp(self) -> int:
        """Data-parallel degree: ranks that read different data (expert-parallel ranks included)."""
        return self.dp_replicate * self.dp_shard

    @property
    def efsdp(self) -> int:
        """FSDP degree of the routed experts (the data-parallel ranks of one expert shard)."""
        return self.dp_shard // self.ep

    @property
    def n_stages(self) -> int:
        return self.pp * self.pp_virtual_stages

    @property
    def n_microbatches(self) -> int:
        return self.microbatches or self.n_stages

    @property
    def activation_switches(self) -> bool:
        return self.recompute != "none" or self.fp8_activations or self.offload_activations

    @property
    def is_single_process(self) -> bool:
        return self.world_size == 1

    def resolve(self, world_size: int) -> ParallelLayout:
        """This layout for `world_size` ranks (`dp_shard = -1` filled in); raises `LayoutError`."""
        if world_size < 1:
            raise LayoutError(f"world size must be >= 1, got {world_size}")
        for name in ("dp_replicate", "ep", "pp", "pp_virtual_stages"):
            if getattr(self, name) < 1:
                raise LayoutError(f"parallel.{name} must be >= 1, got {getattr(self, name)}")
        dp_shard = self.dp_shard
        if dp_shard == -1:
            rest = self.pp * self.dp_replicate
            if world_size % rest:
                raise LayoutError(
                    f"parallel.pp x parallel.dp_replicate = {self.pp} x {self.dp_replicate} = {rest} does not "
                    f"divide the world size {world_size}; dp_shard = -1 cannot fill the rest"
                )
            dp_shard = world_size // rest
        if dp_shard < 1:
            raise LayoutError(f"parallel.dp_shard must be >= 1 or -1 (fill), got {self.dp_shard}")
        product = self.pp * self.dp_replicate * dp_shard
        if product != world_size:
            raise LayoutError(
                f"parallel.pp x dp_replicate x dp_shard = {self.pp} x {self.dp_replicate} x {dp_shard} = {product} "
                f"ranks, but the world size is {world_size} (torchrun --nproc-per-node x --nnodes). Expert "
                "parallelism borrows from dp_shard and adds no ranks; set parallel.dp_shard = -1 to fill the rest"
            )
        if dp_shard % self.ep:
            raise LayoutError(
                f"parallel.ep={self.ep} must divide parallel.dp_shard={dp_shard}: expert parallelism shards the "
                "experts over data-parallel ranks (each expert group reads different data, as in K2)"
            )
        if self.pp_schedule not in PP_SCHEDULES:
            raise LayoutError(f"parallel.pp_schedule must be one of {', '.join(PP_SCHEDULES)}, "
                              f"got {self.pp_schedule!r}")
        if self.pp_schedule == "1f1b" and self.pp_virtual_stages != 1:
            raise LayoutError(f"parallel.pp_virtual_stages={self.pp_virtual_stages} needs "
                              "parallel.pp_schedule = 'interleaved_1f1b' (1F1B runs one stage per rank)")
        if self.pp_schedule == "interleaved_1f1b" and self.pp > 1 and self.pp_virtual_stages < 2:
            raise LayoutError("parallel.pp_schedule = 'interleaved_1f1b' needs parallel.pp_virtual_stages >= 2")
        if self.microbatches < 0:
            raise LayoutError(f"parallel.microbatches must be >= 0 (0: one per stage), got {self.microbatches}")
        if self.recompute not in RECOMPUTE_MODES:
            raise LayoutError(f"parallel.recompute must be one of {', '.join(RECOMPUTE_MODES)}, "
                              f"got {self.recompute!r}")
        from dataclasses import replace

        return replace(self, dp_shard=dp_shard, world_size=world_size)

    # --------------------------------------------------------------- the model
    def validate_model(self, cfg: ModelConfig, batch_size: int | None = None) -> None:
        """Checks that need the model (and the micro-batch size of one rank); call on a resolved layout."""
        if self.ep > 1:
            if cfg.n_routed_experts == 0:
                raise LayoutError(f"parallel.ep={self.ep} but the model has no routed experts")
            if cfg.n_routed_experts % self.ep:
                raise LayoutError(
                    f"parallel.ep={self.ep} must divide the {cfg.n_routed_experts} routed experts "
                    "(model.n_routed_experts): every expert-parallel rank holds the same number of experts"
                )
        if self.pp > 1:
            self.stage_layers(cfg.num_hidden_layers)
            if cfg.tie_word_embeddings:
                raise LayoutError("pipeline parallelism needs untied embeddings (the first stage holds "
                                  "embed_tokens, the last lm_head); set tie_word_embeddings = false or pp = 1")
            if cfg.seq_aux_loss_coef > 0:
                raise LayoutError("the sequence-wise aux loss (seq_aux_loss_coef > 0) is not supported with "
                                  "pipeline parallelism; K2 balances with the aux-loss-free bias alone")
            if batch_size is not None and batch_size % self.n_microbatches:
                raise LayoutError(
                    f"train.micro_batch_size={batch_size} sequences must split into parallel.microbatches="
                    f"{self.n_microbatches} equal pipeline micro-batches"
                )
            if self.pp_schedule == "1f1b" and self.n_microbatches < self.pp:
                raise LayoutError(f"1F1B needs parallel.microbatches >= pp={self.pp}, got {self.n_microbatches}")
            if self.pp_schedule == "interleaved_1f1b":
                rounds = max(1, self.n_microbatches // self.pp)
                if self.n_microbatches % rounds:
                    raise LayoutError(
                        f"interleaved 1F1B needs parallel.microbatches ({self.n_microbatches}) to be a multiple "
                        f"of the number of rounds max(1, microbatches // pp) = {rounds}"
                    )
        elif self.microbatches > 1:
            raise LayoutError("parallel.microbatches only applies to pipeline parallelism (pp > 1); "
                              "use train.micro_batch_size to split a step's batch without it")

    def stage_layers(self, num_layers: int) -> list[list[int]]:
        """Decoder-layer indices of each pipeline stage (stage s runs on pp rank s % pp: "loop" order)."""
        n = self.n_stages
        if self.pp_layers:
            sizes = list(self.pp_layers)
            if len(sizes) != n:
                raise LayoutError(f"parallel.pp_layers lists {len(sizes)} stages, but pp x pp_virtual_stages = "
                                  f"{self.pp} x {self.pp_virtual_stages} = {n}")
            if any(s < 0 for s in sizes) or sum(sizes) != num_layers:
                raise LayoutError(f"parallel.pp_layers = {sizes} must be >= 0 and sum to the model's "
                                  f"{num_layers} layers (sum is {sum(sizes)})")
        else:
            if num_layers % n:
                raise LayoutError(
                    f"{n} pipeline stages (pp x pp_virtual_stages = {self.pp} x {self.pp_virtual_stages}) do "
                    f"not divide the model's {num_layers} layers; change pp / pp_virtual_stages or give "
                    "parallel.pp_layers (layers per stage) explicitly"
                )
            sizes = [num_layers // n] * n
        out, start = [], 0
        for s in sizes:
            out.append(list(range(start, start + s)))
            start += s
        return out

    def stages_of_rank(self, pp_rank: int) -> list[int]:
        return [pp_rank + k * self.pp for k in range(self.pp_virtual_stages)]

    def describe(self) -> str:
        parts = [f"pp={self.pp}" + (f"x{self.pp_virtual_stages}v ({self.pp_schedule})" if self.pp > 1 else ""),
                 f"dp_replicate={self.dp_replicate}", f"dp_shard={self.dp_shard}", f"ep={self.ep}"]
        act = [k for k, on in (("recompute=" + self.recompute, self.recompute != "none"),
                                ("fp8_activations", self.fp8_activations),
                                ("offload_activations", self.offload_activations)) if on]
        return f"{self.world_size} ranks: " + " ".join(parts) + (f"; {', '.join(act)}" if act else "")

    @classmethod
    def from_section(cls, section: object) -> ParallelLayout:
        """From a `TrainConfig.parallel` section (or anything with the same attributes)."""
        return cls(
            dp_replicate=section.dp_replicate, dp_shard=section.dp_shard, ep=section.ep, pp=section.pp,
            pp_schedule=section.pp_schedule, pp_virtual_stages=section.pp_virtual_stages,
            pp_layers=tuple(section.pp_layers), microbatches=section.microbatches, recompute=section.recompute,
            fp8_activations=section.fp8_activations, offload_activations=section.offload_activations,
        )


def balanced_pp_layers(num_layers: int, n_stages: int) -> tuple[int, ...]:
    """Layers per stage when they do not divide evenly: the remainder goes to the middle stages first, since the
    first stage also embeds and the last also runs the LM head and loss (e.g. K2's 61 layers on 16 stages:
    3, 4 x 13, 3, 3)."""
    if n_stages < 1 or num_layers < n_stages:
        raise LayoutError(f"cannot spread {num_layers} layers over {n_stages} pipeline stages")
    base, extra = divmod(num_layers, n_stages)
    order = list(range(1, n_stages - 1)) + [0, n_stages - 1]
    sizes = [base] * n_stages
    for s in order[:extra]:
        sizes[s] += 1
    return tuple(sizes)


__all__ = ["PP_SCHEDULES", "RECOMPUTE_MODES", "LayoutError", "ParallelLayout", "balanced_pp_layers"]
