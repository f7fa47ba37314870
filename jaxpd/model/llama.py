"""The Llama-family decoder (Llama 2/3, Mistral, Qwen2) as Flax modules.

Weights keep Hugging Face's layout and names (`[out, in]` matrices, `self_attn/q_proj/weight`),
so a checkpoint tensor maps onto a parameter with no transpose and a TP shard of a parameter is
one contiguous slice of a file.

The decoder layers run one of two ways (`ModelConfig.scan_layers`), each with the parameter
form it reads without copying:
  scanned   parameters stacked on a leading layer axis under `layers`
            (`layers/self_attn/q_proj/weight` is `[num_layers, out, in]`) and the layer body
            run under `jax.lax.scan`: traced and compiled once, so compile time does not grow
            with depth. Each iteration slices its layer's weights out of the stack, which XLA
            on CPU materialises (a copy of the weights per step).
  unrolled  one subtree per layer (`layers_<i>/self_attn/...`) and a Python loop: every layer
            is compiled, and a step reads each weight where it lies. The default: at batch 1
            on CPU it decodes 1.35x faster than the scanned stack (docs/benchmarks.md).
`stack_layers` / `unstack_layers` convert between the two on device, keeping shardings.

Attention and the KV cache are not part of the module: each layer hands its rotated q, k, v to
an `attend` callable, so prefill, decode, paged caches and Pallas kernels plug in without
touching the model. Under scan the layer index attend receives is traced, so caches are stacked
per layer too and attend indexes them dynamically.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxpd.model.config import ModelConfig
from jaxpd.model.quantize import quantize_params
from jaxpd.model.rope import apply_rope, inverse_frequencies

# attend(layer_index, q [b,t,h,d], k [b,t,kv,d], v [b,t,kv,d], cache) -> (out [b,t,h,d], cache).
# layer_index is an int when unrolled and a traced i32 scalar under scan; the returned cache must
# have the structure, shapes and dtypes of the one passed in (it is the scan carry).
AttendFn = Callable[[int | jax.Array, jax.Array, jax.Array, jax.Array, Any], tuple[jax.Array, Any]]

_INIT = nn.initializers.normal(stddev=0.02)
LAYERS = "layers"  # scanned form: the parameter subtree holding every decoder layer, stacked


def layer_name(index: int) -> str:
    """Unrolled form: the parameter subtree of decoder layer `index` (`layers_<index>`)."""
    return f"{LAYERS}_{index}"


def is_stacked(path: tuple[str, ...]) -> bool:
    """Whether the parameter at `path` is stacked over decoder layers (leading layer axis)."""
    return path[0] == LAYERS


def params_are_stacked(params: dict) -> bool:
    """Whether `params` hold their decoder layers in the scanned (stacked) form."""
    return LAYERS in params


def _layer_sharding(leaf: jax.Array):
    sharding = getattr(leaf, "sharding", None)
    if isinstance(sharding, NamedSharding):
        return NamedSharding(sharding.mesh, P(*sharding.spec[1:]))
    return None


def unstack_layers(params: dict, *, consume: bool = False) -> dict:
    """Stacked form -> one `layers_<i>` subtree per layer, each leaf in its stacked sharding less
    the layer axis. `consume=True` frees each stacked leaf once split (the caller owns
    `params`), so the peak is one stacked leaf above the weights, not twice the layers."""
    if not params_are_stacked(params):
        return params
    leaves, treedef = jax.tree.flatten(params[LAYERS])
    num_layers = leaves[0].shape[0]
    columns = []
    for leaf in leaves:
        sharding = _layer_sharding(leaf)
        split = jax.jit(lambda x: [x[i] for i in range(num_layers)],
                        out_shardings=None if sharding is None else [sharding] * num_layers)
        columns.append(split(leaf))
        if consume and isinstance(leaf, jax.Array):
            leaf.delete()
    rest = {k: v for k, v in params.items() if k != LAYERS}
    return rest | {layer_name(i): jax.tree.unflatten(treedef, [c[i] for c in columns])
                   for i in range(num_layers)}


def stack_layers(params: dict, *, consume: bool = False) -> dict:
    """`layers_<i>` subtrees -> one stacked `layers` subtree (layer axis replicated)."""
    if params_are_stacked(params) or layer_name(0) not in params:
        return params
    num_layers = sum(1 for k in params if k.startswith(LAYERS + "_"))
    layers = [params[layer_name(i)] for i in range(num_layers)]
    columns = [jax.tree.leaves(layer) for layer in layers]
    treedef = jax.tree.structure(layers[0])
    stacked = []
    for j, first in enumerate(columns[0]):
        sharding = getattr(first, "sharding", None)
        out = (NamedSharding(sharding.mesh, P(None, *sharding.spec))
               if isinstance(sharding, NamedSharding) else None)
        stacked.append(jax.jit(lambda xs: jnp.stack(xs), out_shardings=out)(
            [column[j] for column in columns]))
        if consume:
            for column in columns:
                if isinstance(column[j], jax.Array):
                    column[j].delete()
    rest = {k: v for k, v in params.items() if not k.startswith(LAYERS + "_")}
    return rest | {LAYERS: jax.tree.unflatten(treedef, stacked)}


def layers_for(params: dict, config: ModelConfig, *, consume: bool = False) -> dict:
    """`params` in the form `config.scan_layers` reads (converted on device if needed)."""
    convert = stack_layers if config.scan_layers else unstack_layers
    return convert(params, consume=consume)


def kv_head_repeat(config: ModelConfig, tp: int) -> int:
    """How many copies of each KV head a TP layout needs (>1 when there are fewer KV heads than
    TP ranks: each rank then holds one copy of the KV head its query heads use)."""
    return tp // config.num_kv_heads if config.num_kv_heads < tp else 1


class Linear(nn.Module):
    """y = x @ W.T + b with W stored `[out, in]` as in Hugging Face checkpoints. A weight stored
    in FP8 comes with `weight_scale` (one per output row, model/quantize.py): it is widened to
    the activations' dtype in the matmul and the output rows are scaled."""

    features: int
    use_bias: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        w = self.param("weight", _INIT, (self.features, x.shape[-1]), self.dtype)
        if self.has_variable("params", "weight_scale"):
            scale = self.get_variable("params", "weight_scale")
            y = jnp.einsum("...i,oi->...o", x, w.astype(x.dtype)) * scale.astype(x.dtype)
        else:
            y = jnp.einsum("...i,oi->...o", x, w)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,), self.dtype)
        return y


