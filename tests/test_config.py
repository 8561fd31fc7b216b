from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from spae.config import ConfigError, flatten, from_dict, load_config, parse_overrides, replace, to_dict


@dataclass(frozen=True)
class Inner:
    width: int = 8
    rate: float = 1e-3
    sizes: tuple[int, ...] = (1, 2, 4)


@dataclass(frozen=True)
class Outer:
    name: str = "tiny"
    mode: Literal["saq", "rq"] = "saq"
    flag: bool = False
    limit: int | None = None
    inner: Inner = field(default_factory=Inner)


def test_overrides_parse_yaml_scalars_and_nest():
    assert parse_overrides(["a.b=1", "a.c=x", "d=[1, 2]", "e=true", "f=1e-4"]) == {
        "a": {"b": 1, "c": "x"},
        "d": [1, 2],
        "e": True,
        "f": "1e-4",  # YAML 1.1 reads this as a string; float fields accept it
    }


def test_load_config_applies_overrides_to_nested_dataclasses():
    cfg = load_config(Outer, None, ["inner.width=16", "inner.rate=1e-4", "inner.sizes=[1, 2]", "mode=rq"])
    assert cfg.inner == Inner(width=16, rate=1e-4, sizes=(1, 2))
    assert cfg.mode == "rq" and cfg.name == "tiny"
    assert isinstance(cfg.inner.sizes, tuple)


def test_unknown_key_names_the_key_and_the_allowed_ones():
    with pytest.raises(ConfigError, match=r"inner\.depth") as e:
        load_config(Outer, None, ["inner.depth=3"])
    assert "allowed: rate, sizes, width" in str(e.value)


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match=r"inner\.width: expected an integer, got 'wide'"):
        load_config(Outer, None, ["inner.width=wide"])
    with pytest.raises(ConfigError, match=r"flag: expected true/false"):
        load_config(Outer, None, ["flag=3"])
    with pytest.raises(ConfigError, match=r"mode: 'vq' is not one of 'saq', 'rq'"):
        load_config(Outer, None, ["mode=vq"])
    with pytest.raises(ConfigError, match=r"inner\.sizes\[1\]: expected an integer"):
        load_config(Outer, None, ["inner.sizes=[1, x]"])


def test_optional_accepts_null_and_value():
    assert load_config(Outer, None, ["limit=5"]).limit == 5
    assert load_config(Outer, None, ["limit=null"]).limit is None


def test_malformed_override_is_an_error():
    with pytest.raises(ConfigError, match="not of the form key.sub=value"):
        parse_overrides(["width"])
    with pytest.raises(ConfigError, match="empty key"):
        parse_overrides(["a..b=1"])


def test_yaml_file_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: mnist\ninner:\n  width: 32\n")
    cfg = load_config(Outer, path, ["inner.width=64"])
    assert cfg.name == "mnist" and cfg.inner.width == 64  # override beats the file


def test_yaml_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Outer, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("inner: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Outer, bad)
    top = tmp_path / "list.yaml"
    top.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(Outer, top)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("inner:\n  colour: red\n")
    with pytest.raises(ConfigError, match=r"inner\.colour"):
        load_config(Outer, unknown)


def test_round_trip_and_flatten():
    cfg = load_config(Outer, None, ["inner.width=3"])
    assert from_dict(Outer, to_dict(cfg)) == cfg
    flat = flatten(cfg)
    assert flat["inner.width"] == 3 and flat["inner.sizes"] == [1, 2, 4] and flat["mode"] == "saq"
    assert replace(cfg, inner={"rate": 0.5}).inner == Inner(width=3, rate=0.5)


@dataclass(frozen=True)
class _Optim:
    lr: float = 1e-4
    warmup: int = 1000


@dataclass(frozen=True)
class _Job:
    optim: _Optim = field(default_factory=lambda: _Optim(warmup=100))


def test_partial_section_keeps_the_parent_default_for_that_section():
    assert load_config(_Job, overrides=["optim.lr=1e-3"]).optim == _Optim(lr=1e-3, warmup=100)
    assert from_dict(_Job, {"optim": {"warmup": 5}}).optim == _Optim(lr=1e-4, warmup=5)


def test_the_train_jobs_loss_is_its_own_section():
    """The loss is a training setting: ``loss.*`` of the train job (the preset's defaults), not
    ``model.loss.*``; its semantic layers are checked against the model's pyramid where both are known."""
    from pipeline.steps.train import TrainJobConfig, preset_base
    from spae.losses import loss_preset

    base = preset_base("tiny")
    assert base["loss"] == to_dict(loss_preset("tiny")) and "loss" not in base["model"]
    cfg = load_config(TrainJobConfig, overrides=["loss.alpha=0", "loss.beta=0.5"], base=base)
    assert cfg.loss.alpha == 0 and cfg.loss.beta == 0.5 and cfg.loss.semantic_layers == 2
    with pytest.raises(ConfigError, match="unknown config key model.loss"):
        load_config(TrainJobConfig, overrides=["model.loss.alpha=0"], base=base)
    with pytest.raises(ConfigError, match="loss.semantic_layers=5 exceeds the pyramid's 4 layers"):
        load_config(TrainJobConfig, base={**base, "loss": to_dict(loss_preset("paper"))})
