"""Llama-style decoder: token embedding, RoPE, grouped-query attention, RMSNorm, SwiGLU.

Layers are created stacked (one leading `layers` axis per parameter) and applied with
lax.scan, or unrolled over the same stacked parameters, so checkpoints do not depend
on `scan_layers`. Each layer is rematerialised with the policy named by `remat`.
"""


import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from models.attention import attention_fn, cached_attention
from models.configs import RopeScaling, TransformerConfig
from models.layers import RMSNorm, constrain, einsum, fan_in_init, param, remat


# The residual stream [B, L, E] between the layers' matmuls (its positions or its width split over
# `model` as mesh.residual_split says: pretrain/train/sharding.py).
RESIDUAL = ("batch", "residual_length", "residual_embed")
WHOLE = ("batch", "length", None)  # a matmul's input: whole on every device of `model`


def rope_frequencies(head_dim: int, theta: float, s: RopeScaling) -> np.ndarray:
    """The [head_dim / 2] float32 angular frequencies of RoPE, scaled as `s` says (by the formulas of
    Hugging Face's rope_type, so that imported Llama 3.x checkpoints see positions as they were trained to)."""
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)
    if s.type == "linear":
        return freqs / s.factor
    if s.type == "llama3":
        context, wavelen = s.original_max_position_embeddings, 2 * np.pi / freqs
        smooth = (context / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
        blended = (1 - smooth) * freqs / s.factor + smooth * freqs
        freqs = np.where(wavelen > context / s.low_freq_factor, freqs / s.factor,
                         np.where(wavelen < context / s.high_freq_factor, freqs, blended))
    return freqs.astype(np.float32)


def rope(x, positions, freqs):
    """Rotary embedding over split halves of head_dim (the Hugging Face Llama convention)."""
    angles = positions[..., None].astype(jnp.float32) * freqs  # [B, L, half]
    sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        e, h, k, d, m = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
        self.cfg = cfg
        self.attn_norm = RMSNorm(e, eps=cfg.norm_eps, rngs=rngs)
        self.wq = param(rngs, fan_in_init(), (e, h, d), ("embed", "heads", "head_dim"))
        self.wk = param(rngs, fan_in_init(), (e, k, d), ("embed", "kv_heads", "head_dim"))
        self.wv = param(rngs, fan_in_init(), (e, k, d), ("embed", "kv_heads", "head_dim"))
        self.wo = param(rngs, fan_in_init((0, 1)), (h, d, e), ("heads", "head_dim", "embed"))
        self.mlp_norm = RMSNorm(e, eps=cfg.norm_eps, rngs=rngs)
        self.w_gate = param(rngs, fan_in_init(), (e, m), ("embed", "mlp"))
        self.w_up = param(rngs, fan_in_init(), (e, m), ("embed", "mlp"))
        self.w_down = param(rngs, fan_in_init(), (m, e), ("mlp", "embed"))

    def _qkv(self, x, positions):
        cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
        y = constrain(self.attn_norm(x), WHOLE)
        q = constrain(einsum("ble,ehd->blhd", y, self.wq[...], dtype=dtype), ("batch", "length", "heads", None))
        k = einsum("ble,ekd->blkd", y, self.wk[...], dtype=dtype)
        v = einsum("ble,ekd->blkd", y, self.wv[...], dtype=dtype)
        q, k, v = (checkpoint_name(t, "qkv") for t in (q, k, v))
        freqs = rope_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        return rope(q, positions, freqs), rope(k, positions, freqs), v

    def _finish(self, x, attn):
        """Output projection, residual, then the SwiGLU MLP block."""
        dtype = jnp.dtype(self.cfg.dtype)
        attn = constrain(attn, ("batch", "length", "heads", None))
        out = einsum("blhd,hde->ble", attn, self.wo[...], dtype=dtype)
        x = x + constrain(checkpoint_name(out, "out_proj"), RESIDUAL)
        y = constrain(self.mlp_norm(x), WHOLE)
        mlp = ("batch", "length", "mlp")
        gate = constrain(checkpoint_name(einsum("ble,em->blm", y, self.w_gate[...], dtype=dtype), "mlp_in"), mlp)
        up = constrain(checkpoint_name(einsum("ble,em->blm", y, self.w_up[...], dtype=dtype), "mlp_in"), mlp)
        down = einsum("blm,me->ble", jax.nn.silu(gate) * up, self.w_down[...], dtype=dtype)
        return x + constrain(checkpoint_name(down, "mlp_out"), RESIDUAL)

    def __call__(self, x, segment_ids, positions):
        c = self.cfg
        x = checkpoint_name(x, "layer_input")  # every later use reads the named copy, so it may leave the device
        q, k, v = self._qkv(x, positions)
        attend = attention_fn(c.attention, splash_block_q=c.splash_block_q, splash_block_kv=c.splash_block_kv)
        return self._finish(x, attend(q, k, v, segment_ids))

    def decode(self, x, positions, cache):
        """New tokens x [B, T, E] at `positions` (consecutive, the same in every row); their keys and
        values go into cache (k, v) [B, S, K, D] at those slots. Returns (x, cache)."""
        q, k, v = self._qkv(x, positions)
        start = (0, positions[0, 0], 0, 0)
        cache = tuple(jax.lax.dynamic_update_slice(c, new.astype(c.dtype), start) for c, new in zip(cache, (k, v)))
        return self._finish(x, cached_attention(q, *cache, positions)), cache


class Transformer(nnx.Module):
    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = param(rngs, nnx.initializers.normal(cfg.embed_dim**-0.5), (cfg.vocab_size, cfg.embed_dim), ("vocab", "embed"))

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_layers(rngs):
            return DecoderLayer(cfg, rngs=rngs)

        self.layers = make_layers(rngs)
        self.final_norm = RMSNorm(cfg.embed_dim, eps=cfg.norm_eps, rngs=rngs)
        if not cfg.tie_embeddings:
            self.lm_head = param(rngs, fan_in_init(), (cfg.embed_dim, cfg.vocab_size), ("embed", "vocab"))

    def __call__(self, tokens, segment_ids, positions):
        """Final hidden states [B, L, E]; `logits` maps them onto the vocabulary."""
        cfg = self.cfg
        # Each device looks up its own slice of `embed` for every token of its slice's batch (the ids
        # are gathered: a few MB), and an all-to-all gives it its rows whole, of which it keeps its share
        # of the residual split. The table is never gathered whole, nor its gradient built whole on every
        # device and all-reduced: the gradient comes back by the reverse all-to-all into each device's
        # slice. Looked up in the compute dtype, as the other weights enter their matmuls, so the
        # gradient's scatter-add runs in that dtype too. (Constrained straight to a width split, the
        # lookup's rows would be all-gathered across slices.)
        table = self.embed[...].astype(jnp.dtype(cfg.dtype))
        ids = constrain(tokens, ("slice_batch", None))
        x = constrain(jnp.take(table, ids, axis=0), ("slice_batch", None, "embed"))
        x = constrain(constrain(x, WHOLE), RESIDUAL)

        graphdef, stacked = nnx.split(self.layers)

        def block(x, layer_params):
            return nnx.merge(graphdef, layer_params)(x, segment_ids, positions), None

        block = remat(block, cfg.remat, in_scan=cfg.scan_layers, names=dataclasses.asdict(cfg.remat_custom))
        if cfg.scan_layers:
            x, _ = jax.lax.scan(block, x, stacked)
        else:
            for i in range(cfg.num_layers):
                x, _ = block(x, jax.tree.map(lambda p: p[i], stacked))
        return self.final_norm(x)

    def init_cache(self, batch: int, length: int):
        """Empty key/value cache for `length` positions: (k, v), each [layers, B, length, K, D]."""
        c = self.cfg
        shape = (c.num_layers, batch, length, c.num_kv_heads, c.head_dim)
        return jnp.zeros(shape, c.dtype), jnp.zeros(shape, c.dtype)

    def decode(self, tokens, positions, cache):
        """Final hidden states of new tokens [B, T] at `positions`, given the cache of the earlier
        ones; returns (hidden, cache with the new tokens' keys and values)."""
        x = jnp.take(self.embed[...], tokens, axis=0).astype(jnp.dtype(self.cfg.dtype))
        graphdef, stacked = nnx.split(self.layers)

        def block(x, layer):
            params, layer_cache = layer
            return nnx.merge(graphdef, params).decode(x, positions, layer_cache)

        x, cache = jax.lax.scan(block, x, (stacked, cache))
        return self.final_norm(x), cache

    def output_weight(self):
        """The [E, V] float32 matrix that maps hidden states onto the vocabulary (the embedding
        table, transposed, when tied), sharded along `vocab`."""
        return self.embed[...].T if self.cfg.tie_embeddings else self.lm_head[...]

    def logits(self, hidden):
        """[B, L, V] float32 logits, sharded along `vocab` (training never builds them: pretrain.loss)."""
        out = einsum("ble,ev->blv", hidden, self.output_weight(), dtype=self.cfg.dtype, out=jnp.float32)
        return constrain(out, ("batch", "length", "vocab"))
