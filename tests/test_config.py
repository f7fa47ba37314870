"""Deployment configs: every shipped YAML parses; mistakes are reported by YAML key."""

from pathlib import Path

import pytest

from jaxpd.config import load_config, parse_config
from jaxpd.errors import ConfigError

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_parse(path):
    cfg = load_config(path)
    opts = cfg.engine_options()
    assert opts.prefill_tp == cfg.prefill.tp


def test_defaults_are_colocated_on_one_device():
    cfg = parse_config({})
    assert cfg.mode == "colocated" and cfg.prefill.devices == [0] and cfg.decode is None


@pytest.mark.parametrize("data, message", [
    ({"prefil": {"devices": [0]}}, "prefil: unknown key"),
    ({"kv": {"page_size": 12}}, "kv.page_size: must be a power of two, got 12"),
    ({"prefill": {"devices": [0, 1, 2], "tp": 2}}, "prefill: tp=2 must divide the number of devices (3)"),
    ({"prefill": {"devices": [0, 0]}}, "prefill.devices: device indices must be distinct"),
    ({"mode": "disaggregated"}, "mode 'disaggregated' needs a 'decode' mesh"),
    ({"mode": "disaggregated", "decode": {"devices": [0]}}, "share devices [0]"),
    ({"decode": {"devices": [1]}}, "'decode' is only used with mode: disaggregated"),
    ({"attention": "flash"}, "attention: Input should be 'auto', 'reference', 'cudnn' or 'pallas'"),
    ({"scheduler": {"max_decode_batch": 0}}, "scheduler.max_decode_batch: Input should be greater than or equal to 1"),
])
def test_errors_name_the_key(data, message):
    with pytest.raises(ConfigError) as e:
        parse_config(data, "deploy.yaml")
    assert "deploy.yaml: " in str(e.value) and message in str(e.value)


def test_yaml_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(bad)
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "missing.yaml")
