"""Calling a compiled CPU decode graph without Dynamo's per-call work.

Why: a `torch.compile`d function runs, at every call, Dynamo's frame hook, its cache lookup and the bytecode that
gathers the model's ~75 parameters into the graph's flat inputs, before the compiled graph (AOT's wrapper around
Inductor's code). On config A at batch 8 that was 345 us of a 3.55 ms step (docs/benchmarks.md, "Calling the graph
directly"): more than any single kernel but the LM head.

How: `DecodeStep` compiles through `capturing_backend`, Inductor's `compile_fx` with the step's options, which also
hands back the compiled graph and its flat inputs on the graph's first call. `plan` maps each flat input to where
it comes from: one of the step's own arguments, or a parameter or buffer of the model, read again from its module at
every call (so weights updated in place, or replaced, are the ones used). Later calls whose arguments match the
first call's in every property Dynamo's guards check on them (`call_key`: shapes, strides, dtypes, devices,
inference tensor or not, requires_grad, grad and inference mode) call the graph directly. Anything else goes through
Dynamo, which guards and recompiles as before; so does any graph whose flat inputs `plan` cannot account for.

Like `decode._input_guards_only`, this trusts that the model's structure does not change under a compiled step: a
parameter replaced by one of another shape is not noticed (Dynamo's guards on parameters are filtered out too).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

CallKey = tuple


def call_key(args: Sequence[torch.Tensor | None]) -> CallKey:
    """What Dynamo's guards check on the step's arguments, and the global state they check, as a dict key."""
    return (torch.is_grad_enabled(), torch.is_inference_mode_enabled(),
            *[None if t is None else (t.shape, t.stride(), t.dtype, t.device, t.is_inference(), t.requires_grad)
              for t in args])


class DirectCall:
    """One compiled graph and where each of its flat inputs comes from."""

    def __init__(self, compiled: Callable, n_inputs: int, arg_slots: list[tuple[int, int]],
                 param_slots: list[tuple[int, dict[str, Any], str]]) -> None:
        self.compiled = compiled
        self.n_inputs = n_inputs
        self.arg_slots = arg_slots  # (flat index, index into the step's arguments)
        self.param_slots = param_slots  # (flat index, the module's _parameters or _buffers, name)

    def __call__(self, args: Sequence[torch.Tensor | None]) -> Any:
        flat: list[Any] = [None] * self.n_inputs
        for i, j in self.arg_slots:
            flat[i] = args[j]
        for i, tensors, name in self.param_slots:
            flat[i] = tensors[name]
        return self.compiled(*flat)


def plan(compiled: Callable, flat: Sequence[Any], args: Sequence[torch.Tensor | None], model: nn.Module,
         graph_out: Any, dynamo_out: Any) -> DirectCall | None:
    """A `DirectCall` for the graph `compiled`, first called with `flat` inside a step called with `args`, or None
    where some flat input is neither an argument nor a parameter or buffer of `model`, an argument is passed twice,
    or the step returned something other than the graph's own outputs (Dynamo's bytecode would have had work to
    do around the graph)."""
    tensor_args = [(j, a) for j, a in enumerate(args) if isinstance(a, torch.Tensor)]
    if len({id(a) for _, a in tensor_args}) != len(tensor_args):
        return None
    if not (isinstance(dynamo_out, tuple) and isinstance(graph_out, (tuple, list)) and len(dynamo_out) == len(graph_out)
            and all(a is b for a, b in zip(dynamo_out, graph_out, strict=True))):
        return None
    arg_index = {id(a): j for j, a in tensor_args}
    owner: dict[int, tuple[dict[str, Any], str]] = {}
    for module in model.modules():
        for tensors in (module._parameters, module._buffers):
            for name, t in tensors.items():
                if t is not None:
                    owner.setdefault(id(t), (tensors, name))
    arg_slots, param_slots = [], []
    for i, t in enumerate(flat):
        if id(t) in arg_index:
            arg_slots.append((i, arg_index[id(t)]))
        elif id(t) in owner:
            param_slots.append((i, *owner[id(t)]))
        else:
            return None
    return DirectCall(compiled, len(flat), arg_slots, param_slots)


class Capture:
    """Where `capturing_backend` leaves a new graph's first call, by thread (a serving engine compiles on its own):
    (compiled graph, flat inputs, graph outputs)."""

    def __init__(self) -> None:
        self._calls: dict[int, tuple[Callable, tuple, Any]] = {}

    def report(self, compiled: Callable, flat: tuple, out: Any) -> None:
        self._calls[threading.get_ident()] = (compiled, flat, out)

    def take(self) -> tuple[Callable, tuple, Any] | None:
        """This thread's last reported first call, if any since its last take."""
        return self._calls.pop(threading.get_ident(), None)


def capturing_backend(options: dict[str, Any], capture: Capture) -> Callable:
    """A Dynamo backend: Inductor with `options` (its config patches), whose graphs report their first call to
    `capture`."""
    from torch._inductor.compile_fx import compile_fx

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        compiled = compile_fx(gm, example_inputs, config_patches=options)
        reported = False

        def call(*flat: Any) -> Any:
            nonlocal reported
            out = compiled(*flat)
            if not reported:
                reported = True
                capture.report(compiled, flat, out)
            return out

        return call

    return backend
