"""diffusers' layout of a UNet pipeline, both ways: what diffusers (and MaxDiffusion) load.

A directory holds `model_index.json`, `unet/` (`config.json` naming `UNet2DModel`, or
`UNet2DConditionModel` for a text-conditioned UNet, the weights as
`diffusion_pytorch_model.safetensors`) and `scheduler/scheduler_config.json` (a `DDIMScheduler`
with this run's noise schedule, prediction type, spacing and clipping); a text-to-image pipeline
(`StableDiffusionPipeline`) also `vae/`, `text_encoder/` and `tokenizer/`, which this stack carries
unchanged (models/vae.py and models/clip_text.py read them). Reading takes such a pipeline
directory, or a lone UNet directory (the schedule then comes from a `scheduler/` beside it, else
the defaults).

The UNet's modules carry diffusers' names (models/unet.py), so the weights map name for name:
a kernel is their `weight` (convolutions HWIO here, OIHW there; linear layers transposed), a
GroupNorm's scale their `weight`, and `to_out` their `to_out.0`. What the UNet cannot be in
diffusers (or diffusers' in ours) is refused in one line, before anything is written.
"""

import dataclasses
import json

import numpy as np
from etils import epath

from data.prepare import output
from data.prepare.documents import walk
from models import diffusion
from models.clip_text import ACTIVATIONS, CLIPTextModel
from models.configs import CLIPTextConfig, UNetConfig, VAEConfig
from models.unet import UNet
from models.vae import AutoencoderKL
from pretrain import config as config_lib
from pretrain.config import ConfigError
from pretrain.config.schema import DiffusionConfig, DiffusionRun, RunConfig
from pretrain.formats import params, weights
from pretrain.run import checkpoint

NAME, TASK = "diffusers", "diffusion"  # --format, and the family it holds
ARCHITECTURE = "UNet2DModel"
VERSION = "0.42.1"  # the diffusers whose layout this follows, as its files record it
STEM = "diffusion_pytorch_model"

# UNet2DModel's defaults, for config.json files that leave keys out.
DEFAULTS = {
    "in_channels": 3, "out_channels": 3, "center_input_sample": False, "time_embedding_type": "positional",
    "time_embedding_dim": None, "freq_shift": 0, "flip_sin_to_cos": True, "mid_block_type": "UNetMidBlock2D",
    "layers_per_block": 2, "mid_block_scale_factor": 1, "downsample_padding": 1, "downsample_type": "conv",
    "upsample_type": "conv", "act_fn": "silu", "attention_head_dim": 8, "norm_num_groups": 32,
    "attn_norm_num_groups": None, "norm_eps": 1e-5, "resnet_time_scale_shift": "default", "add_attention": True,
    "class_embed_type": None, "num_class_embeds": None,
}
TIME_CONDITIONING = {"add": "default", "scale_shift": "scale_shift"}  # ours -> resnet_time_scale_shift
PREDICTION = {"eps": "epsilon", "v": "v_prediction"}
SCHEDULE = {"cosine": "squaredcos_cap_v2", "linear": "linear", "scaled_linear": "scaled_linear"}


def betas(schedule: str, timesteps: int) -> tuple[float, float]:
    """(beta_start, beta_end) of our schedule as diffusers writes it (cosine ignores them)."""
    if schedule == "linear":
        return 0.1 / timesteps, 20.0 / timesteps  # DDPM's 1e-4 to 0.02 at 1000 steps, scaled to keep the endpoints
    return 0.00085, 0.012  # scaled_linear's (and diffusers' defaults for the rest)


# --- configs ---------------------------------------------------------------------------------


