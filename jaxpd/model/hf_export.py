"""Write parameters as a Hugging Face checkpoint folder (config.json + model.safetensors).

Used for the embedded default model and for benchmark checkpoints that a peer (transformers)
must load too, so both sides read the very same weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
from safetensors.numpy import save_file

from jaxpd.model.config import ModelConfig
from jaxpd.model.hf_checkpoint import hf_name
from jaxpd.model.llama import is_stacked


def hf_config_dict(cfg: ModelConfig) -> dict:
    """config.json for a LlamaForCausalLM of this shape (published-checkpoint style)."""
    rope = None
    if cfg.rope_scaling is not None:
        rs = cfg.rope_scaling
        rope = {"rope_type": rs.kind, "factor": rs.factor}
        if rs.kind == "llama3":
            rope.update(low_freq_factor=rs.low_freq_factor, high_freq_factor=rs.high_freq_factor,
                        original_max_position_embeddings=rs.original_max_position_embeddings)
    if cfg.qkv_bias != cfg.o_bias:
        raise ValueError("a Llama config.json cannot express QKV bias without an o_proj bias")
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings, "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta, "rope_scaling": rope,
        "tie_word_embeddings": cfg.tie_word_embeddings, "attention_bias": cfg.qkv_bias,
        "mlp_bias": cfg.mlp_bias, "bos_token_id": cfg.bos_token_id,
        "eos_token_id": list(cfg.eos_token_ids) or None, "torch_dtype": cfg.dtype,
    }


def hf_tensors(params) -> dict[str, np.ndarray]:
    """Host arrays under HF names: stacked layer parameters split back into one per layer."""
    tensors = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        keys, host = tuple(k.key for k in path), np.asarray(leaf)
        if is_stacked(keys):
            tensors.update((hf_name(keys, i), host[i]) for i in range(host.shape[0]))
        else:
            tensors[hf_name(keys)] = host
    return tensors


def save_hf_checkpoint(folder: str | Path, params, config: ModelConfig) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = hf_tensors(params)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(hf_config_dict(config), indent=2) + "\n")
    return folder
