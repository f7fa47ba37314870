"""Read a Hugging Face `config.json` (Llama, Mistral, Qwen2) into a ModelConfig.

Accepts both the style of published checkpoints (`rope_theta`, `rope_scaling`, `torch_dtype`)
and that of transformers 5 (`rope_parameters`, `dtype`). Anything the model would silently get
wrong (another architecture, an activation, a rope type, quantisation) is refused by name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jaxpd.errors import ConfigError
from jaxpd.model.config import ModelConfig, RopeScaling

SUPPORTED = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
             "Qwen2ForCausalLM": "qwen2"}
_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16",
           "fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _model_type(raw: dict, where: str) -> str:
    archs = raw.get("architectures") or []
    for arch in archs:
        if arch in SUPPORTED:
            return SUPPORTED[arch]
    if not archs and raw.get("model_type") in SUPPORTED.values():
        return raw["model_type"]
    found = archs or raw.get("model_type")
    raise ConfigError(f"{where}: unsupported architecture {found!r}; jaxpd supports "
                      f"{', '.join(SUPPORTED)}")


def _rope(raw: dict, where: str) -> tuple[float, RopeScaling | None]:
    params = raw.get("rope_parameters")
    if isinstance(params, dict) and params:
        key, scaling = "rope_parameters", params
        theta = params.get("rope_theta", raw.get("rope_theta"))
    else:
        key, scaling = "rope_scaling", raw.get("rope_scaling") or {}
        theta = raw.get("rope_theta")
    if not isinstance(scaling, dict):
        raise ConfigError(f"{where}: {key} must be a JSON object, got {scaling!r}")
    type_key = "rope_type" if "rope_type" in scaling else "type"
    kind = scaling.get(type_key, "default")
    try:
        theta = 10000.0 if theta is None else float(theta)
        if kind == "default":
            return theta, None
        if kind == "linear":
            return theta, RopeScaling(kind="linear", factor=float(scaling["factor"]))
        if kind == "llama3":
            return theta, RopeScaling(
                kind="llama3", factor=float(scaling["factor"]),
                low_freq_factor=float(scaling["low_freq_factor"]),
                high_freq_factor=float(scaling["high_freq_factor"]),
                original_max_position_embeddings=int(scaling["original_max_position_embeddings"]))
    except KeyError as e:
        raise ConfigError(f"{where}: {key}.{e.args[0]} is required for rope_type {kind!r}") from None
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: non-numeric rope setting in {key}={scaling!r} "
                          f"(rope_theta={theta!r})") from None
    raise ConfigError(f"{where}: {key}.{type_key}={kind!r} is not supported "
                      "(supported: default, linear, llama3)")


def _get(raw: dict, key: str, where: str, default: Any = ...) -> Any:
    value = raw.get(key)
    if value is None:  # absent or null
        if default is ...:
            raise ConfigError(f"{where}: missing required key {key!r}")
        return default
    return value


def _int(raw: dict, key: str, where: str) -> int:
    value = _get(raw, key, where)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise ConfigError(f"{where}: {key} must be an integer, got {value!r}")
    return int(value)


def _ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(int(v) for v in value) if isinstance(value, (list, tuple)) else (int(value),)


def from_hf_dict(raw: dict, where: str = "config.json") -> ModelConfig:
    """ModelConfig for a parsed HF config; `where` names the file in error messages."""
    model_type = _model_type(raw, where)
    if raw.get("quantization_config"):
        raise ConfigError(f"{where}: quantized checkpoints (quantization_config) are not supported")
    act = raw.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ConfigError(f"{where}: hidden_act={act!r} is not supported (Llama-family models use 'silu')")
    hidden = _int(raw, "hidden_size", where)
    heads = _int(raw, "num_attention_heads", where)
    head_dim = raw.get("head_dim") or (hidden // heads if heads > 0 else 0)
    vocab = _int(raw, "vocab_size", where)
    intermediate = _int(raw, "intermediate_size", where)
    layers = _int(raw, "num_hidden_layers", where)
    theta, scaling = _rope(raw, where)
    if model_type == "qwen2":
        if raw.get("use_sliding_window"):
            raise ConfigError(f"{where}: use_sliding_window=true (Qwen2 per-layer sliding windows) is not supported")
        qkv_bias, o_bias, sliding = True, False, None
    else:
        qkv_bias = o_bias = bool(raw.get("attention_bias", False))
        sliding = raw.get("sliding_window") if model_type == "mistral" else None
    dtype_name = str(raw.get("dtype") or raw.get("torch_dtype") or "float32")
    dtype_name = dtype_name.removeprefix("torch.")
    if dtype_name not in _DTYPES:
        raise ConfigError(f"{where}: dtype {dtype_name!r} is not supported (float32, bfloat16, float16)")
    try:
        return ModelConfig(
            vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
            num_layers=layers, num_heads=heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or heads), head_dim=int(head_dim),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)), rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=int(raw.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias, o_bias=o_bias, mlp_bias=bool(raw.get("mlp_bias", False)),
            sliding_window=int(sliding) if sliding else None, dtype=_DTYPES[dtype_name],
            bos_token_id=raw.get("bos_token_id"), eos_token_ids=_ids(raw.get("eos_token_id")),
        )
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    except (TypeError, ValueError) as e:  # a null or non-numeric optional field
        raise ConfigError(f"{where}: malformed value ({e})") from None


def load_hf_config(folder: str | Path) -> ModelConfig:
    path = Path(folder) / "config.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found (an HF checkpoint folder needs config.json)") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON (not UTF-8 text: {e.reason} at byte {e.start})") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return from_hf_dict(raw, str(path))
