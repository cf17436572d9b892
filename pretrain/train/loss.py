"""The language model's output layer and cross-entropy in one pass, vocabulary sharded along `model`.

The logits are the largest tensors of a training step ([tokens, vocab] in float32), yet all the
loss needs from them is, per token, the log-normaliser and the label's logit. So they are never
built whole: the tokens are cut into chunks, and each chunk's logits live only while that chunk
is reduced.

- Vocabulary-parallel: each device multiplies by its slice of the output weight. The softmax
  normaliser is assembled from per-shard maxima and sums of exponentials, gathered over `model`
  in one collective per chunk together with the label's logit, which the one shard that owns it
  computes from its column of the weight: a [tokens, embed] gather, where picking it out of the
  logits would take another pass over [tokens, vocab] (no scatter follows in the backward pass:
  the gradients below are written by hand).
- Gradients in the forward pass: the objective is a weighted sum over tokens, so its gradient
  with respect to a chunk's logits, w * ((1 + 2 z log_z) softmax - one_hot), is known as soon as
  the chunk's normaliser is. The chunk's share of the hidden-state and weight gradients is
  computed right there, and the backward pass only scales them by the incoming cotangent. The
  three matmuls are those of an ordinary output layer: nothing is recomputed.
"""

import functools
import math

import jax
import jax.numpy as jnp

from models.layers import einsum
from pretrain.train.sharding import logical_spec


def _axes(entry) -> tuple:
    """The mesh axes of one PartitionSpec entry."""
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def chunk_size(tokens: int, target: int) -> int:
    """The largest divisor of `tokens` that is at most `target`."""
    return max(d for d in range(1, min(tokens, target) + 1) if tokens % d == 0)


def _chunk(dw, xs, *, w, start, vocab_axes: tuple, shards: int, z_loss: float, grads: bool):
    """One chunk of a device's tokens against its slice of the vocabulary: the three sums, and with
    `grads` the chunk's hidden-state gradient and its share of the weight's (added to `dw`)."""
    hc, yc, mc = xs
    logits = einsum("te,ev->tv", hc, w, dtype=hc.dtype, out=jnp.float32)
    peak = jnp.max(logits, axis=-1)  # only stabilises the exponentials
    exp = jnp.exp(logits - peak[:, None])
    total = jnp.sum(exp, axis=-1)
    local = yc - start  # the label's column in this shard's slice of the vocabulary, if it holds it
    column = jnp.take(w, jnp.clip(local, 0, w.shape[1] - 1), axis=1)
    label = jnp.where((local >= 0) & (local < w.shape[1]),
                      einsum("te,et->t", hc, column, dtype=hc.dtype, out=jnp.float32), 0.0)
    scale = 1 / total  # turns this shard's exponentials into softmax probabilities
    if vocab_axes:
        # One collective per chunk: every shard's (max, sum of exponentials, label logit),
        # each written to its own slot and summed (a gather whose result is the same everywhere).
        slots = jnp.arange(shards)[:, None, None] == jax.lax.axis_index(vocab_axes)
        stats = jax.lax.psum(jnp.where(slots, jnp.stack([peak, total, label])[None], 0.0), vocab_axes)
        peaks, totals, labels = jnp.moveaxis(stats, 1, 0)
        shard_peak, peak = peak, jnp.max(peaks, axis=0)
        total = jnp.sum(totals * jnp.exp(peaks - peak), axis=0)
        label = jnp.sum(labels, axis=0)
        scale = jnp.exp(shard_peak - peak) / total
    log_z = peak + jnp.log(total)
    ce, z = log_z - label, jnp.square(log_z)
    sums = jnp.stack([jnp.sum(mc * (ce + z_loss * z)), jnp.sum(mc * ce), jnp.sum(mc * z)])
    if not grads:
        return dw, sums
    owned = jax.lax.broadcasted_iota(jnp.int32, exp.shape, 1) == local[:, None]
    g = (mc * (1 + 2 * z_loss * log_z) * scale)[:, None] * exp - jnp.where(owned, mc[:, None], 0.0)
    dh = einsum("tv,ev->te", g, w, dtype=hc.dtype, out=jnp.float32)
    return dw + einsum("te,tv->ev", hc, g, dtype=hc.dtype, out=jnp.float32), (sums, dh)


