"""Autoregressive sampling from the Transformer with a key/value cache.

The prompt fills the cache in one pass; each new token then costs one single-position pass.
The whole loop is one jitted lax.scan, so sampling N tokens compiles once.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from models.transformer import Transformer


@nnx.jit(static_argnames=("max_new_tokens", "num_valid"))
def generate(model: Transformer, prompt, key, temperature, *, max_new_tokens: int, num_valid: int):
    """Ids [B, max_new_tokens] that follow `prompt` [B, P]: greedy where temperature is 0, else sampled
    from softmax(logits / temperature). Ids >= num_valid (rows that only pad the vocabulary) are never
    chosen. The caller cuts the result at the first end-of-sequence id."""
    batch, length = prompt.shape
    cache = model.init_cache(batch, length + max_new_tokens)
    hidden, cache = model.decode(prompt, jnp.broadcast_to(jnp.arange(length), (batch, length)), cache)

    def pick(hidden, key):
        logits = model.logits(hidden[:, -1:])[:, 0]
        logits = jnp.where(jnp.arange(logits.shape[-1]) < num_valid, logits, -jnp.inf)
        sampled = jax.random.categorical(key, logits / jnp.maximum(temperature, 1e-6))
        return jnp.where(temperature > 0, sampled, jnp.argmax(logits, axis=-1)).astype(jnp.int32)

    def step(carry, key):
        token, position, cache = carry
        hidden, cache = model.decode(token[:, None], jnp.full((batch, 1), position), cache)
        token = pick(hidden, key)
        return (token, position + 1, cache), token

    keys = jax.random.split(key, max_new_tokens)
    first = pick(hidden, keys[0])
    _, rest = jax.lax.scan(step, (first, length, cache), keys[1:])
    return jnp.concatenate([first[:, None], rest.T], axis=1)
