"""Named model shapes: `tiny` for tests, `default` for the embedded model, and the shapes of
public checkpoints (random init) for benchmarks and the placer."""

from __future__ import annotations

from jaxpd.errors import ConfigError
from jaxpd.model.config import ModelConfig, RopeScaling

_LLAMA31_ROPE = RopeScaling(kind="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                            original_max_position_embeddings=8192)

PRESETS: dict[str, ModelConfig] = {
    # Small enough for interpret-mode kernels and 8-way TP on host CPU devices
    # (8 query heads, 2 KV heads: TP 4 and 8 exercise KV-head replication).
    "tiny": ModelConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=8,
        num_kv_heads=2, head_dim=8, rope_theta=10000.0, max_position_embeddings=2048,
        rope_scaling=RopeScaling(kind="llama3", factor=4.0, original_max_position_embeddings=256),
    ),
    # Shape of the embedded default checkpoint (trained by tools/train_tiny.py).
    "default": ModelConfig(
        vocab_size=4096, hidden_size=256, intermediate_size=640, num_layers=4, num_heads=8,
        num_kv_heads=4, head_dim=32, rope_theta=10000.0, max_position_embeddings=1024,
        tie_word_embeddings=True,
    ),
    # ~34M parameters: the CPU benchmark against Hugging Face transformers (tools/bench_vs_hf.py).
    "bench-30m": ModelConfig(
        vocab_size=8192, hidden_size=512, intermediate_size=1376, num_layers=8, num_heads=8,
        num_kv_heads=8, head_dim=64, rope_theta=10000.0, max_position_embeddings=2048,
    ),
    "llama3-8b": ModelConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
        num_kv_heads=8, head_dim=128, rope_theta=500000.0, rope_scaling=_LLAMA31_ROPE,
        max_position_embeddings=131072, dtype="bfloat16", bos_token_id=128000,
        eos_token_ids=(128001, 128008, 128009),
    ),
    "llama3-70b": ModelConfig(
        vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_layers=80, num_heads=64,
        num_kv_heads=8, head_dim=128, rope_theta=500000.0, rope_scaling=_LLAMA31_ROPE,
        max_position_embeddings=131072, dtype="bfloat16", bos_token_id=128000,
        eos_token_ids=(128001, 128008, 128009),
    ),
    "qwen2.5-7b": ModelConfig(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28, num_heads=28,
        num_kv_heads=4, head_dim=128, rms_norm_eps=1e-6, rope_theta=1000000.0, qkv_bias=True,
        max_position_embeddings=32768, dtype="bfloat16", eos_token_ids=(151645, 151643),
    ),
    "mistral-7b": ModelConfig(
        vocab_size=32768, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
        num_kv_heads=8, head_dim=128, rope_theta=1000000.0, max_position_embeddings=32768,
        dtype="bfloat16", bos_token_id=1, eos_token_ids=(2,),
    ),
}


def get_preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}") from None