def _local(h, w, y, m, *, grads: bool, vocab_axes: tuple, batch_axes: tuple, scatter_axes: tuple, shards: int,
           chunk_tokens: int, z_loss: float):
    """This device's sums (and gradients): its rows, its slice of the vocabulary, chunk by chunk."""
    b, length, e = h.shape
    n = b * length // chunk_size(b * length, chunk_tokens)
    start = jax.lax.axis_index(vocab_axes) * w.shape[1] if vocab_axes else 0
    chunk = functools.partial(_chunk, w=w, start=start, vocab_axes=vocab_axes, shards=shards, z_loss=z_loss,
                              grads=grads)
    xs = (h.reshape(n, -1, e), y.reshape(n, -1), m.reshape(n, -1).astype(jnp.float32))
    # The weight's gradient sums over this device's rows (its carry varies along their axes).
    dw = jax.lax.pcast(jnp.zeros_like(w, jnp.float32), batch_axes, to="varying") if grads else None
    dw, ys = jax.lax.scan(chunk, dw, xs)
    sums = jnp.sum(ys[0] if grads else ys, axis=0)
    if batch_axes:
        sums = jax.lax.psum(sums, batch_axes)
    if not grads:
        return sums
    dh = ys[1]
    # The hidden states were replicated over the vocabulary shards: their gradient sums over them.
    dh = jax.lax.psum(dh.reshape(h.shape), vocab_axes) if vocab_axes else dh.reshape(h.shape)
    # The weight was replicated over the rows: its gradient sums over them, reduce-scattered along
    # `embed` where the parameter is sharded so (FSDP); only the scattered shard is summed over the
    # other row axes (a multi-slice run's DCN). Summed over the chunks in float32, over the devices in
    # the compute dtype, as every other weight's gradient: half the bytes. The barrier keeps XLA:TPU's
    # while_loop_all_reduce_code_motion off the scattered result when microbatches accumulate it
    # (converted to float32): that pass stops the compile with a RET_CHECK (libtpu 0.0.42 and 0.0.52).
    dw = dw.astype(h.dtype)
    if scatter_axes:
        dw = jax.lax.optimization_barrier(jax.lax.psum_scatter(dw, scatter_axes, scatter_dimension=0, tiled=True))
    rest = tuple(a for a in batch_axes if a not in scatter_axes)
    return sums, dh, jax.lax.psum(dw, rest) if rest else dw


def output_cross_entropy(hidden, weight, targets, mask, *, z_loss: float, chunk_tokens: int, mesh, rules):
    """Sums over the tokens where `mask` is 1: (cross-entropy + z_loss * log_z**2, cross-entropy, log_z**2).

    hidden [B, L, E] in the compute dtype, sharded (batch, -, -); weight [E, V] (float32 parameter,
    or a view of one) sharded (-, vocab); targets and mask [B, L]. Only the first sum is
    differentiable (the other two are metrics); chunk_tokens bounds the tokens per chunk.
    """
    h_spec = logical_spec(("batch", "length", None), rules)
    w_spec = logical_spec((None, "vocab"), rules)
    t_spec = logical_spec(("batch", "length"), rules)
    # Collectives run over the axes that split something: XLA:CPU would still copy through the others.
    split = lambda entry: tuple(a for a in _axes(entry) if mesh.shape[a] > 1)  # noqa: E731
    vocab_axes, batch_axes = split(w_spec[1]), split(h_spec[0]) + split(h_spec[1])
    # The weight's gradient leaves sharded along `embed` over the row axes the parameter shards it on.
    scatter_axes = tuple(a for a in split(logical_spec(("embed",), rules)[0]) if a in batch_axes)
    if weight.shape[0] % math.prod(mesh.shape[a] for a in scatter_axes):
        scatter_axes = ()
    local = functools.partial(_local, vocab_axes=vocab_axes, batch_axes=batch_axes, scatter_axes=scatter_axes,
                              shards=math.prod(mesh.shape[a] for a in vocab_axes), chunk_tokens=chunk_tokens,
                              z_loss=z_loss)
    in_specs = (h_spec, w_spec, t_spec, t_spec)
    # check_vma off: vmapped over the slices (TrainStep._grads_by_slice), the rows vary over `replica`
    # and the chunks' constants do not, which JAX's check refuses to compare (its own suggested way out).
    forward = jax.shard_map(functools.partial(local, grads=False), mesh=mesh, in_specs=in_specs, out_specs=jax.P(),
                            check_vma=False)
    dw_spec = jax.P(scatter_axes or None, w_spec[1])
    with_grads = jax.shard_map(functools.partial(local, grads=True), mesh=mesh, in_specs=in_specs,
                               out_specs=(jax.P(), h_spec, dw_spec), check_vma=False)

    @jax.custom_vjp
    def sums(h, w, y, m):
        return forward(h, w.astype(h.dtype), y, m)

    def fwd(h, w, y, m):
        # Cast before the shard_map, so the weight is gathered over the rows in the compute dtype.
        s, dh, dw = with_grads(h, w.astype(h.dtype), y, m)
        return s, (dh, dw)

    def bwd(residuals, cotangent):
        dh, dw = residuals
        return (cotangent[0] * dh).astype(hidden.dtype), (cotangent[0] * dw).astype(weight.dtype), None, None

    sums.defvjp(fwd, bwd)
    objective, ce, z = sums(hidden, weight, targets, mask)
    return objective, jax.lax.stop_gradient(ce), jax.lax.stop_gradient(z)
