"""Broken checkpoints fail with one actionable message naming the file (and tensor), in the
library and at the CLI; a good one loads byte-for-byte onto a TP mesh."""

import json
import os
import re
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from conftest import HF_FIXTURES
from jaxpd.errors import CheckpointError, ConfigError
from jaxpd.model.checkpoint import load_model
from jaxpd.model.sharding import make_mesh

INDEX = "model.safetensors.index.json"


def copy_fixture(tmp_path, name: str):
    dst = tmp_path / name
    shutil.copytree(HF_FIXTURES / name, dst)
    return dst


def drop_tensor(path, name: str) -> None:
    """Rewrite the safetensors file at `path` without tensor `name`."""
    tensors = load_file(path)
    assert name in tensors
    del tensors[name]
    save_file(tensors, path, metadata={"format": "pt"})


def load_error(folder, exc=CheckpointError) -> str:
    with pytest.raises(exc) as info:
        load_model(folder)
    message = str(info.value)
    assert "\n" not in message
    return message


# ---- missing pieces --------------------------------------------------------------------------

def test_missing_tensor_names_tensor_and_folder(tmp_path):
    folder = copy_fixture(tmp_path, "qwen2")
    drop_tensor(folder / "model.safetensors", "model.layers.1.mlp.up_proj.weight")
    message = load_error(folder)
    assert message.startswith(f"{folder}: ")
    assert "'model.layers.1.mlp.up_proj.weight' is missing" in message


def test_untied_model_without_lm_head(tmp_path):
    folder = copy_fixture(tmp_path, "mistral")
    drop_tensor(folder / "model.safetensors", "lm_head.weight")
    message = load_error(folder)
    assert message.startswith(f"{folder}: ") and "'lm_head.weight' is missing" in message
    assert "tie_word_embeddings=false" in message


def test_tied_model_needs_no_lm_head():
    # The qwen2 fixture is tied and stores no lm_head.weight: it must load without one.
    assert "lm_head.weight" not in load_file(HF_FIXTURES / "qwen2" / "model.safetensors")
    assert "lm_head" not in load_model(HF_FIXTURES / "qwen2").params


def test_index_pointing_at_deleted_shard(tmp_path):
    folder = copy_fixture(tmp_path, "llama")
    (folder / "model-00002-of-00003.safetensors").unlink()
    message = load_error(folder)
    assert message.startswith(f"{folder / 'model-00002-of-00003.safetensors'}: ")
    assert f"listed in {INDEX} but missing" in message and "also missing" not in message


def test_index_with_several_deleted_shards_names_them_all(tmp_path):
    folder = copy_fixture(tmp_path, "llama")
    (folder / "model-00001-of-00003.safetensors").unlink()
    (folder / "model-00003-of-00003.safetensors").unlink()
    message = load_error(folder)
    assert message.startswith(f"{folder / 'model-00001-of-00003.safetensors'}: ")
    assert "also missing: model-00003-of-00003.safetensors" in message


def test_stale_index_names_shard_and_tensor(tmp_path):
    folder = copy_fixture(tmp_path, "llama")
    index = json.loads((folder / INDEX).read_text())
    assert index["weight_map"]["model.norm.weight"] == "model-00003-of-00003.safetensors"
    index["weight_map"]["model.norm.weight"] = "model-00001-of-00003.safetensors"
    (folder / INDEX).write_text(json.dumps(index))
    message = load_error(folder)
    assert message.startswith(f"{folder / 'model-00001-of-00003.safetensors'}: ")
    assert "'model.norm.weight'" in message and INDEX in message


@pytest.mark.parametrize("content, fragment", [
    ("{not json", "not a valid safetensors index"),
    ('{"metadata": {}}', "no 'weight_map'"),
    ('{"weight_map": [["a", "b"]]}', "'weight_map' must map tensor names to file names"),
], ids=["json", "no-weight-map", "list"])
def test_broken_index(tmp_path, content, fragment):
    folder = copy_fixture(tmp_path, "llama")
    (folder / INDEX).write_text(content)
    message = load_error(folder)
    assert message.startswith(f"{folder / INDEX}: ") and fragment in message


# ---- mismatched or damaged files -------------------------------------------------------------

def test_shape_mismatch_names_file_tensor_and_both_shapes(tmp_path):
    folder = copy_fixture(tmp_path, "qwen2")
    config = json.loads((folder / "config.json").read_text())
    assert config["intermediate_size"] == 128
    config["intermediate_size"] = 96
    (folder / "config.json").write_text(json.dumps(config))
    message = load_error(folder)
    pattern = (re.escape(f"{folder / 'model.safetensors'}: tensor ") +
               r"'model\.layers\.0\.mlp\.(down|gate|up)_proj\.weight' has shape "
               r"\[(64, 128|128, 64)\], config\.json implies \[(64, 96|96, 64)\]$")
    assert re.match(pattern, message), message