class RMSNorm(nn.Module):
    eps: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        w = self.param("weight", nn.initializers.ones, (x.shape[-1],), self.dtype)
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return w * xf.astype(self.dtype)


class _Sharded(nn.Module):
    """Mixin: pins activations to the mesh layout so GSPMD never guesses a worse one."""

    mesh: Mesh | None

    def constrain(self, x: jax.Array, *spec) -> jax.Array:
        if self.mesh is None:
            return x
        return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, P(*spec)))


class Attention(_Sharded):
    config: ModelConfig

    @nn.compact
    def __call__(self, x, positions, attend: AttendFn, cache, layer_index):
        cfg, dt = self.config, self.config.jnp_dtype
        b, t, _ = x.shape
        q = Linear(cfg.num_heads * cfg.head_dim, cfg.qkv_bias, dt, name="q_proj")(x)
        k = Linear(cfg.num_kv_heads * cfg.head_dim, cfg.qkv_bias, dt, name="k_proj")(x)
        v = Linear(cfg.num_kv_heads * cfg.head_dim, cfg.qkv_bias, dt, name="v_proj")(x)
        q = q.reshape(b, t, cfg.num_heads, cfg.head_dim)
        k = k.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        v = v.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        inv_freq = inverse_frequencies(cfg)
        q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        tp = 1 if self.mesh is None else self.mesh.shape["tp"]
        repeat = kv_head_repeat(cfg, tp)
        if repeat > 1:
            k, v = jnp.repeat(k, repeat, axis=2), jnp.repeat(v, repeat, axis=2)
        q = self.constrain(q, "dp", None, "tp", None)
        k = self.constrain(k, "dp", None, "tp", None)
        v = self.constrain(v, "dp", None, "tp", None)
        out, cache = attend(layer_index, q, k, v, cache)
        out = out.reshape(b, t, cfg.num_heads * cfg.head_dim)
        return Linear(cfg.hidden_size, cfg.o_bias, dt, name="o_proj")(out), cache


