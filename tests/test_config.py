"""Deployment configs: every shipped YAML parses; mistakes are reported by YAML key."""

from pathlib import Path

import pytest

from jaxpd.config import load_config, parse_config
from jaxpd.errors import ConfigError

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_parse(path):
    cfg = load_config(path)
    assert len(cfg.prefill[0].replica_devices(0)) == cfg.prefill[0].tp
    if cfg.mode == "disaggregated":
        assert len(cfg.decode[0].replica_devices(0)) == cfg.decode[0].tp


def test_replicas_split_the_devices_in_order():
    mesh = parse_config({"prefill": {"devices": [4, 5, 6, 7, 0, 1], "tp": 2, "replicas": 3}}).prefill[0]
    assert [mesh.replica_devices(i) for i in range(3)] == [[4, 5], [6, 7], [0, 1]]
    assert mesh.address(1) is None
    assert parse_config({"prefill": {"devices": [0], "port": 7000}}).prefill[0].address(2) == "127.0.0.1:7002"


def test_kv_pages_default_to_2048():
    assert parse_config({}).kv.num_pages == 2048


def test_defaults_are_colocated_on_one_device():
    cfg = parse_config({})
    assert cfg.mode == "colocated" and cfg.prefill[0].devices == [0] and cfg.decode is None


