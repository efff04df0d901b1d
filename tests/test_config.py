from pathlib import Path

import pytest
import yaml

from lmlab.config import (
    CONFIG_DIR,
    apply_overrides,
    diff_configs,
    from_dict,
    load_config,
    load_yaml,
    parse_override,
)
from lmlab.errors import LmlabError


def test_every_ready_config_validates():
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    assert "char-tiny" in names
    for name in names:
        assert load_config(name).to_dict()["data"]["block_size"] > 0


def test_unknown_key_names_key_and_valid_choices():
    with pytest.raises(LmlabError) as e:
        from_dict({"train": {"lerning_rate": 1e-3}})
    msg = str(e.value)
    assert "train.lerning_rate" in msg and "max_steps" in msg and "lr" in msg


def test_unknown_section_lists_sections():
    with pytest.raises(LmlabError, match="Valid keys: run, data, model, train, hooks"):
        from_dict({"trian": {}})


def test_wrong_type_is_named():
    with pytest.raises(LmlabError, match=r"train.batch_size = 'big'.*must be int"):
        from_dict({"train": {"batch_size": "big"}})
    with pytest.raises(LmlabError, match="must be int"):
        from_dict({"train": {"batch_size": True}})  # a bool is not a count


def test_choice_lists_choices():
    with pytest.raises(LmlabError) as e:
        from_dict({"train": {"optimizer": "adam"}})
    assert "'adamw'" in str(e.value) and "'lion'" in str(e.value)


def test_int_accepted_for_float_and_values_checked():
    assert from_dict({"train": {"lr": 1}}).train.lr == 1.0
    with pytest.raises(LmlabError, match="divisible"):
        from_dict({"model": {"d_model": 30, "n_head": 4}})
    with pytest.raises(LmlabError, match="positive"):
        from_dict({"train": {"max_steps": 0}})
    with pytest.raises(LmlabError, match="muon.*fsdp"):  # refused before any rank starts
        from_dict({"train": {"optimizer": "muon", "parallel": "fsdp"}})
    assert from_dict({"train": {"optimizer": "lion", "parallel": "fsdp"}}).train.parallel == "fsdp"


def test_overrides_parse_yaml_values():
    assert parse_override("train.lr=3e-4") == (["train", "lr"], 3e-4)
    assert parse_override("model.model_name=null") == (["model", "model_name"], None)
    raw = apply_overrides({"train": {"lr": 1.0}}, ["train.lr=0.5", "run.seed=3"])
    assert raw == {"train": {"lr": 0.5}, "run": {"seed": 3}}
    with pytest.raises(LmlabError, match="key=value"):
        parse_override("train.lr")


def test_hash_is_stable_and_base_hash_ignores_hooks():
    a = from_dict({})
    b = from_dict({"hooks": {"forward": [{"name": "scale", "at": "hook_embed", "factor": 0.5}]}})
    c = from_dict({"train": {"lr": 0.5}})
    assert a.hash() == from_dict({}).hash()
    assert a.hash() != b.hash() and a.base_hash() == b.base_hash()
    assert a.base_hash() != c.base_hash()


def test_diff_configs_lists_changed_leaves():
    lines = diff_configs(from_dict({}).to_dict(), from_dict({"train": {"lr": 0.5}}).to_dict())
    assert lines == ["train.lr: 0.001 -> 0.5"]


