"""Cross-entropy over a vocabulary sharded along the `model` axis.

Each device holds logits for its slice of the vocabulary. The softmax normaliser is
assembled from per-shard maxima and sums (pmax/psum over `model`), and the label's
logit from the one shard that owns it, so the full [batch, length, vocab] logits are
never gathered onto one device.

The logits are the largest tensors of the step, so the loss touches them as few times as
it can: the label's logit is picked with a compare/select against the shard's vocabulary
ids (a gather would turn into a full-size scatter in the backward pass), and the gradient,
softmax minus one-hot, is one elementwise pass recomputed from the logits rather than from
a saved float32 copy of their exponentials.
"""

import functools

import jax
import jax.numpy as jnp

from pretrain.sharding import logical_spec


def _owned(logits, labels, vocab_axis):
    """[B, L, V_shard] boolean: which of this shard's vocabulary ids is each token's label."""
    start = jax.lax.axis_index(vocab_axis) * logits.shape[-1] if vocab_axis else 0
    ids = start + jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    return ids == labels[..., None]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _local_cross_entropy(logits, labels, vocab_axis):
    return _forward(logits, labels, vocab_axis)[0]


def _forward(logits, labels, vocab_axis):
    x = logits.astype(jnp.float32)
    # The max only stabilises the exponentials.
    global_max = jnp.max(x, axis=-1)
    label_logit = jnp.sum(jnp.where(_owned(logits, labels, vocab_axis), x, 0.0), axis=-1)
    if vocab_axis:
        global_max = jax.lax.pmax(global_max, vocab_axis)
    sum_exp = jnp.sum(jnp.exp(x - global_max[..., None]), axis=-1)
    if vocab_axis:
        sum_exp, label_logit = jax.lax.psum((sum_exp, label_logit), vocab_axis)
    log_z = global_max + jnp.log(sum_exp)
    return (log_z - label_logit, log_z), (logits, labels, log_z)


def _backward(vocab_axis, residuals, cotangents):
    logits, labels, log_z = residuals
    d_loss, d_log_z = cotangents
    # d loss / d logits = softmax - one_hot(label); d log_z / d logits = softmax.
    softmax = jnp.exp(logits.astype(jnp.float32) - log_z[..., None])
    owned = _owned(logits, labels, vocab_axis)
    grad = softmax * (d_loss + d_log_z)[..., None] - jnp.where(owned, d_loss[..., None], 0.0)
    return grad.astype(logits.dtype), None


_local_cross_entropy.defvjp(_forward, _backward)


def cross_entropy(logits, labels, mesh, rules):
    """Per-token (loss, log_z) for logits [B, L, V] sharded (batch, -, vocab) and labels [B, L]."""
    logit_spec = logical_spec(("batch", "length", "vocab"), rules)
    token_spec = logical_spec(("batch", "length"), rules)
    vocab_axis = logit_spec[2]
    fn = jax.shard_map(
        lambda lg, lb: _local_cross_entropy(lg, lb, vocab_axis),
        mesh=mesh,
        in_specs=(logit_spec, token_spec),
        out_specs=(token_spec, token_spec),
    )
    return fn(logits, labels)