@pytest.mark.parametrize("data, message", [
    ({"prefil": {"devices": [0]}}, "prefil: unknown key"),
    ({"kv": {"page_size": 12}}, "kv.page_size: must be a power of two, got 12"),
    ({"scheduler": {"decode_batch_sizes": [4, 2]}},
     "scheduler.decode_batch_sizes: must be positive sizes in ascending order, got [4, 2]"),
    ({"scheduler": {"prefill_chunk_sizes": [16, 64]}},
     "scheduler.prefill_chunk_sizes: the last must be chunk_size=256, got 64"),
    ({"scheduler": {"max_decode_batch": 48, "decode_batch_sizes": [8, 32]}},
     "scheduler.decode_batch_sizes: the last must be at least max_decode_batch=48, got 32"),
    ({"prefill": {"devices": [0, 1, 2], "tp": 2}}, "prefill: tp=2 must divide the number of devices (3)"),
    ({"prefill": {"devices": [0, 0]}}, "prefill.devices: device indices must be distinct"),
    ({"prefill": {"devices": [0, 1], "tp": 1}}, "prefill: 1 replica(s) of tp=1 need 1 devices, got 2"),
    ({"prefill": {"devices": [0, 1, 2, 3], "tp": 2, "replicas": 3}},
     "prefill: 3 replica(s) of tp=2 need 6 devices, got 4"),
    ({"mode": "disaggregated", "decode": {"devices": [1, 2], "tp": 1, "replicas": 1}},
     "decode: 1 replica(s) of tp=1 need 1 devices, got 2"),
    ({"serving": {"router": {"port": 70000}}}, "serving.router.port: Input should be less than or equal to 65535"),
    ({"serving": {"router": {"port": -1}}}, "serving.router.port: Input should be greater than or equal to 0"),
    ({"serving": {"routr": {"port": 1}}}, "serving.routr: unknown key"),
    ({"mode": "disaggregated"}, "mode 'disaggregated' needs a 'decode' mesh"),
    ({"mode": "disaggregated", "decode": {"devices": [0]}}, "decode.devices: prefill uses devices [0] too"),
    ({"decode": {"devices": [1]}}, "'decode' is only used with mode: disaggregated"),
    ({"attention": "flash"}, "attention: Input should be 'auto', 'reference', 'cudnn' or 'pallas'"),
    ({"scheduler": {"max_decode_batch": 0}}, "scheduler.max_decode_batch: Input should be greater than or equal to 1"),
    ({"scheduler": {"decode_steps_per_dispatch": 0}},
     "scheduler.decode_steps_per_dispatch: Input should be greater than or equal to 1"),
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


@pytest.mark.parametrize("group, message", [
    ({"devices": [0, 1], "tp": 8, "hosts": 2},
     "prefill.tp: 8 must be hosts (2) x devices per host (2, the local devices listed) = 4"),
    ({"devices": [0, 1, 2, 3], "tp": 4, "accelerator": "tpu-v5e", "topology": "4x4"},
     "prefill.topology: 4x4 is 16 chips but a replica has tp=4"),
    ({"devices": [0], "tp": 1, "accelerator": "h100-sxm", "topology": "1x1"},
     "prefill.topology: only TPU slices have one (accelerator is h100-sxm)"),
    ({"devices": [0], "tp": 1, "topology": "4by4"},
     "prefill.topology: '4by4' is not a slice shape like 4x4 or 2x2x2"),
    ({"devices": [0], "tp": 1, "accelerator": "h100"}, "prefill.accelerator: Input should be"),
])
def test_multi_host_keys_are_checked_and_errors_name_them(group, message):
    with pytest.raises(ConfigError) as e:
        parse_config({"prefill": group}, "deploy.yaml")
    assert str(e.value).startswith(f"deploy.yaml: {message}"), str(e.value)


def test_a_multi_host_group_lists_its_local_devices_for_every_host():
    cfg = parse_config({"mode": "disaggregated",
                        "prefill": {"devices": [0, 1, 2, 3], "tp": 16, "hosts": 4, "replicas": 2,
                                    "accelerator": "tpu-v5e", "topology": "4x4"},
                        "decode": {"devices": [0, 1, 2, 3], "tp": 4, "accelerator": "tpu-v6e",
                                   "topology": "2x2"}})
    assert cfg.prefill[0].replica_devices(1) == [0, 1, 2, 3] and cfg.prefill[0].devices_per_host == 4
    assert cfg.decode[0].replica_devices(0) == [0, 1, 2, 3] and cfg.decode[0].devices_per_host == 4


def test_an_in_process_engine_refuses_a_multi_host_group():
    from jaxpd.engine.builder import build_engine
    from jaxpd.model.checkpoint import load_config as model_config

    cfg = parse_config({"prefill": {"devices": [0, 1], "tp": 4, "hosts": 2}})
    with pytest.raises(ConfigError, match="prefill.hosts: 2: an in-process engine runs on one host"):
        build_engine(model_config(None), {}, cfg)


def test_the_tcp_data_plane_is_refused_beside_internal_tls():
    with pytest.raises(ConfigError, match="serving.transport: tcp carries KV unencrypted"):
        parse_config({"serving": {"transport": "tcp", "internal_tls": {
            "cert_file": "c.pem", "key_file": "k.pem", "ca_file": "ca.pem"}}})
    assert parse_config({"serving": {"transport": "tcp"}}).serving.transport == "tcp"
    with pytest.raises(ConfigError, match="serving.transport: auto carries KV unencrypted"):
        parse_config({"serving": {"transport": "auto", "internal_tls": {
            "cert_file": "c.pem", "key_file": "k.pem", "ca_file": "ca.pem"}}})


TWO_DECODE_GROUPS = {"mode": "disaggregated", "prefill": {"devices": [0, 1], "tp": 2},
                     "scheduler": {"max_decode_batch": 64},
                     "decode": [{"devices": [2], "tp": 1, "weight": 1.5},
                                {"devices": [3, 4, 5, 6], "tp": 2, "replicas": 2, "weight": 4,
                                 "num_pages": 999, "max_decode_batch": 32, "port": 7000}]}


def test_a_role_on_several_groups_numbers_its_replicas_across_them():
    cfg = parse_config(TWO_DECODE_GROUPS)
    assert cfg.replicas("decode") == 3 and cfg.replicas("prefill") == 1
    assert cfg.weights("decode") == [1.5, 4.0, 4.0]
    group, index, local = cfg.locate("decode", 2)
    assert (index, local, group.replica_devices(local)) == (1, 1, [5, 6])
    assert group.address(local) == "127.0.0.1:7001"
    assert [cfg.group_key("decode", i) for i in range(2)] == ["decode[0]", "decode[1]"]
    assert cfg.group_key("prefill", 0) == "prefill"
    # what a worker of the second group builds its engine from: its own pages and batch
    view = cfg.for_group("decode", 1)
    assert view.decode == (group,) and view.kv.num_pages == 999
    assert view.scheduler.max_decode_batch == 32
    assert cfg.for_group("decode", 0).kv.num_pages == cfg.kv.num_pages
    with pytest.raises(IndexError):
        cfg.locate("decode", 3)


@pytest.mark.parametrize("decode, message", [
    ([{"devices": [2]}, {"devices": [2, 3], "tp": 2}],
     "decode[1].devices: decode[0] uses devices [2] too"),
    ([{"devices": [2]}, {"devices": [3], "weight": 0}],
     "decode[1].weight: Input should be greater than 0"),
    ([{"devices": [2]}, {"devices": [3, 4], "tp": 3}],
     "decode[1]: tp=3 must divide the number of devices (2)"),
    ([], "decode: needs at least one group"),
])
def test_errors_in_a_list_of_groups_name_the_group(decode, message):
    with pytest.raises(ConfigError) as e:
        parse_config({"mode": "disaggregated", "prefill": {"devices": [0, 1], "tp": 2},
                      "decode": decode}, "deploy.yaml")
    assert f"deploy.yaml: {message}" in str(e.value), str(e.value)
