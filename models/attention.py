"""Attention backends behind one signature.

    attend(q [B, L, H, D], k [B, S, K, D], v [B, S, K, D], segment_ids [B, L]) -> [B, L, H, D]

Causal, grouped-query (H a multiple of K), and tokens attend only within their own
segment, so packed documents never see each other. `xla` is plain einsums and runs
everywhere; `cudnn` is jax.nn.dot_product_attention's fused kernel for NVIDIA GPUs.
A TPU Pallas (splash) kernel plugs in as one more entry of BACKENDS.
"""

import jax
import jax.numpy as jnp

from models.layers import constrain


def segment_mask(segment_ids):
    """[B, 1, L, L] boolean: query and key in the same segment."""
    return (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]


def masked_attention(q, k, v, mask):
    """Plain-einsum attention; mask [B, 1, L, S] says which keys each query sees."""
    groups = q.shape[2] // k.shape[2]
    # Repeating K/V to all heads keeps every tensor sharded on `heads`, however few K/V heads there are.
    k = constrain(jnp.repeat(k, groups, axis=2), ("batch", "length", "heads", None))
    v = constrain(jnp.repeat(v, groups, axis=2), ("batch", "length", "heads", None))
    scores = jnp.einsum("blhd,bshd->bhls", q, k, preferred_element_type=jnp.float32)
    scores = jnp.where(mask, scores * q.shape[-1] ** -0.5, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bhls,bshd->blhd", probs, v)


def xla_attention(q, k, v, segment_ids):
    length = q.shape[1]
    causal = jnp.tril(jnp.ones((length, length), dtype=bool))
    return masked_attention(q, k, v, causal & segment_mask(segment_ids))


def cached_attention(q, k_cache, v_cache, positions):
    """Decoding: q [B, T, H, D] at `positions` [B, T] attends to the cache's slots up to its own
    position (slot i holds position i; later slots are empty or stale)."""
    visible = jnp.arange(k_cache.shape[1])[None, None, :] <= positions[:, :, None]
    return masked_attention(q, k_cache, v_cache, visible[:, None])


def fused_attention(implementation):
    def attend(q, k, v, segment_ids):
        return jax.nn.dot_product_attention(
            q, k, v, mask=segment_mask(segment_ids), is_causal=True, implementation=implementation
        )

    return attend


BACKENDS = {
    "xla": xla_attention,
    "cudnn": fused_attention("cudnn"),
}
