"""diffusers' AutoencoderKL (the VAE of Stable Diffusion and of latent diffusion models generally)
in NNX, by diffusers' names (`encoder/down_blocks/0/resnets/1/conv1`, `quant_conv`), so that a
pipeline's `vae/` weights map onto it name for name (pretrain/formats/diffusers.py).

The encoder takes images (NHWC, in [-1, 1]) to the moments of a diagonal Gaussian over latents
(mean and log-variance, concatenated on channels); the decoder takes latents back to images. Its
blocks are the UNet's (models/unet.py) without time conditioning, every GroupNorm with eps 1e-6
and one attention head in the middle blocks, as diffusers builds them.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from models.configs import VAEConfig
from models.unet import Attention, Conv, Downsample, GroupNorm, ResnetBlock, Upsample

EPS = 1e-6


class MidBlock(nnx.Module):
    """UNetMidBlock2D without time: resnet, one-head attention, resnet."""

    def __init__(self, channels: int, groups: int, *, rngs: nnx.Rngs):
        self.resnets = nnx.List([ResnetBlock(channels, channels, groups, rngs=rngs, eps=EPS) for _ in range(2)])
        self.attentions = nnx.List([Attention(channels, 1, groups, rngs=rngs, eps=EPS)])

    def __call__(self, h):
        return self.resnets[1](self.attentions[0](self.resnets[0](h)))


class EncoderBlock(nnx.Module):
    """DownEncoderBlock2D: resnets, then a stride-2 convolution padded at the bottom and right
    (none at the last level)."""

    def __init__(self, cin: int, cout: int, downsample: bool, cfg: VAEConfig, *, rngs: nnx.Rngs):
        self.resnets = nnx.List([ResnetBlock(cin if i == 0 else cout, cout, cfg.groups, rngs=rngs, eps=EPS)
                                 for i in range(cfg.layers_per_block)])
        self.downsamplers = nnx.List([Downsample(cout, 0, rngs=rngs)]) if downsample else None

    def __call__(self, h):
        for block in [*self.resnets, *(self.downsamplers or [])]:
            h = block(h)
        return h


class DecoderBlock(nnx.Module):
    """UpDecoderBlock2D: one resnet more than the encoder's level, then a nearest-neighbour 2x
    upsampling and a convolution (none at the last level)."""

    def __init__(self, cin: int, cout: int, upsample: bool, cfg: VAEConfig, *, rngs: nnx.Rngs):
        self.resnets = nnx.List([ResnetBlock(cin if i == 0 else cout, cout, cfg.groups, rngs=rngs, eps=EPS)
                                 for i in range(cfg.layers_per_block + 1)])
        self.upsamplers = nnx.List([Upsample(cout, rngs=rngs)]) if upsample else None

    def __call__(self, h):
        for block in [*self.resnets, *(self.upsamplers or [])]:
            h = block(h)
        return h


class Encoder(nnx.Module):
    def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
        widths, levels = cfg.block_channels, len(cfg.block_channels)
        self.conv_in = Conv(cfg.channels, widths[0], rngs=rngs)
        self.down_blocks = nnx.List([EncoderBlock(widths[max(i - 1, 0)], widths[i], i < levels - 1, cfg, rngs=rngs)
                                     for i in range(levels)])
        self.mid_block = MidBlock(widths[-1], cfg.groups, rngs=rngs)
        self.conv_norm_out = GroupNorm(widths[-1], cfg.groups, rngs=rngs, eps=EPS)
        self.conv_out = Conv(widths[-1], 2 * cfg.latent_channels, rngs=rngs)

    def __call__(self, x):
        h = self.conv_in(x)
        for block in self.down_blocks:
            h = block(h)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(self.mid_block(h))))


class Decoder(nnx.Module):
    def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
        widths, levels = cfg.block_channels[::-1], len(cfg.block_channels)
        self.conv_in = Conv(cfg.latent_channels, widths[0], rngs=rngs)
        self.mid_block = MidBlock(widths[0], cfg.groups, rngs=rngs)
        self.up_blocks = nnx.List([DecoderBlock(widths[max(i - 1, 0)], widths[i], i < levels - 1, cfg, rngs=rngs)
                                   for i in range(levels)])
        self.conv_norm_out = GroupNorm(widths[-1], cfg.groups, rngs=rngs, eps=EPS)
        self.conv_out = Conv(widths[-1], cfg.channels, rngs=rngs)

    def __call__(self, z):
        h = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            h = block(h)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(h)))


class AutoencoderKL(nnx.Module):
    def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.encoder, self.decoder = Encoder(cfg, rngs=rngs), Decoder(cfg, rngs=rngs)
        self.quant_conv = Conv(2 * cfg.latent_channels, 2 * cfg.latent_channels, rngs=rngs, kernel=1)
        self.post_quant_conv = Conv(cfg.latent_channels, cfg.latent_channels, rngs=rngs, kernel=1)

    def moments(self, images):
        """[B, H, W, channels] images in [-1, 1] -> [B, H/f, W/f, 2 x latent_channels]: the mean and
        log-variance of each latent."""
        return self.quant_conv(self.encoder(images.astype(jnp.float32)))

    def decode(self, latents):
        """Unscaled latents -> images in about [-1, 1]."""
        return self.decoder(self.post_quant_conv(latents.astype(jnp.float32)))
