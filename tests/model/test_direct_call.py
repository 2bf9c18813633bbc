"""`direct_call`: which graphs it calls directly, and what each call feeds them."""

from __future__ import annotations

import torch

from openk2.model import direct_call


def _graph(*flat):
    return [flat[0] + flat[1]]


def test_plan_maps_flat_inputs_to_arguments_and_live_parameters():
    layer = torch.nn.Linear(3, 3)
    x, y = torch.ones(3), torch.zeros(3)
    flat = (layer.weight, x, layer.bias)
    out = _graph(x, layer.bias)
    call = direct_call.plan(_graph, flat, (None, x, y), layer, out, tuple(out))
    assert call is not None and call.arg_slots == [(1, 1)] and [i for i, _, _ in call.param_slots] == [0, 2]
    # A replaced parameter is read from its module at the call.
    layer.weight = torch.nn.Parameter(torch.full((3, 3), 2.0))
    seen = []
    call.compiled = lambda *f: seen.append(f)
    call((None, y, x))
    assert seen[0][0] is layer.weight and seen[0][1] is y and seen[0][2] is layer.bias


def test_plan_refuses_what_it_cannot_account_for():
    layer = torch.nn.Linear(3, 3)
    x = torch.ones(3)
    out = [x + 1]
    stranger = torch.zeros(3)  # neither an argument nor the model's
    assert direct_call.plan(_graph, (stranger, x), (x,), layer, out, tuple(out)) is None
    assert direct_call.plan(_graph, (x,), (x, x), layer, out, tuple(out)) is None  # one tensor passed twice
    assert direct_call.plan(_graph, (x,), (x,), layer, out, (x + 1,)) is None  # Dynamo returned other tensors
    assert direct_call.plan(_graph, (x,), (x,), layer, out, tuple(out)) is not None


def test_call_key_tells_apart_what_dynamo_guards():
    a = torch.zeros(4, dtype=torch.long)
    key = direct_call.call_key((None, a))
    assert direct_call.call_key((None, torch.ones(4, dtype=torch.long))) == key
    assert direct_call.call_key((None, a.int())) != key
    assert direct_call.call_key((None, torch.zeros(5, dtype=torch.long))) != key
    assert direct_call.call_key((None, torch.zeros(8, dtype=torch.long)[::2])) != key
    assert direct_call.call_key((None, torch.zeros(4, requires_grad=True))) != direct_call.call_key((None, a.float()))
    with torch.no_grad():
        assert direct_call.call_key((None, a)) != key
    with torch.inference_mode():
        assert direct_call.call_key((None, torch.zeros(4, dtype=torch.long))) != key
