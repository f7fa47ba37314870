"""HF `config.json` -> ModelConfig: both config styles, per-family defaults, and named refusals."""

import copy
import json
import re

import pytest

from conftest import HF_FIXTURES
from jaxpd.errors import ConfigError
from jaxpd.model.config import ModelConfig, RopeScaling
from jaxpd.model.hf_config import from_hf_dict, load_hf_config

LLAMA3_FIELDS = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 256}


def fixture_config(name: str) -> dict:
    return json.loads((HF_FIXTURES / name / "config.json").read_text())


def bare_llama() -> dict:
    """The llama fixture's config without any rope or dtype keys (each test adds its own style)."""
    raw = fixture_config("llama")
    for key in ("rope_theta", "rope_scaling", "rope_parameters", "dtype", "torch_dtype"):
        raw.pop(key, None)
    return raw


def legacy(rope: dict | None, theta: float, dtype: str, type_key: str) -> dict:
    raw = bare_llama()
    raw["rope_theta"] = theta
    if rope is not None:
        kind = rope.pop("kind")
        raw["rope_scaling"] = {type_key: kind, **rope}
    else:
        raw["rope_scaling"] = None
    raw["torch_dtype"] = dtype
    return raw


def transformers5(rope: dict | None, theta: float, dtype: str) -> dict:
    raw = bare_llama()
    params = {"rope_theta": theta, "rope_type": "default"}
    if rope is not None:
        params["rope_type"] = rope.pop("kind")
        params.update(rope)
    raw["rope_parameters"] = params
    raw["dtype"] = dtype
    return raw


@pytest.mark.parametrize("type_key", ["type", "rope_type"])
@pytest.mark.parametrize("rope, want", [
    ({"kind": "llama3", **LLAMA3_FIELDS}, RopeScaling(kind="llama3", **LLAMA3_FIELDS)),
    ({"kind": "linear", "factor": 2.0}, RopeScaling(kind="linear", factor=2.0)),
    (None, None),
], ids=["llama3", "linear", "default"])
def test_legacy_and_transformers5_styles_give_the_same_config(rope, want, type_key):
    old = from_hf_dict(legacy(copy.deepcopy(rope), 500000.0, "bfloat16", type_key))
    new = from_hf_dict(transformers5(copy.deepcopy(rope), 500000.0, "bfloat16"))
    assert old == new
    assert new.rope_scaling == want
    assert new.rope_theta == 500000.0 and isinstance(new.rope_theta, float)
    assert new.dtype == "bfloat16"


def test_default_rope_spelled_three_ways_agrees():
    absent = bare_llama()  # no rope keys at all: HF's default theta
    explicit = legacy(None, 10000.0, "float32", "type")
    typed_default = legacy({"kind": "default"}, 10000.0, "float32", "rope_type")
    configs = {from_hf_dict(r) for r in (absent, explicit, typed_default)}
    assert len(configs) == 1
    (config,) = configs
    assert config.rope_scaling is None and config.rope_theta == 10000.0


def test_rope_parameters_without_theta_falls_back_to_top_level_theta():
    raw = transformers5({"kind": "linear", "factor": 4.0}, 1.0, "float32")
    del raw["rope_parameters"]["rope_theta"]
    raw["rope_theta"] = 250000.0
    assert from_hf_dict(raw).rope_theta == 250000.0


def test_fixture_configs():
    llama = load_hf_config(HF_FIXTURES / "llama")  # legacy style
    assert llama == ModelConfig(
        vocab_size=320, hidden_size=64, intermediate_size=160, num_layers=2, num_heads=8,
        num_kv_heads=2, head_dim=8, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling=RopeScaling(kind="llama3", **LLAMA3_FIELDS), max_position_embeddings=1024,
        tie_word_embeddings=False, qkv_bias=False, o_bias=False, mlp_bias=False,
        sliding_window=None, dtype="float32", bos_token_id=1, eos_token_ids=(2,))
    qwen = load_hf_config(HF_FIXTURES / "qwen2")  # transformers-5 style
    assert (qwen.rope_theta, qwen.rope_scaling, qwen.tie_word_embeddings) == (1e6, None, True)
    assert (qwen.qkv_bias, qwen.o_bias, qwen.sliding_window) == (True, False, None)
    assert qwen.eos_token_ids == () and qwen.bos_token_id is None
    mistral = load_hf_config(HF_FIXTURES / "mistral")
    assert (mistral.head_dim, mistral.num_heads, mistral.hidden_size) == (32, 4, 64)


