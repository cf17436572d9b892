"""Cross-entropy over a vocabulary sharded along the `model` axis.

Each device holds logits for its slice of the vocabulary. The softmax normaliser is
assembled from per-shard maxima and sums (pmax/psum over `model`), and the label's
logit from the one shard that owns it, so the full [batch, length, vocab] logits are
never gathered onto one device.
"""

import jax
import jax.numpy as jnp

from pretrain.sharding import logical_spec


def _local_cross_entropy(logits, labels, vocab_axis):
    logits = logits.astype(jnp.float32)
    shard_size = logits.shape[-1]
    start = jax.lax.axis_index(vocab_axis) * shard_size if vocab_axis else 0
    # The max only stabilises the exponentials; its gradient would cancel, so stop it.
    local_max = jax.lax.stop_gradient(jnp.max(logits, axis=-1))
    global_max = jax.lax.pmax(local_max, vocab_axis) if vocab_axis else local_max
    sum_exp = jnp.sum(jnp.exp(logits - global_max[..., None]), axis=-1)
    local_label = labels - start
    owned = (local_label >= 0) & (local_label < shard_size)
    picked = jnp.take_along_axis(logits, jnp.clip(local_label, 0, shard_size - 1)[..., None], axis=-1)[..., 0]
    label_logit = jnp.where(owned, picked, 0.0)
    if vocab_axis:
        sum_exp = jax.lax.psum(sum_exp, vocab_axis)
        label_logit = jax.lax.psum(label_logit, vocab_axis)
    log_z = global_max + jnp.log(sum_exp)
    return log_z - label_logit, log_z


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
