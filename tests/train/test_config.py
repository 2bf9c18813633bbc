import pytest

from openk2.train.config import TrainConfig, TrainConfigError, diff_configs, load_config, parse_override
from openk2.train.schedule import wsd_multiplier


def test_recipes_parse():
    nano = load_config("recipes/nano.toml")
    k2 = load_config("recipes/kimi-k2.toml")
    assert nano == TrainConfig(), "recipes/nano.toml documents the built-in defaults; keep them equal"
    t = k2.train
    assert (t.lr, t.warmup_steps, t.weight_decay, t.seq_len, t.qk_clip_tau) == (2e-4, 500, 0.1, 4096, 100.0)
    assert t.batch_size * t.seq_len == 67_108_864  # 67M tokens per step: the global batch, on any layout
    pp16 = load_config("recipes/kimi-k2-pp16-ep16.toml").train
    assert pp16.batch_size == t.batch_size and pp16.micro_batch_size == 32


def test_overrides_are_typed_and_dotted():
    cfg = load_config(None, ["train.lr=3e-4", "model.preset='tiny'", "model.overrides.num_hidden_layers=2",
                             "train.max_steps=7", "run.dir=runs/x"])
    assert cfg.train.lr == 3e-4 and cfg.model.preset == "tiny" and cfg.train.max_steps == 7
    assert cfg.model.overrides == {"num_hidden_layers": 2} and cfg.run.dir == "runs/x"
    assert parse_override("train.lr=1") == ("train.lr", 1)


@pytest.mark.parametrize("bad, needle", [
    ("train.lrr=1", "valid keys: .*train.lr"),
    ("trian.lr=1", "unknown key"),
    ("train.max_steps='many'", "must be int"),
    ("train.optimizer='sgd'", "muonclip or adamw"),
    ("train.deterministic=1", "true or false"),
    ("noequals", "key=value"),
])
def test_bad_overrides_are_clear(bad, needle):
    with pytest.raises(TrainConfigError, match=needle):
        load_config(None, [bad])


def test_unknown_toml_section(tmp_path):
    p = tmp_path / "x.toml"
    p.write_text("[optim]\nlr = 1\n")
    with pytest.raises(TrainConfigError, match="unknown section"):
        load_config(p)
    with pytest.raises(TrainConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")


def test_diff_configs_lists_changed_keys():
    a, b = TrainConfig().to_dict(), TrainConfig().to_dict()
    b["train"]["lr"] = 1.0
    assert diff_configs(a, b) == [f"train.lr: {a['train']['lr']!r} -> 1.0"]


def test_wsd_schedule_shape():
    m = [wsd_multiplier(s, 100, 10, 0.3, 0.1) for s in range(100)]
    assert m[0] == pytest.approx(0.1) and m[9] == 1.0
    assert all(x == 1.0 for x in m[10:70])
    assert all(a >= b for a, b in zip(m[70:], m[71:], strict=False)) and m[-1] == pytest.approx(0.1)
    lin = [wsd_multiplier(s, 100, 0, 0.5, 0.0, "linear") for s in range(100)]
    assert lin[49] == 1.0 and lin[74] == pytest.approx(0.5) and lin[99] == pytest.approx(0.0)