@pytest.mark.parametrize("head_dim", ["missing", None])
def test_head_dim_missing_or_null_is_hidden_over_heads(head_dim):
    raw = fixture_config("llama")  # hidden 64, 8 heads
    if head_dim == "missing":
        del raw["head_dim"]
    else:
        raw["head_dim"] = None
    assert from_hf_dict(raw).head_dim == 8


def test_explicit_head_dim_is_kept():
    raw = fixture_config("mistral")
    assert raw["hidden_size"] // raw["num_attention_heads"] == 16
    assert from_hf_dict(raw).head_dim == 32


def test_missing_num_key_value_heads_means_multi_head_attention():
    raw = fixture_config("llama")
    del raw["num_key_value_heads"]
    config = from_hf_dict(raw)
    assert config.num_kv_heads == config.num_heads == 8


def test_llama_attention_bias_means_qkv_and_o_bias():
    raw = fixture_config("llama")
    assert (from_hf_dict(raw).qkv_bias, from_hf_dict(raw).o_bias) == (False, False)
    raw["attention_bias"] = True
    config = from_hf_dict(raw)
    assert (config.qkv_bias, config.o_bias) == (True, True)


def test_qwen2_has_qkv_bias_only():
    raw = fixture_config("qwen2")
    assert "attention_bias" not in raw
    config = from_hf_dict(raw)
    assert (config.qkv_bias, config.o_bias, config.mlp_bias) == (True, False, False)


def test_sliding_window():
    mistral = fixture_config("mistral")
    mistral["sliding_window"] = 4096
    assert from_hf_dict(mistral).sliding_window == 4096
    llama = fixture_config("llama")
    llama["sliding_window"] = 4096  # Llama has no sliding window; HF ignores the key too
    assert from_hf_dict(llama).sliding_window is None
    qwen = fixture_config("qwen2")
    qwen["sliding_window"] = 4096  # inert while use_sliding_window is false
    assert from_hf_dict(qwen).sliding_window is None
    qwen["use_sliding_window"] = True
    with pytest.raises(ConfigError, match=r"^qwen-config: use_sliding_window=true"):
        from_hf_dict(qwen, "qwen-config")


@pytest.mark.parametrize("eos, want", [(2, (2,)), ([2, 7], (2, 7)), (None, ())])
def test_eos_token_id_int_list_or_null(eos, want):
    raw = fixture_config("llama")
    raw["eos_token_id"] = eos
    assert from_hf_dict(raw).eos_token_ids == want


@pytest.mark.parametrize("key, value, want", [
    ("torch_dtype", "torch.bfloat16", "bfloat16"), ("dtype", "torch.float16", "float16"),
    ("torch_dtype", "float32", "float32"), ("dtype", "bf16", "bfloat16"),
])
def test_dtype_spellings(key, value, want):
    raw = fixture_config("llama")
    raw.pop("dtype")
    raw[key] = value
    assert from_hf_dict(raw).dtype == want


def test_dtype_prefers_dtype_over_torch_dtype():
    raw = fixture_config("llama")
    raw.update(dtype="bfloat16", torch_dtype="float16")
    assert from_hf_dict(raw).dtype == "bfloat16"


def test_architecture_from_model_type_when_architectures_absent():
    raw = fixture_config("qwen2")
    del raw["architectures"]
    assert from_hf_dict(raw).qkv_bias  # recognised as qwen2 by model_type


def _set(key, value):
    def edit(raw):
        raw[key] = value
    return edit


def _del(key):
    def edit(raw):
        del raw[key]
    return edit


def _del_rope_field(field):
    def edit(raw):
        del raw["rope_scaling"][field]
    return edit