def test_truncated_file(tmp_path):
    folder = copy_fixture(tmp_path, "qwen2")
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    message = load_error(folder)
    assert message.startswith(f"{path}: truncated safetensors file"), message
    assert re.search(r"tensor 'model\.[\w.]+' ends at data byte \d+", message)


def test_truncated_shard_of_an_indexed_checkpoint(tmp_path):
    folder = copy_fixture(tmp_path, "llama")
    path = folder / "model-00003-of-00003.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    assert load_error(folder).startswith(f"{path}: truncated safetensors file")


def _header(entries: dict) -> bytes:
    raw = json.dumps(entries).encode()
    return struct.pack("<Q", len(raw)) + raw


CORRUPT = {
    "random-bytes": (np.random.default_rng(0).bytes(4096), "exceeds the file's 4096 bytes"),
    "header-longer-than-file": (struct.pack("<Q", 10_000) + b"{}", "header length 10000 exceeds"),
    "shorter-than-8-bytes": (b"\x01\x02\x03", "shorter than its 8-byte header length"),
    "header-not-json": (struct.pack("<Q", 12) + b"not json!!!!" + bytes(64), "header is not JSON"),
    "header-not-utf8": (struct.pack("<Q", 4) + b"\xff\xfe\xfd\xfc", "header is not JSON"),
    "header-not-object": (_header([1, 2]), "header is not a JSON object"),
    "entry-missing-field": (_header({"model.norm.weight": {"dtype": "F32", "shape": [64]}}),
                            "tensor 'model.norm.weight' has no 'data_offsets' field"),
    "entry-malformed": (_header({"model.norm.weight": {"dtype": "F32", "shape": "sixty-four",
                                                       "data_offsets": [0, 256]}}),
                        "tensor 'model.norm.weight' has a malformed header entry"),
    "offsets-disagree-with-shape": (
        _header({"model.norm.weight": {"dtype": "F32", "shape": [64], "data_offsets": [0, 100]}})
        + bytes(100), "spans 100 bytes but its shape [64] in F32 needs 256"),
}


@pytest.mark.parametrize("case", CORRUPT)
def test_corrupt_file_names_the_file(tmp_path, case):
    content, fragment = CORRUPT[case]
    folder = copy_fixture(tmp_path, "qwen2")
    path = folder / "model.safetensors"
    path.write_bytes(content)
    message = load_error(folder)
    assert message.startswith(f"{path}: corrupt safetensors file ("), message
    assert fragment in message, message


def test_unsupported_tensor_dtype(tmp_path):
    folder = copy_fixture(tmp_path, "qwen2")
    path = folder / "model.safetensors"
    path.write_bytes(_header({"model.norm.weight": {"dtype": "F4", "shape": [64],
                                                    "data_offsets": [0, 32]}}) + bytes(32))
    message = load_error(folder)
    assert message.startswith(f"{path}: tensor 'model.norm.weight' has dtype 'F4'")
    assert "BF16" in message  # lists what it can read


# ---- not a (supported) checkpoint ------------------------------------------------------------

def test_unsupported_architecture_is_a_config_error(tmp_path):
    folder = copy_fixture(tmp_path, "llama")
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (folder / "config.json").write_text(json.dumps(config))
    message = load_error(folder, ConfigError)
    assert message.startswith(f"{folder / 'config.json'}: unsupported architecture ['GPT2LMHeadModel']")


def test_invalid_config_json_is_a_config_error(tmp_path):
    folder = copy_fixture(tmp_path, "qwen2")
    (folder / "config.json").write_bytes(b"\x00\xff binary")
    assert load_error(folder, ConfigError).startswith(f"{folder / 'config.json'}: not valid JSON")


def test_folder_that_does_not_exist(tmp_path):
    assert load_error(tmp_path / "nope") == f"{tmp_path / 'nope'}: no such checkpoint folder"


def test_empty_folder(tmp_path):
    message = load_error(tmp_path)
    assert message.startswith(f"{tmp_path}: not a checkpoint (expected config.json with *.safetensors")


def test_weights_without_config(tmp_path):
    folder = copy_fixture(tmp_path, "qwen2")
    (folder / "config.json").unlink()
    assert load_error(folder) == f"{folder}: has *.safetensors but no config.json"