def _head_size(m: UNetConfig) -> int | None:
    """UNet2DModel's attention_head_dim: one head size for every attention block (None: one head
    per block)."""
    if m.head_channels:
        return m.head_channels
    if m.num_heads == 1:
        return None
    widths = [m.base_channels * mult for mult, res in zip(m.channel_mults, m.resolutions) if res in m.attention_resolutions]
    sizes = sorted({c // m.num_heads for c in widths + [m.base_channels * m.channel_mults[-1]]})
    if len(sizes) > 1:
        raise ConfigError(f"model.num_heads={m.num_heads} gives heads of {sizes} channels, where diffusers' UNet2DModel "
                          "has one head size; set model.head_channels (ADM's 64), or export with --format unet")
    return sizes[0]


def _blocks(m: UNetConfig, attending: str) -> dict:
    """The keys both UNet classes share: sizes, sinusoids and the block tree, an attending block's
    type prefixed by `attending` (Attn, CrossAttn)."""
    attend = [res in m.attention_resolutions for res in m.resolutions]
    return {
        "sample_size": m.image_size, "in_channels": m.channels, "out_channels": m.channels,
        "freq_shift": m.freq_shift, "flip_sin_to_cos": m.flip_sin_to_cos,
        "down_block_types": [f"{attending}DownBlock2D" if a else "DownBlock2D" for a in attend],
        "up_block_types": [f"{attending}UpBlock2D" if a else "UpBlock2D" for a in reversed(attend)],
        "block_out_channels": [m.base_channels * mult for mult in m.channel_mults],
        "layers_per_block": m.blocks_per_resolution, "downsample_padding": m.downsample_padding,
        "norm_num_groups": m.groups,
    }


def unet_config(m: UNetConfig) -> dict:
    """UNet2DModel's config.json for our model (UNet2DConditionModel's for a text-conditioned one);
    what it cannot express is refused."""
    if m.cross_attention_dim:
        return conditional_unet_config(m)
    if m.channel_mults[0] != 1:
        raise ConfigError(f"model.channel_mults={m.channel_mults} does not start at 1, where diffusers' UNet2DModel "
                          "widens only after the first level; export with --format unet")
    return {
        "_class_name": ARCHITECTURE, "_diffusers_version": VERSION, **DEFAULTS, **_blocks(m, "Attn"),
        "attention_head_dim": _head_size(m),
        "attn_norm_num_groups": m.groups,  # else scale_shift leaves the mid attention without a norm
        "resnet_time_scale_shift": TIME_CONDITIONING[m.time_conditioning],
        "num_class_embeds": m.num_classes + 1 if m.num_classes else None,  # the last: "no label"
    }


def _refuse(where, problems: dict[str, bool], by: str = "this UNet"):
    found = [k for k, bad in problems.items() if bad]
    if found:
        raise ConfigError(f"{where}: {', '.join(found)} is not supported by {by}; import a pipeline without it")


def model_config(unet: dict, where) -> UNetConfig:
    """Our model settings for a UNet2DModel config.json; anything this UNet cannot be is refused."""
    if unet.get("_class_name") == CONDITIONAL:
        return conditional_model_config(unet, where)
    if unet.get("_class_name") != ARCHITECTURE:
        raise ConfigError(f"{where} holds a {unet.get('_class_name')} model; this reads {ARCHITECTURE} directories only")
    c = DEFAULTS | unet
    down, up, widths = list(c["down_block_types"]), list(c["up_block_types"]), list(c["block_out_channels"])
    size, base = c["sample_size"], widths[0]
    shift = {v: k for k, v in TIME_CONDITIONING.items()}.get(c["resnet_time_scale_shift"])
    _refuse(where, {
        f"sample_size={size}": not isinstance(size, int),
        f"in_channels={c['in_channels']}, out_channels={c['out_channels']}": c["in_channels"] != c["out_channels"]
                                                                               or c["in_channels"] not in (1, 3),
        "center_input_sample": c["center_input_sample"],
        f"time_embedding_type={c['time_embedding_type']}": c["time_embedding_type"] != "positional",
        f"time_embedding_dim={c['time_embedding_dim']}": c["time_embedding_dim"] not in (None, 4 * base),
        f"mid_block_type={c['mid_block_type']}": c["mid_block_type"] != "UNetMidBlock2D" or not c["add_attention"],
        f"mid_block_scale_factor={c['mid_block_scale_factor']}": c["mid_block_scale_factor"] != 1,
        f"downsample_type={c['downsample_type']}": c["downsample_type"] != "conv",
        f"upsample_type={c['upsample_type']}": c["upsample_type"] != "conv",
        f"act_fn={c['act_fn']}": c["act_fn"] != "silu",
        f"norm_eps={c['norm_eps']}": c["norm_eps"] != 1e-5,
        f"resnet_time_scale_shift={c['resnet_time_scale_shift']}": shift is None,
        f"attn_norm_num_groups={c['attn_norm_num_groups']}": c["attn_norm_num_groups"] not in (
            (None, c["norm_num_groups"]) if shift == "add" else (c["norm_num_groups"],)),
        f"class_embed_type={c['class_embed_type']}": c["class_embed_type"] is not None,
        f"num_class_embeds={c['num_class_embeds']}": c["num_class_embeds"] is not None and c["num_class_embeds"] < 2,
        f"down_block_types={down}": any(t not in ("DownBlock2D", "AttnDownBlock2D") for t in down),
        f"up_block_types={up}": [t.replace("Up", "Down") for t in reversed(up)] != down,
        f"block_out_channels={widths}": len(widths) != len(down) or any(w % base for w in widths),
    })
    head = c["attention_head_dim"]
    return UNetConfig(
        image_size=size, channels=c["in_channels"], base_channels=base, channel_mults=[w // base for w in widths],
        blocks_per_resolution=c["layers_per_block"],
        attention_resolutions=[size // 2**i for i, t in enumerate(down) if t == "AttnDownBlock2D"],
        **({"num_heads": 1} if head is None else {"head_channels": head}),  # None: one head per block
        groups=c["norm_num_groups"], num_classes=(c["num_class_embeds"] or 1) - 1, time_conditioning=shift,
        flip_sin_to_cos=c["flip_sin_to_cos"], freq_shift=c["freq_shift"], downsample_padding=c["downsample_padding"],
    )


def scheduler_config(d: DiffusionConfig) -> dict:
    beta_start, beta_end = betas(d.schedule, d.timesteps)
    return {
        "_class_name": "DDIMScheduler", "_diffusers_version": VERSION, "num_train_timesteps": d.timesteps,
        "beta_schedule": SCHEDULE[d.schedule], "beta_start": beta_start, "beta_end": beta_end, "trained_betas": None,
        "clip_sample": d.clip_sample, "clip_sample_range": 1.0, "set_alpha_to_one": d.set_alpha_to_one,
        "steps_offset": d.steps_offset,
        "prediction_type": PREDICTION[d.target], "thresholding": False, "timestep_spacing": d.spacing,
        "rescale_betas_zero_snr": False,
    }


def diffusion_config(s: dict, where) -> DiffusionConfig:
    """Our diffusion settings for a scheduler_config.json (DDIM's, DDPM's or another with the same
    betas); a schedule or option our sampler does not have is refused."""
    schedule = {v: k for k, v in SCHEDULE.items()}.get(s.get("beta_schedule", "linear"))
    timesteps = s.get("num_train_timesteps", 1000)
    start, end = s.get("beta_start", 0.0001), s.get("beta_end", 0.02)
    prediction = {v: k for k, v in PREDICTION.items()}.get(s.get("prediction_type", "epsilon"))
    ours = betas(schedule, timesteps) if schedule in ("linear", "scaled_linear") else (start, end)
    _refuse(where, {
        f"beta_schedule={s.get('beta_schedule')}": schedule is None,
        "trained_betas": s.get("trained_betas") is not None,
        f"beta_start={start}, beta_end={end} (this {schedule} schedule has {ours[0]:g} and {ours[1]:g})":
            not np.allclose((start, end), ours, rtol=1e-6, atol=0),
        f"prediction_type={s.get('prediction_type')}": prediction is None,
        "thresholding": s.get("thresholding", False),
        "rescale_betas_zero_snr": s.get("rescale_betas_zero_snr", False),
        f"clip_sample_range={s.get('clip_sample_range')}": s.get("clip_sample_range", 1.0) != 1.0,
        f"timestep_spacing={s.get('timestep_spacing')}": s.get("timestep_spacing", "leading") not in diffusion.SPACINGS,
    }, by="this sampler")
    return DiffusionConfig(schedule=schedule, timesteps=timesteps, target=prediction, clip_sample=s.get("clip_sample", True),
                           spacing=s.get("timestep_spacing", "leading"), steps_offset=s.get("steps_offset", 0),
                           set_alpha_to_one=s.get("set_alpha_to_one", True))


# UNet2DConditionModel's defaults (Stable Diffusion 1.x's UNet), for config.json files that leave keys out.
CONDITIONAL = "UNet2DConditionModel"
CONDITIONAL_DEFAULTS = {
    "in_channels": 4, "out_channels": 4, "center_input_sample": False, "flip_sin_to_cos": True, "freq_shift": 0,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, "only_cross_attention": False,
    "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2, "downsample_padding": 1,
    "mid_block_scale_factor": 1, "act_fn": "silu", "norm_num_groups": 32, "norm_eps": 1e-5, "cross_attention_dim": 1280,
    "transformer_layers_per_block": 1, "encoder_hid_dim": None, "attention_head_dim": 8, "num_attention_heads": None,
    "dual_cross_attention": False, "use_linear_projection": False, "class_embed_type": None,
    "addition_embed_type": None, "num_class_embeds": None, "upcast_attention": False,
    "resnet_time_scale_shift": "default", "time_embedding_type": "positional", "time_embedding_dim": None,
    "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3, "attention_type": "default",
}


def conditional_model_config(unet: dict, where) -> UNetConfig:
    """Our model settings for a UNet2DConditionModel config.json (a text-conditioned UNet)."""
    c = CONDITIONAL_DEFAULTS | unet
    down, up, widths = list(c["down_block_types"]), list(c["up_block_types"]), list(c["block_out_channels"])
    base, size = widths[0], c["sample_size"]
    attend = [t == "CrossAttnDownBlock2D" for t in down]
    heads = c["num_attention_heads"] or c["attention_head_dim"]  # diffusers' old name for the head count
    per_level = heads if isinstance(heads, list) else [heads] * len(widths)
    sizes = {w // h for w, h, a in zip(widths + [widths[-1]], per_level + [per_level[-1]], attend + [True]) if a}
    _refuse(where, {
        f"in_channels={c['in_channels']}, out_channels={c['out_channels']}": c["in_channels"] != c["out_channels"],
        **{f"{key}={c[key]}": c[key] != CONDITIONAL_DEFAULTS[key] for key in (
            "center_input_sample", "mid_block_type", "only_cross_attention", "mid_block_scale_factor", "act_fn",
            "norm_eps", "transformer_layers_per_block", "encoder_hid_dim", "dual_cross_attention", "class_embed_type",
            "addition_embed_type", "num_class_embeds", "resnet_time_scale_shift", "time_embedding_type",
            "time_embedding_dim", "time_cond_proj_dim", "conv_in_kernel", "conv_out_kernel", "attention_type")},
        f"down_block_types={down}": any(t not in ("DownBlock2D", "CrossAttnDownBlock2D") for t in down),
        f"up_block_types={up}": [t.replace("Up", "Down") for t in reversed(up)] != down,
        f"block_out_channels={widths}": len(widths) != len(down) or any(w % base for w in widths),
        f"attention heads {per_level} (one head size per UNet here)": isinstance(heads, list) and len(sizes) > 1,
    }, by="this UNet")
    return UNetConfig(
        image_size=size, channels=c["in_channels"], base_channels=base, channel_mults=[w // base for w in widths],
        blocks_per_resolution=c["layers_per_block"], attention_resolutions=[size // 2**i for i, a in enumerate(attend) if a],
        **({"head_channels": sizes.pop()} if isinstance(heads, list) else {"num_heads": heads}),
        groups=c["norm_num_groups"], flip_sin_to_cos=c["flip_sin_to_cos"], freq_shift=c["freq_shift"],
        downsample_padding=c["downsample_padding"], cross_attention_dim=c["cross_attention_dim"],
        use_linear_projection=c["use_linear_projection"],
    )


def conditional_unet_config(m: UNetConfig) -> dict:
    """UNet2DConditionModel's config.json for a text-conditioned UNet (conditional_model_config's inverse)."""
    if m.time_conditioning != "add":
        raise ConfigError(f"model.time_conditioning={m.time_conditioning} is not what diffusers' UNet2DConditionModel "
                          "has (add); train a text-to-image UNet with time_conditioning=add")
    widths = [m.base_channels * mult for mult in m.channel_mults]
    return {
        "_class_name": CONDITIONAL, "_diffusers_version": VERSION, **CONDITIONAL_DEFAULTS, **_blocks(m, "CrossAttn"),
        "cross_attention_dim": m.cross_attention_dim, "use_linear_projection": m.use_linear_projection,
        # diffusers' old name for the number of heads: per level where the head size is fixed
        "attention_head_dim": [w // m.head_channels for w in widths] if m.head_channels else m.num_heads,
    }


# AutoencoderKL's defaults, for config.json files that leave keys out.
VAE = "AutoencoderKL"
VAE_DEFAULTS = {
    "in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"], "up_block_types": ["UpDecoderBlock2D"],
    "block_out_channels": [64], "layers_per_block": 1, "act_fn": "silu", "latent_channels": 4, "norm_num_groups": 32,
    "scaling_factor": 0.18215, "shift_factor": None, "latents_mean": None, "latents_std": None, "use_quant_conv": True,
    "use_post_quant_conv": True, "mid_block_add_attention": True,
}


def vae_config(vae: dict, where) -> VAEConfig:
    """Our settings for an AutoencoderKL config.json; anything models/vae.py cannot be is refused."""
    if vae.get("_class_name") != VAE:
        raise ConfigError(f"{where} holds a {vae.get('_class_name')} model; a latent pipeline's vae/ is read as {VAE}")
    c = VAE_DEFAULTS | vae
    levels = len(c["block_out_channels"])
    _refuse(where, {
        f"in_channels={c['in_channels']}, out_channels={c['out_channels']}": c["in_channels"] != c["out_channels"],
        f"down_block_types={c['down_block_types']}": list(c["down_block_types"]) != ["DownEncoderBlock2D"] * levels,
        f"up_block_types={c['up_block_types']}": list(c["up_block_types"]) != ["UpDecoderBlock2D"] * levels,
        f"act_fn={c['act_fn']}": c["act_fn"] != "silu",
        "latents_mean and latents_std": c["latents_mean"] is not None or c["latents_std"] is not None,
        "use_quant_conv=false": not c["use_quant_conv"],
        "use_post_quant_conv=false": not c["use_post_quant_conv"],
        "mid_block_add_attention=false": not c["mid_block_add_attention"],
    }, by="this VAE")
    return VAEConfig(channels=c["in_channels"], latent_channels=c["latent_channels"],
                     block_channels=list(c["block_out_channels"]), layers_per_block=c["layers_per_block"],
                     groups=c["norm_num_groups"], scaling_factor=c["scaling_factor"], shift_factor=c["shift_factor"] or 0.0)


def read_vae(directory: epath.Path) -> tuple[VAEConfig, dict]:
    """(settings, flat {path: float32 array}) of the VAE of a pipeline directory (its `vae/`) or of
    a lone AutoencoderKL directory."""
    vae = directory / "vae" if (directory / "model_index.json").exists() else directory
    cfg = vae_config(json.loads((vae / "config.json").read_text()), vae)
    with weights.open_weights(vae, STEM) as read_tensor:
        return cfg, {path: thunk() for path, thunk in our_tensors(params.shapes(AutoencoderKL, cfg), read_tensor)}


def clip_text_config(config: dict, where) -> CLIPTextConfig:
    """Our settings for a transformers CLIPTextModel config.json (a pipeline's text_encoder/)."""
    if config.get("model_type", "clip_text_model") != "clip_text_model" or config.get("hidden_act") not in ACTIVATIONS:
        raise ConfigError(f"{where} is not a CLIPTextModel with a quick_gelu or gelu MLP (model_type "
                          f"{config.get('model_type')}, hidden_act {config.get('hidden_act')}); this reads those only")
    c = {"vocab_size": 49408, "intermediate_size": 2048, "max_position_embeddings": 77, "layer_norm_eps": 1e-5,
         "eos_token_id": 49407} | config
    return CLIPTextConfig(vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
                          num_layers=c["num_hidden_layers"], num_heads=c["num_attention_heads"],
                          max_positions=c["max_position_embeddings"], activation=c["hidden_act"], eps=c["layer_norm_eps"],
                          eos_token_id=c["eos_token_id"])


def read_text_encoder(directory: epath.Path) -> tuple[CLIPTextConfig, dict]:
    """(settings, flat {path: float32 array}) of a pipeline's `text_encoder/` (transformers' files,
    `model.safetensors`) or of a lone CLIPTextModel directory."""
    encoder = directory / "text_encoder" if (directory / "model_index.json").exists() else directory
    cfg = clip_text_config(json.loads((encoder / "config.json").read_text()), encoder)
    with weights.open_weights(encoder, "model") as read_tensor:
        read = read_tensor
        try:  # Stable Diffusion's files name the tensors `text_model.*`; transformers 5 saves them without it
            read_tensor.shape("text_model.embeddings.token_embedding.weight")
        except ConfigError:
            read = lambda name: read_tensor(name.removeprefix("text_model."))  # noqa: E731
        return cfg, {path: thunk() for path, thunk in our_tensors(params.shapes(CLIPTextModel, cfg), read)}


def vae_json(cfg: VAEConfig, sample_size: int) -> dict:
    """The AutoencoderKL config.json of our settings: vae_config's inverse."""
    levels = len(cfg.block_channels)
    return {"_class_name": VAE, "_diffusers_version": VERSION, "in_channels": cfg.channels, "out_channels": cfg.channels,
            "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
            "block_out_channels": list(cfg.block_channels), "layers_per_block": cfg.layers_per_block, "act_fn": "silu",
            "latent_channels": cfg.latent_channels, "norm_num_groups": cfg.groups, "sample_size": sample_size,
            "scaling_factor": cfg.scaling_factor, "shift_factor": cfg.shift_factor or None}


def clip_text_json(cfg: CLIPTextConfig, bos_token_id: int) -> dict:
    """The transformers CLIPTextModel config.json of our settings: clip_text_config's inverse."""
    return {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size, "projection_dim": cfg.hidden_size,
            "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
            "max_position_embeddings": cfg.max_positions, "hidden_act": cfg.activation, "layer_norm_eps": cfg.eps,
            "bos_token_id": bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.eos_token_id}


def write_part(out: epath.Path, config: dict, flat: dict, stem: str):
    """A pipeline part of our float32 weights `flat` under their names (read_vae's and
    read_text_encoder's inverse): `config.json` and `stem`.safetensors."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    weights.write_weights(out, tensors({k: v.shape for k, v in flat.items()}, lambda k: np.asarray(flat[k])),
                          "float32", 2**40, stem)


# --- the parts a latent pipeline carries --------------------------------------------------------

PARTS = ("model_index.json", "vae", "text_encoder", "tokenizer")  # carried unchanged beside our UNet
CARRIED = "pipeline"  # where a latent dataset (and a run imported from a pipeline) keeps its copy


def carry(pipeline: epath.Path, out: epath.Path, parts=PARTS):
    """Copy the pipeline's `parts` (files unchanged) into `out`."""
    for part in parts:
        source = pipeline / part
        for f in [source] if source.is_file() else walk(source):
            target = out / f.relative_to(pipeline)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(f.read_bytes())


def carried(cfg: DiffusionRun, run: epath.Path) -> epath.Path:
    """Where a text-to-image run's VAE, text encoder and tokenizer are: its dataset's copy, else the
    copy its import made in the run directory."""
    for where in (epath.Path(cfg.data.source) / CARRIED, run / CARRIED):
        if (where / "model_index.json").exists():
            return where
    raise ConfigError(f"{run} is a text-to-image run whose VAE and text encoder are in neither data.source="
                      f"{cfg.data.source}/{CARRIED} nor {run}/{CARRIED}; point data.source at its latent dataset")


def context_length(pipeline: epath.Path) -> int:
    """The padded prompt length of a pipeline's tokenizer (CLIP's 77 if it does not say)."""
    config = pipeline / "tokenizer" / "tokenizer_config.json"
    return json.loads(config.read_text()).get("model_max_length", 77) if config.exists() else 77


# --- weights ---------------------------------------------------------------------------------


def their_name(path: str) -> str:
    """diffusers' name of one of our parameters ("down_blocks/0/resnets/1/conv1/kernel" ->
    "down_blocks.0.resnets.1.conv1.weight")."""
    *module, leaf = path.split("/")
    if leaf == "class_embedding":
        return "class_embedding.weight"
    name = ".".join([*module, "bias" if leaf == "bias" else "weight"])
    return name.replace(".to_out.", ".to_out.0.").replace(".ff_proj_in.", ".ff.net.0.proj.").replace(".ff_proj_out.",
                                                                                                     ".ff.net.2.")


def to_theirs(path: str, x: np.ndarray) -> np.ndarray:
    """Convolutions HWIO -> OIHW, linear layers [in, out] -> [out, in]; the rest as it is."""
    if x.ndim == 4:
        return x.transpose(3, 2, 0, 1)
    return x.T if x.ndim == 2 and path.endswith("/kernel") else x


def to_ours(path: str, w: np.ndarray) -> np.ndarray:
    if w.ndim == 4:
        return w.transpose(2, 3, 1, 0)
    return w.T if w.ndim == 2 and path.endswith("/kernel") else w


def tensors(shapes: dict, read) -> list:
    """[(their name, their shape, thunk)] of every parameter, given our `shapes`, from `read(path)`."""
    shape_of = lambda path, shape: to_theirs(path, np.broadcast_to(np.int8(0), shape)).shape  # noqa: E731
    return [(their_name(path), shape_of(path, shape), lambda p=path: to_theirs(p, read(p)))
            for path, shape in sorted(shapes.items())]


def our_tensors(shapes: dict, read) -> list:
    """[(our path, thunk)] of every parameter as float32, from `read(their name)`."""
    return [(path, lambda p=path: to_ours(p, read(their_name(p))).astype(np.float32)) for path in sorted(shapes)]


# --- the directory, both ways ----------------------------------------------------------------


def _unet_dir(directory: epath.Path) -> epath.Path:
    return directory / "unet" if (directory / "model_index.json").exists() else directory


def claims(directory: epath.Path, config: dict) -> bool:
    unet = _unet_dir(directory) / "config.json"
    return unet.exists() and json.loads(unet.read_text()).get("_class_name") in (ARCHITECTURE, CONDITIONAL)


def configs(directory: epath.Path) -> DiffusionRun:
    """The run config (model and diffusion settings) of a pipeline or UNet2DModel directory."""
    unet = _unet_dir(directory)
    m = model_config(json.loads((unet / "config.json").read_text()), unet)
    if m.cross_attention_dim:
        m = dataclasses.replace(m, context_length=context_length(unet.parent))
    scheduler = unet.parent / "scheduler" / "scheduler_config.json"
    if scheduler.exists():
        d = diffusion_config(json.loads(scheduler.read_text()), scheduler)
    else:
        d = DiffusionConfig()
        print(f"note: no {scheduler}; the diffusion settings are the defaults ({d.schedule} schedule, "
              f"{d.timesteps} steps, target {d.target}): set diffusion.* to those the UNet was trained with")
    return DiffusionRun(model=m, diffusion=d)


def read(directory: epath.Path) -> tuple[DiffusionRun, dict, None]:
    """(a config holding the model and diffusion settings, flat {path: float32 array}, no tokenizer)."""
    cfg = configs(directory)
    with weights.open_weights(_unet_dir(directory), STEM) as read_tensor:
        flat = {path: thunk() for path, thunk in our_tensors(params.shapes(UNet, cfg.model), read_tensor)}
    return cfg, flat, None


def export(cfg: DiffusionRun, directory: epath.Path, step: int, out: epath.Path, *, dtype: str, overwrite: bool,
           max_shard_bytes: int) -> int:
    """The checkpoint's EMA weights (its parameters without an EMA) as a DDIM pipeline directory;
    returns the bytes of weights."""
    unet, scheduler = unet_config(cfg.model), scheduler_config(cfg.diffusion)
    output.check_output(out, overwrite)
    read = params.Reader(directory, step, UNet, cfg.model, params.ema_or_params(directory, step))
    index = {"_class_name": "DDIMPipeline", "_diffusers_version": VERSION,
             "unet": ["diffusers", unet["_class_name"]], "scheduler": ["diffusers", "DDIMScheduler"]}
    parts = carried(cfg, checkpoint.run_dir(directory)) if cfg.model.cross_attention_dim else None
    if parts:
        index |= _text_to_image_index(parts)
        if cfg.diffusion.steps_offset != 1 or cfg.diffusion.clip_sample:
            print(f"note: StableDiffusionPipeline samples with steps_offset=1 and clip_sample=false whatever its scheduler "
                  f"says; this run samples with diffusion.steps_offset={cfg.diffusion.steps_offset} and "
                  f"clip_sample={str(cfg.diffusion.clip_sample).lower()}, so the two differ")
    with output.staged(out, overwrite, last="model_index.json") as stage:
        for name, content in (("unet/config.json", unet), ("scheduler/scheduler_config.json", scheduler)):
            (stage / name).parent.mkdir(exist_ok=True)
            (stage / name).write_text(json.dumps(content, indent=2))
        size = weights.write_weights(stage / "unet", tensors(read.shapes, read), dtype, max_shard_bytes, STEM)
        if parts:
            carry(parts, stage, PARTS[1:])
        (stage / "model_index.json").write_text(json.dumps(index, indent=2))
    return size


def _text_to_image_index(parts: epath.Path) -> dict:
    """model_index.json's entries of a StableDiffusionPipeline around the carried parts (no safety
    checker: a pretrained UNet has none of its own)."""
    theirs = json.loads((parts / "model_index.json").read_text())
    return {"_class_name": "StableDiffusionPipeline", "vae": ["diffusers", VAE],
            "text_encoder": theirs.get("text_encoder", ["transformers", "CLIPTextModel"]),
            "tokenizer": theirs.get("tokenizer", ["transformers", "CLIPTokenizer"]),
            "safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False}


def import_(directory: epath.Path, out: str, *, overwrite: bool) -> int:
    """A diffusers pipeline or UNet2DModel directory as a checkpoint (step 0, parameters only) in
    `out`, with the config.yaml to train on from there; a Stable Diffusion pipeline's VAE, text
    encoder and tokenizer are carried into `out`/pipeline. Returns the parameter count."""
    run = configs(directory)
    output.check_output(epath.Path(out), overwrite)
    cfg = DiffusionRun(run=RunConfig(name=directory.name or "imported", steps=1, output_dir=str(out)),
                       model=run.model, diffusion=run.diffusion)
    shapes = params.shapes(UNet, cfg.model)
    with weights.open_weights(_unet_dir(directory), STEM) as read_tensor:
        params.save_imported(cfg, tensors(shapes, None), our_tensors(shapes, read_tensor), read_tensor, overwrite)
    if cfg.model.cross_attention_dim and (directory / "model_index.json").exists():
        carry(directory, epath.Path(out) / CARRIED)
    (epath.Path(out) / "config.yaml").write_text(config_lib.to_yaml(cfg))
    return sum(int(np.prod(shape)) for shape in shapes.values())