REFUSALS = {
    "architecture": (_set("architectures", ["GPT2LMHeadModel"]),
                     ["unsupported architecture", "GPT2LMHeadModel", "LlamaForCausalLM",
                      "MistralForCausalLM", "Qwen2ForCausalLM"]),
    "model_type": (lambda raw: (raw.pop("architectures"), raw.update(model_type="gpt2")),
                   ["unsupported architecture", "'gpt2'", "LlamaForCausalLM"]),
    "rope_yarn": (_set("rope_scaling", {"rope_type": "yarn", "factor": 4.0,
                                        "original_max_position_embeddings": 256}),
                  ["rope_scaling.rope_type='yarn'", "not supported", "llama3"]),
    "rope_dynamic_legacy_key": (_set("rope_scaling", {"type": "dynamic", "factor": 2.0}),
                                ["rope_scaling.type='dynamic'", "not supported"]),
    "rope_parameters_yarn": (
        lambda raw: (raw.pop("rope_scaling"),
                     raw.update(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0})),
        ["rope_parameters.rope_type='yarn'", "not supported"]),
    "llama3_missing_low_freq": (_del_rope_field("low_freq_factor"),
                                ["rope_scaling.low_freq_factor", "required", "'llama3'"]),
    "llama3_missing_original_max": (_del_rope_field("original_max_position_embeddings"),
                                    ["rope_scaling.original_max_position_embeddings", "'llama3'"]),
    "linear_missing_factor": (_set("rope_scaling", {"type": "linear"}),
                              ["rope_scaling.factor", "required", "'linear'"]),
    "rope_scaling_not_object": (_set("rope_scaling", "llama3"),
                                ["rope_scaling must be a JSON object"]),
    "rope_factor_not_number": (_set("rope_scaling", {"type": "linear", "factor": "big"}),
                               ["non-numeric", "rope_scaling"]),
    "quantization": (_set("quantization_config", {"quant_method": "gptq", "bits": 4}),
                     ["quantization_config", "not supported"]),
    "gelu": (_set("hidden_act", "gelu"), ["hidden_act='gelu'", "not supported"]),
    "missing_hidden_size": (_del("hidden_size"), ["missing required key 'hidden_size'"]),
    "null_vocab_size": (_set("vocab_size", None), ["missing required key 'vocab_size'"]),
    "string_layers": (_set("num_hidden_layers", "two"), ["num_hidden_layers must be an integer", "'two'"]),
    "zero_heads": (_set("num_attention_heads", 0), ["num_heads must be a positive integer"]),
    "kv_heads_not_dividing": (_set("num_key_value_heads", 3), ["num_kv_heads=3"]),
    "odd_head_dim": (_set("head_dim", 7), ["head_dim=7 must be even"]),
    "dtype": (_set("dtype", "int8"), ["dtype 'int8' is not supported"]),
    "null_max_position": (_set("max_position_embeddings", None), ["malformed value"]),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_refusals_name_the_file_and_the_key(case, tmp_path):
    edit, fragments = REFUSALS[case]
    raw = fixture_config("llama")
    edit(raw)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError) as info:
        load_hf_config(tmp_path)
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'config.json'}: "), message
    assert message.count(str(tmp_path)) == 1, message  # named once, not re-prefixed
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert "\n" not in message


@pytest.mark.parametrize("content, fragment", [
    (b'{"hidden_size": 64,', "not valid JSON"),
    (b"\xff\xfe\x00garbage", "not valid JSON (not UTF-8"),
    (b"[1, 2, 3]", "expected a JSON object"),
], ids=["truncated-json", "binary", "array"])
def test_unreadable_config_json(tmp_path, content, fragment):
    (tmp_path / "config.json").write_bytes(content)
    with pytest.raises(ConfigError, match="^" + re.escape(f"{tmp_path / 'config.json'}: ")) as info:
        load_hf_config(tmp_path)
    assert fragment in str(info.value)


def test_missing_config_json(tmp_path):
    with pytest.raises(ConfigError, match="^" + re.escape(f"{tmp_path / 'config.json'}: not found")):
        load_hf_config(tmp_path)


def test_where_defaults_to_config_json():
    raw = fixture_config("llama")
    raw["hidden_act"] = "relu"
    with pytest.raises(ConfigError, match=r"^config\.json: hidden_act='relu'"):
        from_hf_dict(raw)