class MLP(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x):
        cfg, dt = self.config, self.config.jnp_dtype
        gate = Linear(cfg.intermediate_size, cfg.mlp_bias, dt, name="gate_proj")(x)
        up = Linear(cfg.intermediate_size, cfg.mlp_bias, dt, name="up_proj")(x)
        return Linear(cfg.hidden_size, cfg.mlp_bias, dt, name="down_proj")(nn.silu(gate) * up)


class DecoderLayer(_Sharded):
    config: ModelConfig

    @nn.compact
    def __call__(self, x, positions, attend: AttendFn, cache, layer_index):
        cfg, dt = self.config, self.config.jnp_dtype
        h = RMSNorm(cfg.rms_norm_eps, dt, name="input_layernorm")(x)
        h, cache = Attention(self.mesh, cfg, name="self_attn")(
            h, positions, attend, cache, layer_index)
        x = self.constrain(x + h, "dp", None, None)
        h = RMSNorm(cfg.rms_norm_eps, dt, name="post_attention_layernorm")(x)
        x = self.constrain(x + MLP(cfg, name="mlp")(h), "dp", None, None)
        return x, cache


def no_attention(layer_index, q, k, v, cache):
    """Stand-in attend for building parameters (attention has none): returns q unchanged."""
    del layer_index, k, v
    return q, cache


class LlamaModel(_Sharded):
    """Embedding, decoder layers, final norm and LM head.

    `__call__` returns hidden states (not logits) so callers pick which positions to project:
    a long prefill needs the vocabulary projection at one position, not all of them.
    """

    config: ModelConfig

    def setup(self):
        cfg = self.config
        self.embed_tokens = self.param(
            "embed_tokens", lambda key: {"weight": _INIT(
                key, (cfg.vocab_size, cfg.hidden_size), cfg.jnp_dtype)})
        if cfg.scan_layers:
            self.layers = self.param(LAYERS, self._init_layers)
        else:
            self.layers = [self.param(layer_name(i), self._init_layer)
                           for i in range(cfg.num_layers)]
        self.norm = RMSNorm(cfg.rms_norm_eps, cfg.jnp_dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = Linear(cfg.vocab_size, False, cfg.jnp_dtype)

    def __call__(self, tokens: jax.Array,  # i32[batch, seq]
                 positions: jax.Array,  # i32[batch, seq]
                 attend: AttendFn, cache: Any):
        x = jnp.take(self.embed_tokens["weight"], tokens, axis=0)
        x = self.constrain(x, "dp", None, None)
        layer = DecoderLayer(self.mesh, self.config, parent=None)

        def run(x, cache, params, index):
            return layer.apply({"params": params}, x, positions, attend, cache, index)

        if self.config.scan_layers:
            def body(carry, xs):
                return run(*carry, *xs), None

            indices = jnp.arange(self.config.num_layers, dtype=jnp.int32)
            (x, cache), _ = jax.lax.scan(body, (x, cache), (self.layers, indices))
        else:
            for i, params in enumerate(self.layers):
                x, cache = run(x, cache, params, i)
        return self.norm(x), cache

    def _init_layer(self, key: jax.Array):
        """One decoder layer's parameters."""
        cfg = self.config
        x = jnp.zeros((1, 1, cfg.hidden_size), cfg.jnp_dtype)
        positions = jnp.zeros((1, 1), jnp.int32)
        params = DecoderLayer(None, cfg, parent=None).init(
            key, x, positions, no_attention, None, 0)["params"]
        return quantize_params(params, cfg.weight_dtype)  # the stored form (FP8 weights)

    def _init_layers(self, key: jax.Array):
        """Every layer's parameters, stacked on a leading layer axis (the scanned form)."""
        return jax.vmap(self._init_layer)(jax.random.split(key, self.config.num_layers))

    def logits(self, hidden: jax.Array) -> jax.Array:
        """f32[..., vocab] for hidden states [..., hidden]."""
        if self.config.tie_word_embeddings:
            w = self.embed_tokens["weight"]
            return jnp.einsum("...d,vd->...v", hidden, w, preferred_element_type=jnp.float32)
        return self.lm_head(hidden).astype(jnp.float32)
