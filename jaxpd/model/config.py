"""Model hyper-parameters: one frozen, hashable description of a Llama-family decoder.

Hashable so it can be a static argument of jitted functions; frozen so a config shared by the
prefill and decode sides cannot drift after start-up.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Literal

import jax.numpy as jnp

from jaxpd.errors import ConfigError

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. `kind='llama3'` is Llama-3.1's smooth low/high-frequency rule."""

    kind: Literal["linear", "llama3"]
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape of a Llama-family decoder (Llama 2/3, Mistral, Qwen2)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    dtype: str = "float32"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # How the layers run, not what they are: True compiles one layer body under `lax.scan` over
    # stacked parameters (compile time independent of depth); False unrolls them over one
    # parameter subtree per layer (faster steps; see jaxpd/model/llama.py).
    scan_layers: bool = False
    # How the decoder layers' linear weights are stored: None = in `dtype`; "float8_e4m3fn" =
    # one byte each with a scale per output row (jaxpd/model/quantize.py), widened to `dtype`
    # in the matmul, so decode streams half of bf16's weight bytes.
    weight_dtype: str | None = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.weight_dtype not in (None, "float8_e4m3fn"):
            raise ConfigError(f"weight_dtype={self.weight_dtype!r}: expected float8_e4m3fn or "
                              f"None (weights in dtype)")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype={self.dtype!r} is not one of {sorted(DTYPES)}")

    @property
    def jnp_dtype(self):
        return DTYPES[self.dtype]

    @property
    def q_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    def num_params(self) -> int:
        """Parameter count, for cost models and benchmarks."""
        d, h, kv, hd = self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim
        attn = d * h * hd * 2 + d * kv * hd * 2
        attn += (h * hd + 2 * kv * hd) * self.qkv_bias + d * self.o_bias
        mlp = 3 * d * self.intermediate_size + (2 * self.intermediate_size + d) * self.mlp_bias
        per_layer = attn + mlp + 2 * d
        embed = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + embed + d

    def linear_params(self) -> int:
        """Weights of the decoder layers' linear maps (what `weight_dtype` stores), no biases."""
        d, h, kv, hd = self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim
        return self.num_layers * (d * h * hd * 2 + d * kv * hd * 2 + 3 * d * self.intermediate_size)

    def weight_bytes(self) -> float:
        """Bytes of every parameter as stored: `weight_dtype` for the layers' linear weights
        (plus a float32 scale per output row), `dtype` for the rest."""
        itemsize = jnp.dtype(self.jnp_dtype).itemsize
        if self.weight_dtype is None:
            return self.num_params() * itemsize
        d, h, kv, hd = self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim
        rows = self.num_layers * (h * hd + 2 * kv * hd + d + 2 * self.intermediate_size + d)
        linear = self.linear_params()
        return linear * 1 + rows * 4 + (self.num_params() - linear) * itemsize

    def kv_bytes_per_token(self) -> int:
        """K and V bytes one token occupies across all layers (before any TP replication)."""
        itemsize = jnp.dtype(self.jnp_dtype).itemsize
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * itemsize

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        data = dict(data)
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"unknown model config keys: {sorted(unknown)}")
        if data.get("rope_scaling") is not None:
            data["rope_scaling"] = RopeScaling(**data["rope_scaling"])
        data["eos_token_ids"] = tuple(data.get("eos_token_ids", ()))
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)
