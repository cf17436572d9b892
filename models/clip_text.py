"""transformers' CLIPTextModel (the text encoder of Stable Diffusion 1.x and 2.x) in NNX, by the
names its files use (`text_model/encoder/layers/0/self_attn/q_proj`), so that a pipeline's
`text_encoder/` maps onto it name for name (pretrain/formats/diffusers.py).

A causal pre-norm transformer: token and learned position embeddings, layers of self-attention
and an MLP (quick GELU or GELU) each behind a LayerNorm, and a final LayerNorm. Its output at
every position is what a UNet's cross-attention reads; the pooled output is the one at the end of
the text.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from models.configs import CLIPTextConfig
from models.layers import param
from models.unet import Dense, LayerNorm

ACTIVATIONS = {"quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x), "gelu": lambda x: jax.nn.gelu(x, approximate=False)}


class Embedding(nnx.Module):
    def __init__(self, rows: int, channels: int, *, rngs: nnx.Rngs):
        self.embedding = param(rngs, nnx.initializers.normal(0.02), (rows, channels), ("vocab", "embed"))

    def __call__(self, ids):
        return jnp.take(self.embedding[...], ids, axis=0)


class SelfAttention(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, rngs: nnx.Rngs):
        c, self.heads = cfg.hidden_size, cfg.num_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (Dense(c, c, rngs=rngs) for _ in range(4))

    def __call__(self, x):
        b, t, c = x.shape
        q, k, v = (proj(x).reshape(b, t, self.heads, c // self.heads) for proj in (self.q_proj, self.k_proj, self.v_proj))
        return self.out_proj(jax.nn.dot_product_attention(q, k, v, is_causal=True).reshape(b, t, c))


class MLP(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, rngs: nnx.Rngs):
        self.act = ACTIVATIONS[cfg.activation]
        self.fc1 = Dense(cfg.hidden_size, cfg.intermediate_size, rngs=rngs)
        self.fc2 = Dense(cfg.intermediate_size, cfg.hidden_size, rngs=rngs)

    def __call__(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Layer(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, rngs: nnx.Rngs):
        self.layer_norm1, self.layer_norm2 = (LayerNorm(cfg.hidden_size, rngs=rngs, eps=cfg.eps) for _ in range(2))
        self.self_attn, self.mlp = SelfAttention(cfg, rngs=rngs), MLP(cfg, rngs=rngs)

    def __call__(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Embeddings(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, rngs: nnx.Rngs):
        self.token_embedding = Embedding(cfg.vocab_size, cfg.hidden_size, rngs=rngs)
        self.position_embedding = Embedding(cfg.max_positions, cfg.hidden_size, rngs=rngs)

    def __call__(self, ids):
        return self.token_embedding(ids) + self.position_embedding(jnp.arange(ids.shape[1]))[None]


class Encoder(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, rngs: nnx.Rngs):
        self.layers = nnx.List([Layer(cfg, rngs=rngs) for _ in range(cfg.num_layers)])


class TextTransformer(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, rngs: nnx.Rngs):
        self.embeddings, self.encoder = Embeddings(cfg, rngs=rngs), Encoder(cfg, rngs=rngs)
        self.final_layer_norm = LayerNorm(cfg.hidden_size, rngs=rngs, eps=cfg.eps)


class CLIPTextModel(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.text_model = TextTransformer(cfg, rngs=rngs)

    def __call__(self, ids):
        """[B, T] token ids -> ([B, T, hidden] states after the final LayerNorm, [B, hidden] the
        state at each prompt's end of text)."""
        m = self.text_model
        h = m.embeddings(ids).astype(jnp.float32)
        for layer in m.encoder.layers:
            h = layer(h)
        h = m.final_layer_norm(h)
        ends = jnp.argmax(ids if self.cfg.eos_token_id == 2 else ids == self.cfg.eos_token_id, axis=-1)
        return h, h[jnp.arange(ids.shape[0]), ends]
