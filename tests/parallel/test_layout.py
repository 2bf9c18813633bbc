"""Layout validation: every invalid layout fails before any process group, model or data is touched."""

import pytest

from openk2.model import get_preset
from openk2.parallel.layout import LayoutError, ParallelLayout
from openk2.train.config import TrainConfigError, load_config


def test_resolve_fills_dp_shard_and_derives_degrees():
    L = ParallelLayout(pp=2, ep=2).resolve(8)
    assert (L.dp_shard, L.dp, L.efsdp, L.n_stages, L.world_size) == (4, 4, 2, 2, 8)
    assert ParallelLayout().resolve(1).dp_shard == 1
    assert ParallelLayout(dp_replicate=2, dp_shard=2).resolve(4).dp == 4


@pytest.mark.parametrize(
    ("kw", "world", "match"),
    [
        (dict(dp_shard=3), 4, r"pp x dp_replicate x dp_shard = 1 x 1 x 3 = 3 ranks, but the world size is 4"),
        (dict(pp=3), 4, r"does not divide the world size 4"),
        (dict(ep=4), 6, r"ep=4 must divide parallel.dp_shard=6"),
        (dict(ep=4), 2, r"parallel.ep=4 must divide parallel.dp_shard=2"),
        (dict(pp_schedule="gpipe"), 1, r"pp_schedule must be one of"),
        (dict(pp=2, pp_virtual_stages=2), 2, r"needs parallel.pp_schedule = 'interleaved_1f1b'"),
        (dict(pp=2, pp_schedule="interleaved_1f1b"), 2, r"needs parallel.pp_virtual_stages >= 2"),
        (dict(recompute="full"), 1, r"parallel.recompute must be one of"),
        (dict(ep=0), 1, r"parallel.ep must be >= 1"),
    ],
)
def test_invalid_layouts_name_the_key(kw, world, match):
    with pytest.raises(LayoutError, match=match):
        ParallelLayout(**kw).resolve(world)


def test_model_checks_experts_layers_and_microbatches():
    tiny = get_preset("tiny")  # 3 layers, 8 routed experts
    with pytest.raises(LayoutError, match=r"ep=16 must divide the 8 routed experts"):
        ParallelLayout(ep=16, dp_shard=16).resolve(16).validate_model(tiny)
    with pytest.raises(LayoutError, match=r"do not divide the model's 3 layers"):
        ParallelLayout(pp=2).resolve(2).validate_model(tiny)
    with pytest.raises(LayoutError, match=r"pp_layers = \[1, 1\] must be >= 0 and sum to the model's 3 layers"):
        ParallelLayout(pp=2, pp_layers=(1, 1)).resolve(2).validate_model(tiny)
    with pytest.raises(LayoutError, match=r"batch_size=3 sequences must split into parallel.microbatches=2"):
        ParallelLayout(pp=2, pp_layers=(2, 1)).resolve(2).validate_model(tiny, batch_size=3)
    with pytest.raises(LayoutError, match=r"microbatches only applies to pipeline parallelism"):
        ParallelLayout(microbatches=4).resolve(1).validate_model(tiny)
    with pytest.raises(LayoutError, match=r"untied embeddings"):
        ParallelLayout(pp=3).resolve(3).validate_model(get_preset("tiny", tie_word_embeddings=True))
    ok = ParallelLayout(pp=2, pp_layers=(2, 1)).resolve(2)
    ok.validate_model(tiny, batch_size=4)
    assert ok.stage_layers(3) == [[0, 1], [2]]


def test_interleaved_stage_assignment_is_loop_order():
    L = ParallelLayout(pp=2, pp_schedule="interleaved_1f1b", pp_virtual_stages=2).resolve(2)
    assert L.stage_layers(8) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert L.stages_of_rank(0) == [0, 2] and L.stages_of_rank(1) == [1, 3]
    assert L.n_microbatches == 4


def test_config_section_validates_static_checks():
    cfg = load_config(None, ["parallel.pp=2", "parallel.pp_schedule='interleaved_1f1b'",
                             "parallel.pp_virtual_stages=2", "parallel.ep=2", "parallel.pp_layers=[1, 1, 1, 1]"])
    assert ParallelLayout.from_section(cfg.parallel).resolve(4).efsdp == 1
    with pytest.raises(TrainConfigError, match="parallel.recompute"):
        load_config(None, ["parallel.recompute='all'"])
    with pytest.raises(TrainConfigError, match="parallel.ep=3 must divide parallel.dp_shard=2"):
        load_config(None, ["parallel.ep=3", "parallel.dp_shard=2"])


def test_trainer_rejects_a_bad_layout_before_any_work(tmp_path, monkeypatch):
    from openk2.train.trainer import Trainer

    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = load_config(None, ["model.preset='tiny'", "parallel.ep=3", f"run.dir='{tmp_path / 'run'}'"])
    with pytest.raises(TrainConfigError, match=r"ep=3 must divide parallel.dp_shard=2"):
        Trainer(cfg)
    cfg = load_config(None, ["model.preset='tiny'", "parallel.pp=2", f"run.dir='{tmp_path / 'run'}'"])
    with pytest.raises(TrainConfigError, match=r"do not divide the model's 3 layers"):
        Trainer(cfg)
    assert not (tmp_path / "run").exists()  # failed before touching the run directory or the data
