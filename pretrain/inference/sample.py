"""`pretrain sample`: text from a language model (a prompt in, generated ids and text out), or
images from a diffusion UNet (a grid PNG plus the arrays)."""

import jax
import numpy as np
from etils import epath

from data import images
from models.generate import generate
from pretrain import formats
from pretrain.config import ConfigError
from pretrain.formats import diffusers
from pretrain.formats.latent import LatentPipeline
from pretrain.inference.load import load
from pretrain.run import checkpoint
from pretrain.tasks.diffusion import draw_images, grid_columns


def sample_text(path: str, prompt: str, *, max_new_tokens: int, temperature: float = 0.0, seed: int = 0,
                step: int | None = None) -> dict:
    """{"prompt_ids": BOS + the tokenised prompt, "ids": the generated ids (up to and including the
    first EOS), "text": the generated text} from a checkpoint or an exported directory."""
    if max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens={max_new_tokens} must be at least 1")
    if temperature < 0:
        raise ConfigError(f"--temperature={temperature} must be >= 0 (0: greedy)")
    model, _, tokenizer = load(path, "llm", step)
    if tokenizer is None:
        raise ConfigError(f"{path} has no tokenizer next to the weights; sampling needs the model's tokenizer")
    prompt_ids = [tokenizer.bos_id] + tokenizer.encode([prompt])[0]
    limit = model.cfg.max_seq_len
    if len(prompt_ids) + max_new_tokens > limit:
        raise ConfigError(f"the prompt ({len(prompt_ids)} tokens) plus --max-new-tokens={max_new_tokens} exceed the "
                          f"model's max_seq_len={limit}; shorten one of them")
    ids = generate(model, np.array([prompt_ids], np.int32), jax.random.key(seed), temperature,
                   max_new_tokens=max_new_tokens, num_valid=tokenizer.vocab_size)
    ids = [int(i) for i in np.asarray(ids[0])]
    if tokenizer.eos_id in ids:
        ids = ids[: ids.index(tokenizer.eos_id) + 1]
    # Decoding prompt and continuation together keeps the space between them where the tokenizer puts it.
    before, whole = tokenizer.decode(prompt_ids), tokenizer.decode(prompt_ids + ids)
    text = whole[len(before):] if whole.startswith(before) else tokenizer.decode(ids)
    return {"prompt_ids": prompt_ids, "ids": ids, "text": text}


def sample_images(path: str, out: str, *, num: int, steps: int | None = None, label: int | None = None,
                  guidance: float | None = None, eta: float | None = None, noise: str | None = None, seed: int = 0,
                  step: int | None = None, dtype: str | None = None, prompt: str | None = None,
                  negative_prompt: str | None = None, overwrite: bool = False) -> dict:
    """Write samples.png (a grid), samples.npy ([num, H, W, C] in [-1, 1]) and labels.npy (-1:
    unconditional) into `out`, from a checkpoint's EMA weights or an exported UNet. Steps, guidance
    and eta default to the run's diffusion settings; `noise`: a .npy of the starting noise
    (float32, N x H x W x C, latents for a latent model; N giving the number of images), else drawn
    from the seed; `dtype`: the compute dtype (default: the model's). A text-to-image model draws
    every image for `prompt`, guided away from `negative_prompt` (default: the empty prompt), and
    decodes them with its VAE, as diffusers' StableDiffusionPipeline does."""
    start = np.load(noise) if noise else None
    num = len(start) if start is not None else num
    if num < 1:
        raise ConfigError(f"--num={num} must be at least 1")
    out = epath.Path(out)
    if (out / "samples.png").exists() and not overwrite:
        raise ConfigError(f"{out} already holds samples.png; pass --overwrite to replace it, or choose another --out")
    model, cfg, _ = load(path, "diffusion", step, dtype)
    d = cfg.diffusion
    steps = steps or d.sample_steps
    guidance = d.guidance if guidance is None else guidance
    if not 0 < steps <= d.timesteps:
        raise ConfigError(f"--steps={steps} must be in [1, {d.timesteps}] (the model's diffusion.timesteps)")
    if guidance < 0:
        raise ConfigError(f"--guidance={guidance} must be >= 0")
    if eta is not None and not 0 <= eta <= 1:
        raise ConfigError(f"--eta={eta} must be in [0, 1] (0: DDIM, 1: DDPM)")
    shape = (model.cfg.image_size, model.cfg.image_size, model.cfg.channels)
    if start is not None and (start.ndim != 4 or start.shape[1:] != shape):
        raise ConfigError(f"--noise={noise} holds an array of shape {list(start.shape)}; this model starts from "
                          f"[N, {', '.join(map(str, shape))}]")
    classes = model.cfg.num_classes
    if label is not None and not 0 <= label < classes:
        raise ConfigError(f"--class={label} is not a class of this model (it has {classes or 'none: unconditional'})"
                          + (f"; use 0..{classes - 1}" if classes else "; leave --class out"))
    text, decode = _text(path, cfg, num, prompt, negative_prompt)
    batch, labels = draw_images(model, d, jax.random.key(seed), num=num, steps=steps, guidance=guidance, label=label,
                                eta=eta, noise=start, **text)
    batch = np.clip(decode(batch), -1, 1) if decode else batch
    out.mkdir(parents=True, exist_ok=True)
    for name, array in (("samples.npy", batch), ("labels.npy", labels)):
        with (out / name).open("wb") as f:
            np.save(f, array)
    (out / "samples.png").write_bytes(images.grid_png(batch, grid_columns(labels)))
    return {"out": str(out), "num": num, "steps": steps, "guidance": guidance}


def _text(path: str, cfg, num: int, prompt: str | None, negative: str | None) -> tuple[dict, object]:
    """(draw_images' text keywords, the VAE's decode) of a text-to-image model; ({}, None) otherwise."""
    if not cfg.model.cross_attention_dim:
        if prompt is not None or negative is not None:
            raise ConfigError(f"{path} holds a diffusion model without text, which takes no --prompt; use --num, "
                              "--class, --steps")
        return {}, None
    directory = epath.Path(path)
    if not formats.is_export(directory):  # a checkpoint: the parts its dataset (or import) carries
        directory = diffusers.carried(cfg, checkpoint.run_dir(checkpoint.locate(path)[0]))
    parts = LatentPipeline(str(directory))
    return {"context": parts.states([prompt or ""] * num), "null_context": parts.states([negative or ""])[0]}, parts.decode
