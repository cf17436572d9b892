"""Attention backends behind one signature.

    attend(q [B, L, H, D], k [B, S, K, D], v [B, S, K, D], segment_ids [B, L]) -> [B, L, H, D]

Causal, grouped-query (H a multiple of K), and tokens attend only within their own
segment, so packed documents never see each other. `xla` is plain einsums and runs
everywhere; `cudnn` is jax.nn.dot_product_attention's fused kernel for NVIDIA GPUs;
`splash` is the Pallas TPU kernel, which never materialises the [B, H, L, L] scores (on
other platforms it runs in Pallas's interpret mode, which is how the tests check it).
"""

import functools

import jax
import jax.numpy as jnp
from flax.core import spmd
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import PartitionSpec

from models.layers import compile_platform, constrain, einsum


def segment_mask(segment_ids):
    """[B, 1, L, L] boolean: query and key in the same segment."""
    return (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]


def masked_attention(q, k, v, mask):
    """Plain-einsum attention; mask [B, 1, L, S] says which keys each query sees."""
    groups = q.shape[2] // k.shape[2]
    # Repeating K/V to all heads keeps every tensor sharded on `heads`, however few K/V heads there are.
    k = constrain(jnp.repeat(k, groups, axis=2), ("batch", "length", "heads", None))
    v = constrain(jnp.repeat(v, groups, axis=2), ("batch", "length", "heads", None))
    scores = einsum("blhd,bshd->bhls", q, k, dtype=q.dtype, out=jnp.float32)
    scores = jnp.where(mask, scores * q.shape[-1] ** -0.5, jnp.finfo(jnp.float32).min)
    return einsum("bhls,bshd->blhd", jax.nn.softmax(scores, axis=-1), v, dtype=v.dtype)


def query_blocks(length: int, block: int = 128, most: int = 16) -> list[tuple[int, int]]:
    """xla_attention's query blocks as (start, end): `block` tokens each (at 64 the smaller matmuls
    cost more than the skipped scores save), longer where there would be more than `most` of them,
    which bounds the program's size at a share of computed scores near its limit of one half."""
    block = max(block, -(-length // most))
    return [(s, min(s + block, length)) for s in range(0, length, block)]


def causal_share(length: int, **blocks) -> float:
    """The share of the [length, length] scores that xla_attention computes."""
    return sum((end - start) * end for start, end in query_blocks(length, **blocks)) / length**2


def xla_attention(q, k, v, segment_ids, **blocks):
    """Causal attention in query blocks, each against the keys up to its end: the scores wholly above
    the diagonal are never computed (a quarter of them at two blocks, nearly half at many)."""
    length = q.shape[1]
    mask = jnp.tril(jnp.ones((length, length), dtype=bool)) & segment_mask(segment_ids)
    return jnp.concatenate([masked_attention(q[:, s:e], k[:, :e], v[:, :e], mask[:, :, s:e, :e])
                            for s, e in query_blocks(length, **blocks)], axis=1)


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


def splash_blocks(length: int, block_q: int, block_kv: int) -> tuple[int, int]:
    """The kernel's query and key/value block sizes for a sequence: the configured ones, capped at it."""
    return min(block_q, length), min(block_kv, length)


def splash_attention(q, k, v, segment_ids=None, *, block_q: int = 512, block_kv: int = 512, causal: bool = True):
    """The splash kernel under shard_map: each device runs it on its own rows (`batch`) and heads
    (`heads`), the mesh axes named by the active logical rules. Without segment ids every query
    sees every key (before it, if causal)."""
    mesh = jax.sharding.get_abstract_mesh()
    on_tpu = compile_platform() == "tpu"
    heads, kv_heads = q.shape[2], k.shape[2]
    q = q * q.shape[-1] ** -0.5  # the kernel leaves scaling to its caller
    q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))  # [B, heads, L, D], the kernel's layout
    bq, bkv = splash_blocks(q.shape[2], block_q, block_kv)
    blocks = splash.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq, block_kv_dkv=bkv,
                               block_kv_dkv_compute=bkv, block_q_dq=bq, block_kv_dq=bkv)

    def attend(q, k, v, *segments):
        lengths = (q.shape[2], k.shape[2])
        mask = splash.MultiHeadMask([(splash.CausalMask if causal else splash.FullMask)(lengths)] * q.shape[1])
        kernel = splash.make_splash_mha(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1, interpret=not on_tpu)
        if not segments:
            return jax.vmap(kernel)(q, k, v)
        return jax.vmap(lambda q, k, v, s: kernel(q, k, v, splash.SegmentIds(s, s)))(q, k, v, *segments)

    segments = () if segment_ids is None else (segment_ids,)
    if mesh.empty:
        return jnp.swapaxes(attend(q, k, v, *segments), 1, 2)
    rules = spmd.get_logical_axis_rules()
    batch_axis, heads_axis, kv_axis = spmd.from_sharding_rules(("batch", "heads", "kv_heads"), rules)
    if heads_axis and heads % mesh.shape[heads_axis]:  # fewer heads than devices on their axis: each device all
        heads_axis = kv_axis = None
    if kv_axis != heads_axis and kv_heads != heads:
        # K/V heads are not split like the query heads (fewer of them than devices): give every
        # query head its own copy, so that each device holds the K/V of its own heads.
        k, v = (constrain(jnp.repeat(x, heads // kv_heads, axis=1), ("batch", "heads", None, None)) for x in (k, v))
        kv_axis = heads_axis
    q_spec, kv_spec = PartitionSpec(batch_axis, heads_axis), PartitionSpec(batch_axis, kv_axis)
    out = jax.shard_map(
        attend, in_specs=(q_spec, kv_spec, kv_spec) + (PartitionSpec(batch_axis),) * len(segments), out_specs=q_spec,
        check_vma=False,
    )(q, k, v, *segments)
    return jnp.swapaxes(out, 1, 2)


def unmasked_attention(q, k, v, backend: str = "xla"):
    """Attention where every query sees every key (a UNet's, over its pixels or the text): the splash
    kernel under backend `splash` where both lengths are multiples of its 128-token blocks, else
    XLA's."""
    if backend == "splash" and q.shape[1] % 128 == 0 and k.shape[1] % 128 == 0:
        return splash_attention(q, k, v, causal=False)
    return jax.nn.dot_product_attention(q, k, v)


def attention_fn(name: str, *, splash_block_q: int, splash_block_kv: int):
    """The backend `name` as attend(q, k, v, segment_ids), with splash's block sizes bound."""
    if name == "splash":
        return functools.partial(splash_attention, block_q=splash_block_q, block_kv=splash_block_kv)
    return BACKENDS[name]


BACKENDS = {
    "xla": xla_attention,
    "cudnn": fused_attention("cudnn"),
    "splash": splash_attention,
}