def test_config_without_weights(tmp_path):
    folder = copy_fixture(tmp_path, "qwen2")
    (folder / "model.safetensors").unlink()
    assert load_error(folder) == f"{folder}: has config.json but no *.safetensors weights"


def test_a_file_instead_of_a_folder(tmp_path):
    folder = copy_fixture(tmp_path, "qwen2")
    message = load_error(folder / "model.safetensors")
    assert message.startswith(f"{folder / 'model.safetensors'}: is a file")


# ---- a good checkpoint: accepted variants and exact bytes ------------------------------------

def test_checkpoint_saved_without_model_prefix_loads(tmp_path):
    folder = copy_fixture(tmp_path, "qwen2")
    path = folder / "model.safetensors"
    tensors = load_file(path)
    save_file({k.removeprefix("model."): v for k, v in tensors.items()}, path)
    params = load_model(folder).params
    np.testing.assert_array_equal(np.asarray(params["norm"]["weight"]), tensors["model.norm.weight"])


@pytest.mark.parametrize("scan_layers", [False, True])
def test_tp2_shards_are_byte_identical_to_the_safetensors(devices, scan_layers):
    folder = HF_FIXTURES / "llama"
    on_disk = {}
    for shard in sorted(folder.glob("model-*.safetensors")):
        on_disk.update(load_file(shard))
    model = load_model(folder, make_mesh(devices[:2], 2), scan_layers=scan_layers)
    assert model.config.dtype == "float32"

    def layer_path(i, *rest):  # (param path, its layer within a stacked parameter)
        return (("layers",) + rest, i) if scan_layers else ((f"layers_{i}",) + rest, None)

    checked = {
        # (param path, layer of a stacked parameter, HF name, axis split across the 2 TP ranks
        # or None if replicated)
        (*layer_path(1, "self_attn", "q_proj", "weight"), "model.layers.1.self_attn.q_proj.weight", 0),
        (*layer_path(0, "self_attn", "k_proj", "weight"), "model.layers.0.self_attn.k_proj.weight", 0),
        (*layer_path(0, "self_attn", "o_proj", "weight"), "model.layers.0.self_attn.o_proj.weight", 1),
        (*layer_path(1, "mlp", "down_proj", "weight"), "model.layers.1.mlp.down_proj.weight", 1),
        (("embed_tokens", "weight"), None, "model.embed_tokens.weight", 0),
        (("lm_head", "weight"), None, "lm_head.weight", 0),
        (("norm", "weight"), None, "model.norm.weight", None),
    }
    for path, layer, name, axis in sorted(checked, key=str):
        arr = model.params
        for key in path:
            arr = arr[key]
        want = on_disk[name]
        shape = arr.shape if layer is None else arr.shape[1:]
        assert shape == want.shape and arr.dtype == want.dtype, name
        shards = sorted(arr.addressable_shards, key=lambda s: s.device.id)
        assert [s.device for s in shards] == list(devices[:2])
        for rank, shard in enumerate(shards):
            got = np.asarray(shard.data if layer is None else shard.data[layer])
            if axis is None:
                expect = want
            else:
                size = want.shape[axis] // 2
                expect = np.take(want, np.arange(rank * size, (rank + 1) * size), axis=axis)
            assert got.shape == expect.shape, (name, rank, got.shape)
            assert got.tobytes() == np.ascontiguousarray(expect).tobytes(), (name, rank)


# ---- the CLI: one line, exit 2, no traceback -------------------------------------------------

def _broken_truncated(tmp_path):
    folder = copy_fixture(tmp_path, "qwen2")
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    return folder, [str(path), "truncated"]


def _broken_missing_tensor(tmp_path):
    folder = copy_fixture(tmp_path, "qwen2")
    drop_tensor(folder / "model.safetensors", "model.layers.1.mlp.up_proj.weight")
    return folder, [str(folder), "'model.layers.1.mlp.up_proj.weight'"]


def test_cli_reports_broken_checkpoints_in_one_line(tmp_path):
    cases = [_broken_truncated(tmp_path / "a"), _broken_missing_tensor(tmp_path / "b")]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen(  # both at once: most of each run is importing jax
        [sys.executable, "-m", "jaxpd.cli", "generate", "--checkpoint", str(folder),
         "--prompt-ids", "1,2", "--max-tokens", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for folder, _ in cases]
    for proc, (folder, fragments) in zip(procs, cases):
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 2, (proc.returncode, stderr)
        assert "Traceback" not in stderr and stdout == ""
        lines = stderr.splitlines()
        assert len(lines) == 1 and stderr.endswith("\n"), stderr
        assert lines[0].startswith("error: "), stderr
        for fragment in fragments:
            assert fragment in lines[0], (fragment, stderr)
