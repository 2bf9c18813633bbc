"""`openk2 plan`: the memory estimator, checked against K2's published figure."""

import json

from typer.testing import CliRunner

from openk2.cli import app
from openk2.model import count_params, get_preset
from openk2.parallel.layout import ParallelLayout, balanced_pp_layers
from openk2.parallel.plan import estimate


def _k2_layout(**kw) -> ParallelLayout:
    return ParallelLayout(pp=16, ep=16, pp_layers=balanced_pp_layers(61, 16), **kw).resolve(256)


def test_k2_states_match_the_paper():
    # [K2] §2.4: BF16 parameters + FP32 gradient buffers ~ 6 TB over a 256-GPU model-parallel group (~30 GB each).
    p = estimate(get_preset("kimi-k2"), _k2_layout())
    assert 5.5 < p.k2_states_tb < 6.5
    assert 20 < p.k2_states_per_gpu_gb < 32
    # openk2's own shards cover the model exactly once over pp x ep (dense weights also over dp_shard = ep).
    assert abs(p.params_per_gpu * 256 / count_params(get_preset("kimi-k2")).total - 1) < 0.1


def test_switches_lower_activation_memory_and_offload_moves_it_to_host():
    cfg = get_preset("kimi-k2")
    base = estimate(cfg, _k2_layout())
    rc = estimate(cfg, _k2_layout(recompute="selective"))
    rc_fp8 = estimate(cfg, _k2_layout(recompute="selective", fp8_activations=True))
    off = estimate(cfg, _k2_layout(recompute="selective", fp8_activations=True, offload_activations=True))
    assert rc.activation_gb < 0.5 * base.activation_gb
    assert rc_fp8.activation_gb < rc.activation_gb
    assert off.activation_gb < 0.1 * rc_fp8.activation_gb and off.activation_host_gb > 0
    inter = estimate(cfg, ParallelLayout(pp=16, ep=16, pp_schedule="interleaved_1f1b", pp_virtual_stages=2,
                                         pp_layers=balanced_pp_layers(61, 32)).resolve(256))
    assert inter.microbatches_in_flight > base.microbatches_in_flight  # interleaving holds more micro-batches


def test_plan_cli_with_the_k2_recipe():
    out = CliRunner().invoke(app, ["plan", "--config", "recipes/kimi-k2-pp16-ep16.toml", "--gpus", "256", "--json"])
    assert out.exit_code == 0, out.output
    p = json.loads(out.output)
    assert p["gpus"] == 256 and 5.5 < p["k2_states_tb"] < 6.5
    bad = CliRunner().invoke(app, ["plan", "--preset", "kimi-k2", "--gpus", "100", "--pp", "16"])
    assert bad.exit_code == 2 and "cannot fill the rest" in bad.output
