"""Diffusion UNet in the block tree of diffusers' `UNet2DModel` (ADM's architecture): a sinusoidal
time embedding, residual blocks with GroupNorm, SiLU and time (plus optional class) conditioning,
self-attention at chosen resolutions, and down, mid and up blocks joined by skip connections. With
model.cross_attention_dim it is diffusers' `UNet2DConditionModel` (Stable Diffusion's): each
attention a transformer block that also attends to the text states.

The modules carry diffusers' names (`down_blocks/0/resnets/1/conv1`, `time_embedding/linear_1`),
so that a diffusers checkpoint maps onto this one name for name (pretrain/formats/diffusers.py);
every option diffusers' family has that changes the numbers is a field of UNetConfig.

Images are NHWC. Every parameter carries logical axis names (`conv_in`, `conv_out`, `channels`),
so the trainer's one rules table shards it; each resnet and attention is rematerialised with the
same policy names as the transformer. Class conditioning reserves label `num_classes` as
"no label", which classifier-free guidance uses.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from models.attention import unmasked_attention
from models.configs import UNetConfig
from models.layers import constrain, einsum, fan_in_init, param, remat

TIME_CONDITIONING = ("add", "scale_shift")  # diffusers' resnet_time_scale_shift: default, scale_shift


def timestep_embedding(t, dim: int, *, flip_sin_to_cos: bool = False, freq_shift: int = 0):
    """[B] timesteps -> [B, dim] sinusoids at geometrically spaced frequencies (diffusers' Timesteps:
    cosines first under flip_sin_to_cos, frequencies exp(-ln(10^4) i / (dim/2 - freq_shift)))."""
    half = dim // 2
    freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift))
    angles = t.astype(jnp.float32)[:, None] * freqs[None]
    waves = [jnp.cos(angles), jnp.sin(angles)] if flip_sin_to_cos else [jnp.sin(angles), jnp.cos(angles)]
    return jnp.concatenate(waves, axis=-1)


class Dense(nnx.Module):
    def __init__(self, cin: int, cout: int, *, rngs: nnx.Rngs, zero: bool = False, bias: bool = True):
        init = nnx.initializers.zeros if zero else fan_in_init()
        self.kernel = param(rngs, init, (cin, cout), ("conv_in", "conv_out"))
        self.bias = param(rngs, nnx.initializers.zeros, (cout,), ("conv_out",)) if bias else None

    def __call__(self, x):
        y = einsum("...i,io->...o", x, self.kernel[...], dtype=x.dtype)
        return y if self.bias is None else y + self.bias[...].astype(x.dtype)


class Conv(nnx.Module):
    def __init__(self, cin: int, cout: int, *, rngs: nnx.Rngs, kernel: int = 3, stride: int = 1, zero: bool = False,
                 padding="SAME", names=("conv_in", "conv_out")):
        init = nnx.initializers.zeros if zero else fan_in_init((0, 1, 2))
        self.stride, self.padding = stride, padding
        self.kernel = param(rngs, init, (kernel, kernel, cin, cout), (None, None, *names))
        self.bias = param(rngs, nnx.initializers.zeros, (cout,), (names[1],))

    def __call__(self, x):
        y = jax.lax.conv_general_dilated(
            x, self.kernel[...].astype(x.dtype), (self.stride, self.stride), self.padding,
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


class LayerNorm(nnx.Module):
    def __init__(self, channels: int, *, rngs: nnx.Rngs, eps: float = 1e-5):
        self.eps = eps
        self.scale = param(rngs, nnx.initializers.ones, (channels,), ("channels",))
        self.bias = param(rngs, nnx.initializers.zeros, (channels,), ("channels",))

    def __call__(self, x):
        y = x.astype(jnp.float32)
        mean = y.mean(-1, keepdims=True)
        y = (y - mean) * jax.lax.rsqrt(jnp.square(y - mean).mean(-1, keepdims=True) + self.eps)
        return (y * self.scale[...] + self.bias[...]).astype(x.dtype)


class ResnetBlock(nnx.Module):
    """diffusers' ResnetBlock2D: a time embedding (of time_dim channels) added to the features
    ("add"), or scaling and shifting them after the second norm (scale_shift, ADM's); with no
    time_dim, none (the VAE's)."""

    def __init__(self, cin: int, cout: int, groups: int, *, rngs: nnx.Rngs, time_dim: int = 0, scale_shift: bool = False,
                 eps: float = 1e-5):
        self.scale_shift = scale_shift
        self.norm1 = GroupNorm(cin, groups, rngs=rngs, eps=eps)
        self.conv1 = Conv(cin, cout, rngs=rngs)
        self.time_emb_proj = Dense(time_dim, 2 * cout if scale_shift else cout, rngs=rngs) if time_dim else None
        self.norm2 = GroupNorm(cout, groups, rngs=rngs, eps=eps)
        self.conv2 = Conv(cout, cout, rngs=rngs, zero=True)  # each block starts as the identity
        self.conv_shortcut = Conv(cin, cout, rngs=rngs, kernel=1) if cin != cout else None

    def __call__(self, x, temb=None, context=None):
        h = constrain(self.conv1(jax.nn.silu(self.norm1(x))), ("batch", "height", "width", "channels"))
        t = 0 if self.time_emb_proj is None else self.time_emb_proj(jax.nn.silu(temb))[:, None, None, :]
        if self.scale_shift:
            scale, shift = jnp.split(t, 2, axis=-1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + t)
        h = self.conv2(jax.nn.silu(h))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


def resnet(cin: int, cout: int, cfg: UNetConfig, rngs: nnx.Rngs) -> ResnetBlock:
    """A UNet's resnet: conditioned on the time (and class) embedding as cfg says."""
    return ResnetBlock(cin, cout, cfg.groups, rngs=rngs, time_dim=cfg.time_dim,
                       scale_shift=cfg.time_conditioning == "scale_shift")


class Attention(nnx.Module):
    """Self-attention over the pixels, with a residual (diffusers' Attention as its UNets and VAE
    use it: GroupNorm first, biased projections)."""

    def __init__(self, channels: int, heads: int, groups: int, *, rngs: nnx.Rngs, eps: float = 1e-5,
                 backend: str = "xla"):
        self.heads, self.backend = heads, backend
        self.group_norm = GroupNorm(channels, groups, rngs=rngs, eps=eps)
        self.to_q, self.to_k, self.to_v = (Dense(channels, channels, rngs=rngs) for _ in range(3))
        self.to_out = Dense(channels, channels, rngs=rngs, zero=True)

    def __call__(self, x, temb=None, context=None):
        b, h, w, c = x.shape
        y = self.group_norm(x)
        q, k, v = (proj(y).reshape(b, h * w, self.heads, c // self.heads) for proj in (self.to_q, self.to_k, self.to_v))
        return x + self.to_out(unmasked_attention(q, k, v, self.backend).reshape(b, h, w, c))


def heads(channels: int, cfg: UNetConfig) -> int:
    """A UNet attention's heads: of model.head_channels channels each (diffusers' UNet2DModel, ADM,
    Stable Diffusion 2), or model.num_heads per block when head_channels is 0."""
    return channels // cfg.head_channels if cfg.head_channels else cfg.num_heads


def attention(channels: int, cfg: UNetConfig, rngs: nnx.Rngs) -> Attention:
    return Attention(channels, heads(channels, cfg), cfg.groups, rngs=rngs, backend=cfg.attention)


class CrossAttention(nnx.Module):
    """diffusers' Attention as its transformer blocks use it: unbiased q/k/v projections, keys and
    values from `context` (the text states; x itself for self-attention), a biased output."""

    def __init__(self, channels: int, heads: int, context_dim: int, *, rngs: nnx.Rngs, backend: str = "xla"):
        self.heads, self.backend = heads, backend
        self.to_q = Dense(channels, channels, rngs=rngs, bias=False)
        self.to_k, self.to_v = (Dense(context_dim, channels, rngs=rngs, bias=False) for _ in range(2))
        self.to_out = Dense(channels, channels, rngs=rngs)

    def __call__(self, x, context):
        b, t, c = x.shape
        q = self.to_q(x).reshape(b, t, self.heads, c // self.heads)
        k, v = (proj(context).reshape(b, context.shape[1], self.heads, c // self.heads) for proj in (self.to_k, self.to_v))
        return self.to_out(unmasked_attention(q, k, v, self.backend).reshape(b, t, c))


class TransformerBlock(nnx.Module):
    """diffusers' BasicTransformerBlock: self-attention, cross-attention on the text, and a GEGLU
    feed-forward (4x wide), each behind a LayerNorm and added back."""

    def __init__(self, channels: int, heads: int, context_dim: int, *, rngs: nnx.Rngs, backend: str = "xla"):
        self.norm1, self.norm2, self.norm3 = (LayerNorm(channels, rngs=rngs) for _ in range(3))
        self.attn1 = CrossAttention(channels, heads, channels, rngs=rngs, backend=backend)
        self.attn2 = CrossAttention(channels, heads, context_dim, rngs=rngs, backend=backend)
        self.ff_proj_in = Dense(channels, 8 * channels, rngs=rngs)  # the GEGLU's values and gates
        self.ff_proj_out = Dense(4 * channels, channels, rngs=rngs, zero=True)

    def __call__(self, x, context):
        y = self.norm1(x)
        x = x + self.attn1(y, y)
        x = x + self.attn2(self.norm2(x), context)
        values, gates = jnp.split(self.ff_proj_in(self.norm3(x)), 2, axis=-1)
        return x + self.ff_proj_out(values * jax.nn.gelu(gates, approximate=False))


class Transformer2D(nnx.Module):
    """diffusers' Transformer2DModel over the pixels: GroupNorm, a projection in (a 1x1 convolution,
    or a linear layer under use_linear_projection), one transformer block with cross-attention on
    the text states, a projection out, and the residual."""

    def __init__(self, channels: int, cfg: UNetConfig, *, rngs: nnx.Rngs):
        self.linear = cfg.use_linear_projection
        self.norm = GroupNorm(channels, cfg.groups, rngs=rngs, eps=1e-6)
        self.proj_in = Dense(channels, channels, rngs=rngs) if self.linear else Conv(channels, channels, rngs=rngs, kernel=1)
        self.transformer_blocks = nnx.List([TransformerBlock(channels, heads(channels, cfg), cfg.cross_attention_dim,
                                                             rngs=rngs, backend=cfg.attention)])
        self.proj_out = (Dense(channels, channels, rngs=rngs, zero=True) if self.linear
                         else Conv(channels, channels, rngs=rngs, kernel=1, zero=True))

    def __call__(self, x, temb=None, context=None):
        b, h, w, c = x.shape
        y = self.proj_in(self.norm(x)).reshape(b, h * w, c)
        for block in self.transformer_blocks:
            y = block(y, context.astype(y.dtype))
        return x + self.proj_out(y.reshape(b, h, w, c))


def attention_block(channels: int, cfg: UNetConfig, rngs: nnx.Rngs):
    """The attention of a level: over the text (Transformer2D) where the UNet is text-conditioned,
    else over the pixels alone."""
    return Transformer2D(channels, cfg, rngs=rngs) if cfg.cross_attention_dim else attention(channels, cfg, rngs)


class Downsample(nnx.Module):
    def __init__(self, channels: int, padding: int, *, rngs: nnx.Rngs):
        # diffusers' downsample_padding: 0 pads the bottom and right only, p > 0 p on every side.
        pad = ((padding, padding), (padding, padding)) if padding else ((0, 1), (0, 1))
        self.conv = Conv(channels, channels, rngs=rngs, stride=2, padding=pad)

    def __call__(self, x, temb=None, context=None):
        return self.conv(x)


class Upsample(nnx.Module):
    def __init__(self, channels: int, *, rngs: nnx.Rngs):
        self.conv = Conv(channels, channels, rngs=rngs)

    def __call__(self, x, temb=None, context=None):
        return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


def _checkpointed(block, x, temb, context, policy: str):
    """Run one block under jax.checkpoint with the named remat policy."""
    graphdef, state = nnx.split(block)
    return remat(lambda s, x, t, c: nnx.merge(graphdef, s)(x, t, c), policy, in_scan=False)(state, x, temb, context)


class DownBlock(nnx.Module):
    """One resolution of the down path (diffusers' DownBlock2D, or AttnDownBlock2D with attention):
    resnets, each followed by an attention where the level has one, then a downsampler (none at
    the bottom). Each output goes onto the skip list."""

    def __init__(self, cin: int, cout: int, attend: bool, downsample: bool, cfg: UNetConfig, *, rngs: nnx.Rngs):
        n, self.policy = cfg.blocks_per_resolution, cfg.remat
        self.resnets = nnx.List([resnet(cin if i == 0 else cout, cout, cfg, rngs) for i in range(n)])
        self.attentions = nnx.List([attention_block(cout, cfg, rngs) for _ in range(n)]) if attend else None
        self.downsamplers = nnx.List([Downsample(cout, cfg.downsample_padding, rngs=rngs)]) if downsample else None

    def __call__(self, h, temb, skips: list, context=None):
        for i, resnet in enumerate(self.resnets):
            h = _checkpointed(resnet, h, temb, context, self.policy)
            if self.attentions is not None:
                h = _checkpointed(self.attentions[i], h, temb, context, self.policy)
            skips.append(h)
        if self.downsamplers is not None:
            h = _checkpointed(self.downsamplers[0], h, temb, context, self.policy)
            skips.append(h)
        return h


class UpBlock(nnx.Module):
    """One resolution of the up path (UpBlock2D, AttnUpBlock2D): one resnet more than down, each
    taking the next skip concatenated onto its input, attentions as down, then an upsampler (none
    at the top). `skips` are the channels of the skips still to take, popped as they are used."""

    def __init__(self, cin: int, cout: int, skips: list[int], attend: bool, upsample: bool, cfg: UNetConfig, *,
                 rngs: nnx.Rngs):
        n, self.policy = cfg.blocks_per_resolution + 1, cfg.remat
        self.resnets = nnx.List([resnet((cin if i == 0 else cout) + skips.pop(), cout, cfg, rngs) for i in range(n)])
        self.attentions = nnx.List([attention_block(cout, cfg, rngs) for _ in range(n)]) if attend else None
        self.upsamplers = nnx.List([Upsample(cout, rngs=rngs)]) if upsample else None

    def __call__(self, h, temb, skips: list, context=None):
        for i, resnet in enumerate(self.resnets):
            h = _checkpointed(resnet, jnp.concatenate([h, skips.pop()], axis=-1), temb, context, self.policy)
            if self.attentions is not None:
                h = _checkpointed(self.attentions[i], h, temb, context, self.policy)
        if self.upsamplers is not None:
            h = _checkpointed(self.upsamplers[0], h, temb, context, self.policy)
        return h


class MidBlock(nnx.Module):
    """diffusers' UNetMidBlock2D: resnet, attention, resnet at the lowest resolution."""

    def __init__(self, channels: int, cfg: UNetConfig, *, rngs: nnx.Rngs):
        self.policy = cfg.remat
        self.resnets = nnx.List([resnet(channels, channels, cfg, rngs) for _ in range(2)])
        self.attentions = nnx.List([attention_block(channels, cfg, rngs)])

    def __call__(self, h, temb, context=None):
        for block in (self.resnets[0], self.attentions[0], self.resnets[1]):
            h = _checkpointed(block, h, temb, context, self.policy)
        return h


class TimestepEmbedding(nnx.Module):
    def __init__(self, cin: int, cout: int, *, rngs: nnx.Rngs):
        self.linear_1, self.linear_2 = Dense(cin, cout, rngs=rngs), Dense(cout, cout, rngs=rngs)

    def __call__(self, x):
        return self.linear_2(jax.nn.silu(self.linear_1(x)))


class UNet(nnx.Module):
    def __init__(self, cfg: UNetConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        base, levels = cfg.base_channels, len(cfg.channel_mults)
        widths = [base * mult for mult in cfg.channel_mults]
        attend = [res in cfg.attention_resolutions for res in cfg.resolutions]
        self.time_embedding = TimestepEmbedding(base, cfg.time_dim, rngs=rngs)
        if cfg.num_classes:
            # One extra row: the "no label" class of classifier-free guidance.
            self.class_embedding = param(rngs, nnx.initializers.normal(1.0), (cfg.num_classes + 1, cfg.time_dim),
                                         (None, "conv_out"))
        # The image's own few channels are never split across devices.
        self.conv_in = Conv(cfg.channels, base, rngs=rngs, names=(None, "conv_out"))
        self.down_blocks = nnx.List([
            DownBlock(([base] + widths)[i], widths[i], attend[i], i < levels - 1, cfg, rngs=rngs) for i in range(levels)
        ])
        self.mid_block = MidBlock(widths[-1], cfg, rngs=rngs)
        skips = [base] + [w for i, w in enumerate(widths) for _ in range(cfg.blocks_per_resolution + (i < levels - 1))]
        self.up_blocks = nnx.List([
            UpBlock(widths[min(i + 1, levels - 1)], widths[i], skips, attend[i], i > 0, cfg, rngs=rngs)
            for i in reversed(range(levels))
        ])
        self.conv_norm_out = GroupNorm(widths[0], cfg.groups, rngs=rngs)
        self.conv_out = Conv(widths[0], cfg.channels, rngs=rngs, zero=True, names=("conv_in", None))

    def __call__(self, x, t, labels=None, context=None):
        """Model output (eps or v, as the diffusion process was trained) for noisy images (or latents)
        x [B, H, W, C] at timesteps t [B]; labels [B] in [0, num_classes], num_classes meaning "no
        label"; context [B, T, cross_attention_dim]: the text states a text-conditioned UNet reads."""
        cfg = self.cfg
        x = constrain(x.astype(jnp.dtype(cfg.dtype)), ("batch", "height", "width", "channels"))
        sinusoids = timestep_embedding(t, cfg.base_channels, flip_sin_to_cos=cfg.flip_sin_to_cos, freq_shift=cfg.freq_shift)
        temb = self.time_embedding(sinusoids.astype(x.dtype))
        if cfg.num_classes:
            temb = temb + jnp.take(self.class_embedding[...], labels, axis=0).astype(x.dtype)
        h = self.conv_in(x)
        skips = [h]
        for block in self.down_blocks:
            h = block(h, temb, skips, context)
        h = self.mid_block(h, temb, context)
        for block in self.up_blocks:
            h = block(h, temb, skips, context)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(h))).astype(jnp.float32)
