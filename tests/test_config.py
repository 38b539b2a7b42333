import json

import pytest

from fusion.config import Config, apply_overrides, config_to_yaml, load_config, parse_config
from fusion.errors import ConfigError


def test_defaults_are_valid_and_roundtrip_through_yaml(tmp_path):
    cfg = Config()
    assert cfg.encoder.model == "all-MiniLM-L6-v2"
    assert cfg.llms == []
    p = tmp_path / "c.yaml"
    p.write_text(config_to_yaml(cfg))
    assert load_config(p) == cfg


def test_json_file_loads(tmp_path):
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"labels": {"mode": "multilabel"}, "train": {"seed": 7}}))
    cfg = load_config(p)
    assert cfg.labels.mode == "multilabel" and cfg.train.seed == 7


def test_bad_enum_names_field_and_allowed_values():
    with pytest.raises(ConfigError) as e:
        parse_config({"labels": {"mode": "multi"}})
    msg = str(e.value)
    assert "labels.mode" in msg and "'multiclass'" in msg and "'multilabel'" in msg and "'multi'" in msg


def test_unknown_key_suggests_the_right_one():
    with pytest.raises(ConfigError) as e:
        parse_config({"train": {"lerning_rate": 0.1}})
    msg = str(e.value)
    assert "train.lerning_rate" in msg and "did you mean 'learning_rate'" in msg


def test_out_of_range_values_are_rejected():
    with pytest.raises(ConfigError, match=r"train\.learning_rate"):
        parse_config({"train": {"learning_rate": -1}})
    with pytest.raises(ConfigError, match=r"fusion\.hidden_dims"):
        parse_config({"fusion": {"hidden_dims": [0]}})
    with pytest.raises(ConfigError, match=r"encoder\.device.*cuda:N"):
        parse_config({"encoder": {"device": "gpu"}})


def test_duplicate_llm_names_and_classes_are_rejected():
    llm = {"name": "a", "provider": "openai", "model": "gpt"}
    with pytest.raises(ConfigError, match="unique"):
        parse_config({"llms": [llm, llm]})
    with pytest.raises(ConfigError, match="duplicate class"):
        parse_config({"labels": {"classes": ["x", "x"]}})


def test_label_column_and_label_columns_are_exclusive():
    with pytest.raises(ConfigError, match="either label_column or label_columns"):
        parse_config({"data": {"label_column": "y", "label_columns": ["a", "b"]}})
    assert parse_config({"data": {"label_columns": ["a", "b"]}}).data.label_column is None


def test_file_errors_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed")
    with pytest.raises(ConfigError, match="cannot parse"):
        load_config(bad)
    top = tmp_path / "list.yaml"
    top.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(top)


def test_overrides():
    cfg = apply_overrides(Config(), ["train.seed=7", "fusion.hidden_dims=[64, 32]", "labels.classes=null"])
    assert cfg.train.seed == 7 and cfg.fusion.hidden_dims == [64, 32]
    with pytest.raises(ConfigError, match=r"section\.field=value"):
        apply_overrides(Config(), ["train.seed"])
    with pytest.raises(ConfigError, match="did you mean 'seed'"):
        apply_overrides(Config(), ["train.sed=1"])