def test_missing_config_lists_ready_ones(tmp_path: Path):
    with pytest.raises(LmlabError, match="char-tiny"):
        load_config(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(LmlabError, match="not valid YAML"):
        load_config(str(bad))


def test_base_hash_ignores_bookkeeping_but_not_the_setup():
    a = from_dict({"run": {"name": "baseline"}})
    b = from_dict({"run": {"name": "experiment", "out_dir": "elsewhere"},
                   "train": {"eval_every": 7, "log_every": 3, "parallel": "fsdp"}})
    assert a.base_hash() == b.base_hash() and a.hash() != b.hash()
    assert a.base_hash() != from_dict({"train": {"lr": 0.5}}).base_hash()


def test_a_seed_is_a_replicate_not_a_setup():
    a, b = from_dict({"run": {"seed": 1}}), from_dict({"run": {"seed": 2}})
    assert a.base_hash() == b.base_hash() and a.hash() != b.hash()


def test_base_inherits_and_the_file_wins(tmp_path):
    (tmp_path / "mine.yaml").write_text(
        "base: char-tiny\nhooks: {update: [{name: clip_per_param, max_norm: 1.0}]}\n")
    (tmp_path / "child.yaml").write_text("base: mine.yaml\ntrain: {lr: 0.01}\n")
    tiny = load_config("char-tiny")
    mine = load_config(str(tmp_path / "mine.yaml"))
    assert mine.train.lr == tiny.train.lr == 2e-3 and mine.train.dtype == "auto"
    assert mine.hooks.update == [{"name": "clip_per_param", "max_norm": 1.0}]
    child = load_config(str(tmp_path / "child.yaml"))
    assert child.train.lr == 0.01 and child.train.max_steps == tiny.train.max_steps
    assert child.hooks.update == mine.hooks.update


def test_base_cycle_is_refused(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(LmlabError, match="cycle"):
        load_config(str(tmp_path / "a.yaml"))


def test_added_knobs_keep_old_hashes_and_old_checkpoints_resume():
    """Keys added for issue 13 are out of the hash at their defaults; absent reads as default."""
    cfg = from_dict({})
    assert (cfg.hash(), cfg.base_hash()) == ("5470deafca8af650", "af6f088090b1de51")  # as before
    saved = cfg.to_dict()
    for section, key in [("model", "norm"), ("model", "qk_norm"), ("train", "muon_lr"),
                         ("train", "time_budget_s"), ("train", "decay_fraction")]:
        del saved[section][key]  # a checkpoint written before the keys existed
    assert diff_configs(from_dict(saved).to_dict(), cfg.to_dict()) == []
    knob = from_dict({"model": {"norm": "rmsnorm"}})
    assert knob.hash() != cfg.hash()
    assert diff_configs(from_dict(saved).to_dict(), knob.to_dict()) == [
        "model.norm: 'layernorm' -> 'rmsnorm'"]


def test_model_knobs_are_refused_for_pretrained_models_and_bad_values_named():
    with pytest.raises(LmlabError, match="model.mlp shapes the from-scratch model only"):
        from_dict({"model": {"model_name": "smollm2-135m", "mlp": "relu2"}})
    with pytest.raises(LmlabError, match="train.time_budget_s = -1"):
        from_dict({"train": {"time_budget_s": -1}})
    with pytest.raises(LmlabError, match="train.decay_fraction"):
        from_dict({"train": {"decay_fraction": 1.5}})


def test_a_key_given_twice_is_refused_in_sections_hooks_and_overrides(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 0.1\n  lr: 0.2\n")
    with pytest.raises(LmlabError, match=r"key 'lr' is given twice \(lines 2 and 3\); YAML "
                                         "would silently keep only the last"):
        load_config(str(path))
    path.write_text("hooks:\n  forward:\n    - {name: scale, at: x, factor: 1, factor: 2}\n")
    with pytest.raises(LmlabError, match=f"{path} is not valid YAML: key 'factor' is given "
                                         "twice"):
        load_config(str(path))
    with pytest.raises(yaml.YAMLError, match="key 'a' is given twice"):
        parse_override("train.lr={a: 1, a: 2}")


def test_exponent_numbers_are_numbers_and_ready_configs_read_as_before(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text("train: {lr: 1e-4, min_lr: 3.0e-5, weight_decay: 1E-2}\n")
    cfg = load_config(str(path))
    assert (cfg.train.lr, cfg.train.min_lr, cfg.train.weight_decay) == (1e-4, 3e-5, 1e-2)
    assert cfg.hash() == from_dict({"train": {"lr": 1e-4, "min_lr": 3e-5,
                                              "weight_decay": 1e-2}}).hash()
    path.write_text("train: {lr: '1e-4'}\n")  # quoted: a string, as written
    with pytest.raises(LmlabError, match="train.lr = '1e-4' has the wrong type"):
        load_config(str(path))
    for ready in CONFIG_DIR.glob("*.yaml"):  # so every ready config keeps its hash
        assert load_yaml(ready.read_text()) == yaml.safe_load(ready.read_text()), ready


def _keys(cls: type, prefix: str = "") -> list[str]:
    """Every key of a config dataclass as a dotted path, nested sections' keys included."""
    import dataclasses
    import typing

    out = []
    for name, tp in typing.get_type_hints(cls).items():
        out += _keys(tp, f"{prefix}{name}.") if dataclasses.is_dataclass(tp) else [prefix + name]
    return out


def test_every_key_is_of_the_first_release_or_has_a_row_in_the_added_table():
    from lmlab.config import ADDED, FIRST_RELEASE, SCHEMA_VERSION, Config

    rows = {path for path, _, _ in ADDED}
    first = {f"{section}.{key}" for section, keys in FIRST_RELEASE.items() for key in keys}
    for path in _keys(Config):
        covered = path in first or any(path == r or path.startswith(r + ".") for r in rows)
        assert covered, (f"config key {path} is neither of the first release nor in "
                         "config.ADDED: add a row (path, its literal default, SCHEMA_VERSION + 1)"
                         " so that every existing hash holds")
    assert first.isdisjoint(rows) and first <= set(_keys(Config))
    assert SCHEMA_VERSION == max(version for *_, version in ADDED)
    cfg = Config().to_dict()
    for path, default, _ in ADDED:  # each row names a real key or section
        node = cfg
        for name in path.split("."):
            node = node[name]
        assert isinstance(node, dict) or node is None or default is None or \
            type(node) is type(default), path


def test_a_checkpoint_config_that_no_longer_validates_is_an_error_not_swallowed():
    from lmlab.hooks.manager import ExperimentHooks
    from lmlab.model.adapters.custom import CustomTransformerAdapter
    from lmlab.model.transformer import TransformerConfig
    from lmlab.train.state import Checkpoint, check_resume

    cfg = from_dict({})
    bad = cfg.to_dict()
    bad["model"]["n_head"] = 3  # 128 is not divisible by 3
    ckpt = Checkpoint.from_dict({"config": bad, "model": {}, "optimizer": {}, "step": 1,
                                 "rng": {}, "run_id": "r", "model_config": {}, "model_meta": {}})
    adapter = CustomTransformerAdapter(TransformerConfig(n_layer=1, d_model=16, n_head=2, d_ff=32))
    with pytest.raises(LmlabError, match="not valid in this lmlab.*divisible"):
        check_resume(ckpt, cfg, ExperimentHooks(cfg.hooks, adapter), None, 1, allow=True)
