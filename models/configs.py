"""The shapes of the two model families as plain dataclasses (no JAX): what configs hold and
checkpoints store, readable without loading a framework."""

import dataclasses


ROPE_SCALINGS = ("none", "linear", "llama3")


@dataclasses.dataclass
class RopeScaling:
    """How RoPE frequencies are stretched for contexts longer than pretraining's (Hugging Face's
    rope_type): none; linear (every frequency divided by `factor`); llama3 (Llama 3.1's: wavelengths
    above original_max_position_embeddings / low_freq_factor divided by `factor`, those below
    original_max_position_embeddings / high_freq_factor kept, a smooth blend in between)."""

    type: str = "none"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


REMAT_CHOICES = ("device", "offload", "remat")


@dataclasses.dataclass
class CustomRemat:
    """What `remat: custom` does with each named tensor of a decoder layer (MaxText's `custom`
    policy): keep it in device memory for the backward pass (device), move it to host memory and back
    (offload), or recompute it (remat). Whatever is not named is recomputed."""

    layer_input: str = "remat"  # the residual stream entering the layer
    qkv: str = "remat"  # the query, key and value projections
    out_proj: str = "remat"  # attention's output projection
    mlp_in: str = "remat"  # the MLP's gate and up projections
    mlp_out: str = "remat"  # the MLP's down projection


@dataclasses.dataclass
class TransformerConfig:
    vocab_size: int = 512
    num_layers: int = 2
    embed_dim: int = 64
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    mlp_dim: int = 192
    max_seq_len: int = 256
    tie_embeddings: bool = False
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = dataclasses.field(default_factory=RopeScaling)
    norm_eps: float = 1e-5
    dtype: str = "float32"
    cpu_matmul_dtype: str = "auto"  # what a CPU multiplies bfloat16 operands in: auto (measured), float32, bfloat16
    remat: str = "full"
    remat_custom: CustomRemat = dataclasses.field(default_factory=CustomRemat)  # with remat: custom
    scan_layers: bool = True
    attention: str = "xla"  # a backend of models.attention.BACKENDS; the trainer resolves "auto"
    splash_block_q: int = 512  # splash's query and key/value block sizes (capped at the sequence length)
    splash_block_kv: int = 512
    # Tokens per chunk of the output layer and loss (pretrain.loss), which bounds the float32
    # logits held at once to chunk x vocab/model per device.
    loss_chunk_tokens: int = 1024

    def num_params(self, *, embedding: bool = True) -> int:
        e, h, k, d, m, v = (self.embed_dim, self.num_heads, self.num_kv_heads, self.head_dim, self.mlp_dim, self.vocab_size)
        per_layer = e * d * (2 * h + 2 * k) + 3 * e * m + 2 * e
        head = 0 if self.tie_embeddings else e * v
        return self.num_layers * per_layer + e + head + (v * e if embedding else 0)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 per matmul parameter (the output head included) plus
        causal-agnostic attention scores and values, 12 * layers * heads * head_dim * seq_len."""
        matmul_params = self.num_params(embedding=False) + (self.vocab_size * self.embed_dim if self.tie_embeddings else 0)
        attention = 12 * self.num_layers * self.num_heads * self.head_dim * seq_len
        return 6 * matmul_params + attention


@dataclasses.dataclass
class UNetConfig:
    image_size: int = 16
    channels: int = 1  # of the images, in and out
    base_channels: int = 32
    channel_mults: list[int] = dataclasses.field(default_factory=lambda: [1, 2])
    blocks_per_resolution: int = 1
    attention_resolutions: list[int] = dataclasses.field(default_factory=lambda: [8])
    num_heads: int = 4  # per attention block, where head_channels is 0
    head_channels: int = 0  # > 0: each attention has channels // head_channels heads (ADM's 64, diffusers')
    groups: int = 8  # GroupNorm groups
    num_classes: int = 0  # 0: unconditional
    # How the time (and class) embedding enters a resnet: "add" to its features, or "scale_shift"
    # them after its second norm (ADM's; diffusers' resnet_time_scale_shift).
    time_conditioning: str = "add"
    # The sinusoids' layout, as diffusers' Timesteps: cosines first, and the frequency divisor's shift.
    flip_sin_to_cos: bool = False
    freq_shift: int = 0
    downsample_padding: int = 0  # 0: pad the bottom and right before a stride-2 conv; p: p on every side
    # > 0: text-conditioned (diffusers' UNet2DConditionModel): each attention is a transformer block
    # with cross-attention on text states of this width; its projections in and out 1x1 convolutions,
    # or linear layers under use_linear_projection (Stable Diffusion 2's).
    cross_attention_dim: int = 0
    use_linear_projection: bool = False
    context_length: int = 77  # text states per caption in training batches (the tokenizer's padded length)
    # xla, or splash (the Pallas TPU kernel; where both lengths are multiples of 128 positions, XLA's
    # elsewhere); auto: splash on TPU. The trainer resolves auto.
    attention: str = "xla"
    dtype: str = "float32"
    cpu_matmul_dtype: str = "auto"  # what a CPU multiplies bfloat16 operands in: auto (measured), float32, bfloat16
    remat: str = "full"

    @property
    def resolutions(self) -> list[int]:
        """The image side at each level of the down path."""
        return [self.image_size // 2**i for i in range(len(self.channel_mults))]

    @property
    def time_dim(self) -> int:
        return 4 * self.base_channels


@dataclasses.dataclass
class VAEConfig:
    """diffusers' AutoencoderKL (Stable Diffusion's VAE): images to the moments of latents
    2^(levels - 1) times smaller per side, and latents back to images."""

    channels: int = 3  # of the images, in and out
    latent_channels: int = 4
    block_channels: list[int] = dataclasses.field(default_factory=lambda: [128, 256, 512, 512])
    layers_per_block: int = 2
    groups: int = 32
    scaling_factor: float = 0.18215  # latents are scaled by it for the diffusion model (Stable Diffusion 1.x's)
    shift_factor: float = 0.0  # and shifted by it first (0 for Stable Diffusion 1.x and 2.x)


@dataclasses.dataclass
class CLIPTextConfig:
    """transformers' CLIPTextModel (Stable Diffusion's text encoder): a causal pre-norm transformer
    over a prompt's token ids, read at every position (and pooled at the end-of-text token)."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    max_positions: int = 77
    activation: str = "quick_gelu"  # or "gelu" (Stable Diffusion 2's OpenCLIP encoder)
    eps: float = 1e-5
    eos_token_id: int = 49407  # 2: the end of text is the largest id of a prompt (older configs)

