"""Diffusion UNet (DDPM / ADM style): sinusoidal time embedding, residual blocks with GroupNorm,
SiLU and time (plus optional class) conditioning, self-attention at chosen resolutions, and a
down/up path joined by skip connections.

Images are NHWC. Every parameter carries logical axis names (`conv_in`, `conv_out`,
`channels`), so the trainer's one rules table shards it; each block is rematerialised with
the same policy names as the transformer. Class conditioning reserves label `num_classes`
as "no label", which classifier-free guidance uses.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from models.configs import UNetConfig
from models.layers import constrain, einsum, fan_in_init, param, remat


def timestep_embedding(t, dim: int):
    """[B] timesteps -> [B, dim] sinusoids at geometrically spaced frequencies (as in DDPM)."""
    half = dim // 2
    freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / half)
    angles = t.astype(jnp.float32)[:, None] * freqs[None]
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


class Dense(nnx.Module):
    def __init__(self, cin: int, cout: int, *, rngs: nnx.Rngs, zero: bool = False):
        init = nnx.initializers.zeros if zero else fan_in_init()
        self.kernel = param(rngs, init, (cin, cout), ("conv_in", "conv_out"))
        self.bias = param(rngs, nnx.initializers.zeros, (cout,), ("conv_out",))

    def __call__(self, x):
        return einsum("...i,io->...o", x, self.kernel[...], dtype=x.dtype) + self.bias[...].astype(x.dtype)


class Conv(nnx.Module):
    def __init__(self, cin: int, cout: int, *, rngs: nnx.Rngs, kernel: int = 3, stride: int = 1, zero: bool = False,
                 names=("conv_in", "conv_out")):
        init = nnx.initializers.zeros if zero else fan_in_init((0, 1, 2))
        self.stride = stride
        self.kernel = param(rngs, init, (kernel, kernel, cin, cout), (None, None, *names))
        self.bias = param(rngs, nnx.initializers.zeros, (cout,), (names[1],))

    def __call__(self, x):
        y = jax.lax.conv_general_dilated(
            x, self.kernel[...].astype(x.dtype), (self.stride, self.stride), "SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        return y + self.bias[...].astype(x.dtype)


class GroupNorm(nnx.Module):
    def __init__(self, channels: int, groups: int, *, rngs: nnx.Rngs, eps: float = 1e-5):
        self.groups, self.eps = groups, eps
        self.scale = param(rngs, nnx.initializers.ones, (channels,), ("channels",))
        self.bias = param(rngs, nnx.initializers.zeros, (channels,), ("channels",))

    def __call__(self, x):
        b, h, w, c = x.shape
        g = x.astype(jnp.float32).reshape(b, h, w, self.groups, c // self.groups)
        mean = g.mean(axis=(1, 2, 4), keepdims=True)
        var = jnp.square(g - mean).mean(axis=(1, 2, 4), keepdims=True)
        g = ((g - mean) * jax.lax.rsqrt(var + self.eps)).reshape(b, h, w, c)
        return (g * self.scale[...] + self.bias[...]).astype(x.dtype)


class ResBlock(nnx.Module):
    def __init__(self, cin: int, cout: int, cfg: UNetConfig, *, rngs: nnx.Rngs):
        self.norm1 = GroupNorm(cin, cfg.groups, rngs=rngs)
        self.conv1 = Conv(cin, cout, rngs=rngs)
        self.time = Dense(cfg.time_dim, cout, rngs=rngs)
        self.norm2 = GroupNorm(cout, cfg.groups, rngs=rngs)
        self.conv2 = Conv(cout, cout, rngs=rngs, zero=True)  # each block starts as the identity
        self.skip = Conv(cin, cout, rngs=rngs, kernel=1) if cin != cout else None

    def __call__(self, x, temb):
        h = constrain(self.conv1(jax.nn.silu(self.norm1(x))), ("batch", "height", "width", "channels"))
        h = h + self.time(jax.nn.silu(temb))[:, None, None, :]
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        return (x if self.skip is None else self.skip(x)) + h


class AttentionBlock(nnx.Module):
    def __init__(self, channels: int, cfg: UNetConfig, *, rngs: nnx.Rngs):
        self.heads = cfg.num_heads
        self.norm = GroupNorm(channels, cfg.groups, rngs=rngs)
        self.qkv = Dense(channels, 3 * channels, rngs=rngs)
        self.out = Dense(channels, channels, rngs=rngs, zero=True)

    def __call__(self, x, temb=None):
        b, h, w, c = x.shape
        q, k, v = jnp.split(self.qkv(self.norm(x)).reshape(b, h * w, 3 * self.heads, c // self.heads), 3, axis=2)
        y = jax.nn.dot_product_attention(q, k, v).reshape(b, h, w, c)
        return x + self.out(y)


class Downsample(nnx.Module):
    def __init__(self, channels: int, *, rngs: nnx.Rngs):
        self.conv = Conv(channels, channels, rngs=rngs, stride=2)

    def __call__(self, x, temb=None):
        return self.conv(x)


class Upsample(nnx.Module):
    def __init__(self, channels: int, *, rngs: nnx.Rngs):
        self.conv = Conv(channels, channels, rngs=rngs)

    def __call__(self, x, temb=None):
        return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


def _checkpointed(block, x, temb, policy: str):
    """Run one block under jax.checkpoint with the named remat policy."""
    graphdef, state = nnx.split(block)
    return remat(lambda s, x, t: nnx.merge(graphdef, s)(x, t), policy, in_scan=False)(state, x, temb)


class UNet(nnx.Module):
    def __init__(self, cfg: UNetConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        base, td = cfg.base_channels, cfg.time_dim
        self.time1 = Dense(base, td, rngs=rngs)
        self.time2 = Dense(td, td, rngs=rngs)
        if cfg.num_classes:
            # One extra row: the "no label" class of classifier-free guidance.
            self.label_embed = param(rngs, nnx.initializers.normal(1.0), (cfg.num_classes + 1, td), (None, "conv_out"))
        # The image's own few channels are never split across devices.
        self.conv_in = Conv(cfg.channels, base, rngs=rngs, names=(None, "conv_out"))

        down, skips, c = [], [base], base
        for level, (mult, res) in enumerate(zip(cfg.channel_mults, cfg.resolutions)):
            for _ in range(cfg.blocks_per_resolution):
                down.append(ResBlock(c, base * mult, cfg, rngs=rngs))
                c = base * mult
                if res in cfg.attention_resolutions:
                    down.append(AttentionBlock(c, cfg, rngs=rngs))
                skips.append(c)
            if level < len(cfg.channel_mults) - 1:
                down.append(Downsample(c, rngs=rngs))
                skips.append(c)
        self.down = nnx.List(down)
        self.middle = nnx.List([ResBlock(c, c, cfg, rngs=rngs), AttentionBlock(c, cfg, rngs=rngs), ResBlock(c, c, cfg, rngs=rngs)])

        up = []
        for level, (mult, res) in reversed(list(enumerate(zip(cfg.channel_mults, cfg.resolutions)))):
            for _ in range(cfg.blocks_per_resolution + 1):
                up.append(ResBlock(c + skips.pop(), base * mult, cfg, rngs=rngs))
                c = base * mult
                if res in cfg.attention_resolutions:
                    up.append(AttentionBlock(c, cfg, rngs=rngs))
            if level > 0:
                up.append(Upsample(c, rngs=rngs))
        self.up = nnx.List(up)
        self.norm_out = GroupNorm(c, cfg.groups, rngs=rngs)
        self.conv_out = Conv(c, cfg.channels, rngs=rngs, zero=True, names=("conv_in", None))

    def __call__(self, x, t, labels=None):
        """Model output (eps or v, as the diffusion process was trained) for noisy images x [B, H, W, C]
        at timesteps t [B]; labels [B] in [0, num_classes], num_classes meaning "no label"."""
        cfg = self.cfg
        x = constrain(x.astype(jnp.dtype(cfg.dtype)), ("batch", "height", "width", "channels"))
        temb = self.time2(jax.nn.silu(self.time1(timestep_embedding(t, cfg.base_channels).astype(x.dtype))))
        if cfg.num_classes:
            temb = temb + jnp.take(self.label_embed[...], labels, axis=0).astype(x.dtype)

        h = self.conv_in(x)
        skips = [h]
        for block in self.down:
            h = _checkpointed(block, h, temb, cfg.remat)
            if not isinstance(block, AttentionBlock):
                skips.append(h)
            else:
                skips[-1] = h  # attention refines the output of the block before it
        for block in self.middle:
            h = _checkpointed(block, h, temb, cfg.remat)
        for block in self.up:
            if isinstance(block, ResBlock):
                h = jnp.concatenate([h, skips.pop()], axis=-1)
            h = _checkpointed(block, h, temb, cfg.remat)
        return self.conv_out(jax.nn.silu(self.norm_out(h))).astype(jnp.float32)
