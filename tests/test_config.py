"""Config loading: YAML files, unknown keys, --set overrides with type conversion."""

from pathlib import Path

import pytest

from fastmask.config import ConfigError, TrainConfig, apply_overrides, from_dict, load_config, parse_override, to_dict

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("name", ["synthetic.yaml", "coco_r50_fpn_1x.yaml", "smoke.yaml"])
def test_shipped_configs_load(name):
    cfg = load_config(CONFIGS / name)
    assert isinstance(cfg, TrainConfig)
    assert from_dict(to_dict(cfg)) == cfg  # a saved config reads back unchanged


def test_coco_recipe_is_the_standard_1x():
    cfg = load_config(CONFIGS / "coco_r50_fpn_1x.yaml")
    assert cfg.model.backbone == "resnet50" and cfg.model.norm == "frozen_bn" and cfg.model.trainable_layers == 3
    assert (cfg.solver.max_iter, cfg.solver.base_lr, cfg.solver.steps) == (90000, 0.02, [60000, 80000])
    assert cfg.solver.schedule == "step" and cfg.solver.warmup_iters == 1000
    assert (cfg.model.fpn_channels, cfg.model.box_head_dim, cfg.model.mask_head_channels) == (256, 1024, [256] * 4)


def test_synthetic_is_the_default_and_light():
    cfg = load_config(CONFIGS / "synthetic.yaml")
    assert cfg.data.train.annotations is None and cfg.data.val.annotations is None
    assert cfg.model.backbone == "resnet18" and cfg.model.norm in ("gn", "bn")
    assert len(cfg.data.synthetic.classes) >= 3


def test_overrides_are_converted_to_the_field_type():
    cfg = apply_overrides(TrainConfig(), [
        "solver.max_iter=12", "solver.base_lr=1e-3", "solver.steps=[5, 10]", "data.aspect_ratio_grouping=false",
        "model.min_size=[96,128]", "model.backend=null", "solver.clip_grad_norm=5", "output_dir=runs/x",
        "model.options.box_score_thresh=0.25", "data.train.annotations=a.json", "data.train.images=imgs",
        "data.synthetic.classes=[circle,star,triangle]",
    ])
    assert cfg.solver.max_iter == 12 and isinstance(cfg.solver.max_iter, int)
    assert cfg.solver.base_lr == 1e-3 and isinstance(cfg.solver.base_lr, float)
    assert cfg.solver.steps == [5, 10]
    assert cfg.data.aspect_ratio_grouping is False
    assert cfg.model.min_size == [96, 128]
    assert cfg.model.backend is None
    assert cfg.solver.clip_grad_norm == 5.0 and isinstance(cfg.solver.clip_grad_norm, float)
    assert cfg.model.options == {"box_score_thresh": 0.25}
    assert cfg.data.train.annotations == "a.json" and cfg.data.train.images == "imgs"
    assert cfg.data.synthetic.classes == ["circle", "star", "triangle"]


def test_override_does_not_modify_its_input():
    base = TrainConfig()
    apply_overrides(base, ["solver.max_iter=3"])
    assert base.solver.max_iter == TrainConfig().solver.max_iter


@pytest.mark.parametrize("override, words", [
    ("solver.bse_lr=0.1", ["unknown config key", "solver.bse_lr"]),
    ("sovler.base_lr=0.1", ["unknown config key", "sovler"]),
    ("solver.max_iter=ten", ["solver.max_iter", "integer"]),
    ("solver.max_iter=0", ["solver.max_iter", "positive"]),
    ("model.norm=layernorm", ["model.norm", "layernorm"]),
    ("data.hflip_prob=2", ["data.hflip_prob"]),
    ("data.batch_size", ["key=value"]),
    ("solver.max_iter.x=3", ["solver.max_iter", "not a section"]),
    ("data.train.annotations=a.json", ["data.train.images", "together"]),
    ("data.synthetic.max_rotation=270", ["data.synthetic.max_rotation", "[0, 180]"]),
    ("model.head_norm=bn", ["model.head_norm", "'gn'"]),
])
def test_bad_overrides_name_the_key(override, words):
    with pytest.raises(ConfigError) as info:
        apply_overrides(TrainConfig(), [override])
    for w in words:
        assert w in str(info.value)


def test_unknown_key_in_yaml_is_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("solver:\n  max_iter: 10\n  momentun: 0.9\n")
    with pytest.raises(ConfigError, match=r"solver\.momentun") as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_bad_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("solver: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(listy)


def test_parse_override_values():
    assert parse_override("a.b=3") == ("a.b", 3)
    assert parse_override("a=0.5") == ("a", 0.5)
    assert parse_override("a=[1, 2]") == ("a", [1, 2])
    assert parse_override("a=null") == ("a", None)
    assert parse_override("a=x=y") == ("a", "x=y")
