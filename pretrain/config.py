"""The run's configuration: typed schema, YAML presets, key=value overrides, validation.

Every check that can fail on user input lives here and raises ConfigError, which the
CLI turns into one line on stderr and exit code 2 before anything is compiled or written.
"""

import dataclasses
import difflib
import keyword
import re
import types
import typing
from pathlib import Path

import yaml

from models.attention import BACKENDS, splash_blocks
from models.diffusion import SCHEDULES, TARGETS
from models.layers import REMAT_POLICIES
from models.transformer import TransformerConfig
from models.unet import UNetConfig
from pretrain import tpu

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """Bad user input; the message names the key and the fix."""


@dataclasses.dataclass
class RunConfig:
    name: str = "run"
    seed: int = 0
    steps: int = 100
    output_dir: str = "runs/run"


@dataclasses.dataclass
class RuntimeConfig:
    fake_cpu_devices: int = 0  # > 0: run on this many faked CPU devices (per process)
    # A TPU accelerator type (v5p-64): with faked CPU devices on as many processes as the slice has
    # hosts, each mesh position gets the CPU device of the process that owns that chip on the slice.
    fake_topology: str = ""
    peak_flops_per_device: float = 0.0  # 0: from the device table, or measured on CPU
    compilation_cache_dir: str = "~/.cache/pretrain/xla"  # "" turns JAX's persistent cache off
    # auto: jax.distributed with JAX's own cluster detection (TPU VM, GKE, Slurm, Open MPI) when it
    # finds a cluster, else one process; explicit: the three keys below; off: one process.
    distributed: str = "auto"
    coordinator: str = ""  # host:port of process 0 (explicit)
    num_processes: int = 0  # explicit: required; auto: if > 0, checked against what the cluster says
    process_id: int = -1  # explicit
    init_timeout_s: int = 1800  # cold starts of many hosts take minutes
    heartbeat_timeout_s: int = 100  # a process silent this long is dead, and takes the run down
    step_timeout_s: float = 1800.0  # a step not done after this long ends the run with exit code 3; 0: off


@dataclasses.dataclass
class MeshConfig:
    data: int = -1  # -1: whatever the model axis leaves
    model: int = 1


@dataclasses.dataclass
class DataConfig:
    # stdlib: the Python standard library's sources, prepared on first use; synthetic: random
    # ids of the right shape; anything else: a directory (local or gs://) from `pretrain prepare`.
    source: str = "stdlib"
    seq_len: int = 128
    workers: int = 0  # threads that read and pack rows (0: the training thread); no effect on the batches
    cache_dir: str = "~/.cache/pretrain"  # prepared stdlib corpus, local copies of gs:// datasets
    max_corpus_mb: float = 8.0  # stdlib: how much of it to read
    val_fraction: float = 0.02  # stdlib: share of documents held out


@dataclasses.dataclass
class ImageDataConfig:
    # digits: scikit-learn's bundled handwritten digits (1,797 8x8 images, 10 classes), upscaled;
    # synthetic: random images of the right shape; anything else: a directory (local or gs://),
    # either from `pretrain prepare images` or of PNG/JPEG files (class subdirectories give labels).
    source: str = "digits"
    workers: int = 0  # threads that decode and augment (0: the training thread); no effect on the batches
    cache_dir: str = "~/.cache/pretrain"  # local copies of gs:// datasets
    augment: bool = True  # random horizontal flips (off for digits, which flipping changes)
    val_fraction: float = 0.1  # digits and plain image directories: share of images held out


@dataclasses.dataclass
class ParamGroup:
    pattern: str  # regex searched in the parameter path, e.g. "layers/attn_norm/scale"
    weight_decay: float | None = None  # None: optim.weight_decay
    lr_mult: float = 1.0


@dataclasses.dataclass
class OptimConfig:
    lr: float = 3e-4
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at run.steps
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float = 1.0  # 0 turns clipping off
    z_loss: float = 0.0  # weight of logsumexp(logits)^2
    # First match wins; parameters that match no group get optim.weight_decay.
    groups: list[ParamGroup] = dataclasses.field(
        default_factory=lambda: [ParamGroup(pattern=r"norm|bias|^embed$", weight_decay=0.0)]
    )


@dataclasses.dataclass
class TrainConfig:
    global_batch: int = 8
    microbatches: int = 1
    log_every: int = 10
    eval_every: int = 0  # 0: no periodic eval (a final eval still runs if there is held-out data)
    eval_batches: int = 4
    # > 0: keep an exponential moving average of the parameters, with decay min(ema_decay,
    # (1 + n) / (10 + n)) at update n so that early updates are not swamped by the random start.
    ema_decay: float = 0.0
    # [start, end]: a JAX profiler trace of these steps under run.output_dir/profile/; []: none.
    profile_steps: list[int] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class CheckpointConfig:
    every: int = 0  # save every N steps; 0: only at the end (and on preemption)
    keep: int = 3  # most recent checkpoints kept; 0: all
    keep_every: int = 0  # also keep every Nth step for good; 0: none
    async_: bool = True  # `checkpoint.async`: write in the background while training goes on
    # "": resume from the latest checkpoint in run.output_dir, if any; a step number: that step;
    # a path (a run dir, its checkpoints/ dir or one step's dir, local or gs://): start from
    # those parameters with a fresh optimizer and data position.
    resume_from: str = ""
    overwrite: bool = False  # replace the checkpoints of another run or model in run.output_dir


@dataclasses.dataclass
class Config:
    task: str = "llm"
    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    runtime: RuntimeConfig = dataclasses.field(default_factory=RuntimeConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    model: TransformerConfig = dataclasses.field(default_factory=TransformerConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)


@dataclasses.dataclass
class DiffusionConfig:
    schedule: str = "cosine"  # of alpha_bar: cosine or linear
    timesteps: int = 1000
    target: str = "v"  # what the UNet predicts: eps or v
    min_snr_gamma: float = 5.0  # min-SNR-gamma loss weighting; 0: plain mean squared error
    label_dropout: float = 0.1  # share of training labels replaced by "no label", for classifier-free guidance
    sample_steps: int = 50  # sampler steps for the eval grid (and `pretrain sample`'s default)
    eta: float = 0.0  # 0: deterministic DDIM, 1: DDPM
    guidance: float = 1.0  # classifier-free guidance weight; 1: the plain conditional model
    sample_num: int = 40  # images in the eval grid


@dataclasses.dataclass
class DiffusionRun(Config):
    """The config of a diffusion run: the shared sections, a UNet for the model, image data, and
    the diffusion process."""

    task: str = "diffusion"
    model: UNetConfig = dataclasses.field(default_factory=UNetConfig)
    data: ImageDataConfig = dataclasses.field(default_factory=ImageDataConfig)
    diffusion: DiffusionConfig = dataclasses.field(default_factory=DiffusionConfig)


CONFIGS = {"llm": Config, "diffusion": DiffusionRun}  # by `task`


# --- building a config from YAML and overrides --------------------------------------------


def _key(field_name: str) -> str:
    """The config key of a field: a Python keyword (`async`) is spelt with a trailing _ in code."""
    return field_name[:-1] if keyword.iskeyword(field_name[:-1]) else field_name


def _field(key: str) -> str:
    return key + "_" if keyword.iskeyword(key) else key


def _all_keys(cls, prefix=""):
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(hint):
            yield from _all_keys(hint, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{_key(f.name)}"


def _unknown(key: str, cls=Config) -> ConfigError:
    near = difflib.get_close_matches(key, list(_all_keys(cls)), n=1, cutoff=0.5)
    hint = f"; did you mean '{near[0]}'?" if near else ""
    return ConfigError(f"unknown config key '{key}'{hint}")


def _convert(key: str, hint, value, root):
    """Coerce a YAML value or a command-line string to the field's type, or say why not."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        return _convert(key, next(a for a in args if a is not type(None)), value, root)
    if origin is list:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}' wants a list, got {value!r}")
        return [_convert(f"{key}[{i}]", args[0], v, root) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' wants a mapping, got {value!r}")
        return _build(hint, value, f"{key}.", root)
    try:
        if hint is bool:
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                return value.lower() in ("true", "1", "yes")
            if isinstance(value, bool):
                return value
            raise ValueError
        if hint is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if hint is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if hint is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            return str(value)
    except ValueError:
        raise ConfigError(f"config key '{key}' wants {hint.__name__}, got {value!r}") from None
    raise TypeError(f"unsupported config type {hint} for {key}")


def _build(cls, values: dict, prefix: str = "", root=Config):
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        name = _field(key)
        if name not in hints:
            raise _unknown(prefix + key, root)
        kwargs[name] = _convert(prefix + key, hints[name], value, root)
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field is missing
        raise ConfigError(f"config section '{prefix.rstrip('.') or 'root'}': {e}") from None


def _set(tree: dict, dotted: str, value):
    *parents, leaf = dotted.split(".")
    for p in parents:
        node = tree.setdefault(p, {})
        if not isinstance(node, dict):
            raise _unknown(dotted)
        tree = node
    tree[leaf] = value


def preset_path(family: str, name: str) -> Path:
    return CONFIG_DIR / family / f"{name}.yaml"


def load(path: str | Path, overrides: typing.Sequence[str] = ()) -> Config:
    """Read a YAML preset, apply key=value overrides, type-check everything."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' not found; pass a YAML file such as {preset_path('llm', 'smoke')}")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file '{path}' is not valid YAML: {str(e).splitlines()[0]}") from None
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}' is not key=value, e.g. run.steps=100")
        _set(tree, key.strip(), value)
    return from_dict(tree)


def from_dict(tree: dict) -> Config:
    """A typed Config from plain data (YAML or a checkpoint's JSON), every value checked; its
    `task` picks the schema (CONFIGS)."""
    task = tree.get("task", "llm")
    if task not in CONFIGS:
        raise ConfigError(f"task='{task}' is not known; use one of {sorted(CONFIGS)}")
    return _build(CONFIGS[task], tree, root=CONFIGS[task])


def to_dict(cfg) -> dict:
    """The config as plain data under its key names (the inverse of loading it)."""
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            value = to_dict(value)
        elif isinstance(value, list):
            value = [dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for v in value]
        out[_key(f.name)] = value
    return out


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


# --- validation ----------------------------------------------------------------------------


def mesh_shape(cfg: Config, num_devices: int) -> tuple[int, int]:
    """(data, model) with -1 resolved against the device count."""
    data, model = cfg.mesh.data, cfg.mesh.model
    if (data == -1) + (model == -1) > 1:
        raise ConfigError("only one of mesh.data and mesh.model may be -1")
    for key, v in (("mesh.data", data), ("mesh.model", model)):
        if v == 0 or v < -1:
            raise ConfigError(f"{key}={v} must be a positive size or -1")
    if data == -1 or model == -1:
        known = model if data == -1 else data
        if num_devices % known:
            raise ConfigError(f"mesh: {num_devices} devices do not divide by {known}; change mesh.data/mesh.model")
        data, model = (num_devices // known, model) if data == -1 else (data, num_devices // known)
    if data * model != num_devices:
        raise ConfigError(
            f"mesh.data x mesh.model = {data} x {model} = {data * model}, but there are {num_devices} devices; "
            "make the product equal the device count (or set one of them to -1)"
        )
    return data, model


def _require(ok: bool, message: str):
    if not ok:
        raise ConfigError(message)


def validate(cfg: Config, num_devices: int, platform: str) -> tuple[int, int]:
    """Check everything that would otherwise fail later, deep inside a compile. Returns the mesh shape."""
    _require(cfg.task in CONFIGS, f"task='{cfg.task}' is not known; use one of {sorted(CONFIGS)}")
    _require(cfg.run.steps > 0, f"run.steps={cfg.run.steps} must be positive")
    _require(cfg.optim.lr > 0, f"optim.lr={cfg.optim.lr} must be positive")
    _require(cfg.optim.warmup_steps >= 0, "optim.warmup_steps must be >= 0")
    _require(cfg.train.log_every > 0, "train.log_every must be positive")
    _require(cfg.train.microbatches > 0, "train.microbatches must be positive")
    _require(0 <= cfg.train.ema_decay < 1, f"train.ema_decay={cfg.train.ema_decay} must be in [0, 1); 0 turns the EMA off")
    p = cfg.train.profile_steps
    _require(
        not p or (len(p) == 2 and 1 <= p[0] <= p[1] <= cfg.run.steps),
        f"train.profile_steps={p} must be [start, end] with 1 <= start <= end <= run.steps={cfg.run.steps}, or [] for none",
    )
    data, model = mesh_shape(cfg, num_devices)

    m = cfg.model
    _require(m.remat in REMAT_POLICIES, f"model.remat='{m.remat}' is unknown; use one of {sorted(REMAT_POLICIES)}")
    _require(
        not (m.remat == "offload" and platform == "cpu"),
        "model.remat=offload needs host offload, which the CPU backend lacks; use model.remat=full or dots",
    )
    _require(m.dtype in ("float32", "bfloat16", "float16"), f"model.dtype='{m.dtype}' must be float32, bfloat16 or float16")
    _require(cfg.data.workers >= 0, f"data.workers={cfg.data.workers} must be >= 0")
    for key in ("every", "keep", "keep_every"):
        _require(getattr(cfg.checkpoint, key) >= 0, f"checkpoint.{key}={getattr(cfg.checkpoint, key)} must be >= 0")
    per_step = data * cfg.train.microbatches
    _require(
        cfg.train.global_batch % per_step == 0,
        f"train.global_batch={cfg.train.global_batch} is not divisible by the data axis x microbatches "
        f"({data} x {cfg.train.microbatches} = {per_step}); change train.global_batch",
    )
    for i, g in enumerate(cfg.optim.groups):
        try:
            re.compile(g.pattern)
        except re.error as e:
            raise ConfigError(f"optim.groups[{i}].pattern '{g.pattern}' is not a valid regex: {e}") from None
    if cfg.task == "llm":
        _validate_transformer(cfg, data, model, platform)
    else:
        _validate_unet(cfg, data, model)
    return data, model


DISTRIBUTED_MODES = ("auto", "explicit", "off")


def validate_runtime(r: RuntimeConfig):
    """The process-level keys, checked before JAX starts (runtime.setup)."""
    _require(r.distributed in DISTRIBUTED_MODES,
             f"runtime.distributed='{r.distributed}' is unknown; use one of {list(DISTRIBUTED_MODES)}")
    if r.distributed == "explicit":
        _require(re.fullmatch(r"[^:\s]+:\d+", r.coordinator) is not None,
                 f"runtime.coordinator='{r.coordinator}' must be host:port of process 0 with runtime.distributed=explicit")
        _require(r.num_processes > 0, "runtime.num_processes must be positive with runtime.distributed=explicit")
        _require(0 <= r.process_id < r.num_processes,
                 f"runtime.process_id={r.process_id} must be in [0, runtime.num_processes={r.num_processes})")
    if r.fake_topology:
        _require(r.fake_cpu_devices > 0, f"runtime.fake_topology={r.fake_topology} lays out faked CPU devices; "
                                         "set runtime.fake_cpu_devices to the slice's chips per host")
        try:
            tpu.parse(r.fake_topology)
        except tpu.TpuError as e:
            raise ConfigError(f"runtime.fake_topology: {e}") from None
    for key in ("init_timeout_s", "heartbeat_timeout_s"):
        _require(getattr(r, key) > 0, f"runtime.{key}={getattr(r, key)} must be positive")
    _require(r.step_timeout_s >= 0, f"runtime.step_timeout_s={r.step_timeout_s} must be >= 0 (0: no watchdog)")


AUTO_ATTENTION = {"tpu": "splash", "gpu": "cudnn"}  # model.attention=auto by platform; xla elsewhere


def _validate_transformer(cfg: Config, data: int, model: int, platform: str):
    m = cfg.model
    if m.attention == "auto":  # resolved here, so that the run's config.yaml names the backend it ran
        m.attention = AUTO_ATTENTION.get(platform, "xla")
    known = sorted(BACKENDS) + ["auto"]
    _require(m.attention in known, f"model.attention='{m.attention}' is unknown; use one of {known}")
    _require(
        not (m.attention == "cudnn" and platform != "gpu"),
        f"model.attention=cudnn needs an NVIDIA GPU (this is {platform}); use model.attention=xla",
    )
    for key in ("num_layers", "embed_dim", "num_heads", "num_kv_heads", "head_dim", "mlp_dim", "vocab_size", "max_seq_len", "loss_chunk_tokens"):
        _require(getattr(m, key) > 0, f"model.{key} must be positive")
    _require(m.head_dim % 2 == 0, f"model.head_dim={m.head_dim} must be even for rotary embeddings")
    _require(
        m.num_heads % m.num_kv_heads == 0,
        f"model.num_kv_heads={m.num_kv_heads} must divide model.num_heads={m.num_heads}",
    )
    for key in ("num_heads", "mlp_dim", "vocab_size"):
        _require(
            getattr(m, key) % model == 0,
            f"model.{key}={getattr(m, key)} is not divisible by the model axis ({model}); "
            f"change model.{key} or mesh.model",
        )
    _require(
        m.num_kv_heads < model or m.num_kv_heads % model == 0,
        f"model.num_kv_heads={m.num_kv_heads} is not divisible by the model axis ({model}); "
        "use a multiple of it, or fewer kv heads than it (they are then replicated)",
    )
    _require(
        m.embed_dim % data == 0,
        f"model.embed_dim={m.embed_dim} is not divisible by the data axis ({data}), which shards parameters (FSDP)",
    )
    _require(
        cfg.data.seq_len <= m.max_seq_len,
        f"data.seq_len={cfg.data.seq_len} exceeds model.max_seq_len={m.max_seq_len}; lower data.seq_len",
    )
    _require(cfg.data.seq_len > 0, "data.seq_len must be positive")
    if m.attention == "splash":
        _validate_splash(cfg, platform)


def _validate_splash(cfg: Config, platform: str):
    m, length = cfg.model, cfg.data.seq_len
    _require(
        platform in ("tpu", "cpu"),
        f"model.attention=splash is a TPU kernel (this is {platform}); use model.attention=auto",
    )
    blocks = splash_blocks(length, m.splash_block_q, m.splash_block_kv)
    for key, block in zip(("splash_block_q", "splash_block_kv"), blocks):
        _require(
            block % 128 == 0 and length % block == 0,
            f"model.attention=splash: its blocks of {block} tokens (model.{key}={getattr(m, key)}, capped at "
            f"data.seq_len={length}) must be a multiple of 128 that divides data.seq_len; change data.seq_len or "
            f"model.{key}, or use model.attention=xla",
        )


def _validate_unet(cfg: DiffusionRun, data: int, model: int):
    m, d = cfg.model, cfg.diffusion
    for key in ("image_size", "base_channels", "blocks_per_resolution", "num_heads", "groups"):
        _require(getattr(m, key) > 0, f"model.{key}={getattr(m, key)} must be positive")
    _require(m.channels in (1, 3), f"model.channels={m.channels} must be 1 (grayscale) or 3 (RGB)")
    _require(m.num_classes >= 0, f"model.num_classes={m.num_classes} must be >= 0 (0: unconditional)")
    _require(bool(m.channel_mults) and min(m.channel_mults) > 0, "model.channel_mults must be a non-empty list of positive ints")
    downsamples = len(m.channel_mults) - 1
    _require(
        m.image_size % 2**downsamples == 0,
        f"model.image_size={m.image_size} is not divisible by 2^{downsamples}={2**downsamples}, which the "
        f"{downsamples} downsamples of model.channel_mults={m.channel_mults} need; change one of them",
    )
    for r in m.attention_resolutions:
        _require(
            r in m.resolutions,
            f"model.attention_resolutions has {r}, which is not among the model's resolutions {m.resolutions}; "
            "list only those",
        )
    for mult in sorted(set(m.channel_mults)):
        c = m.base_channels * mult
        where = f"channels={c} (model.base_channels x {mult})"
        _require(c % m.groups == 0, f"{where} are not divisible by model.groups={m.groups}; change model.groups")
        _require(c % model == 0, f"{where} are not divisible by the model axis ({model}); change model.base_channels or mesh.model")
        _require(c % data == 0, f"{where} are not divisible by the data axis ({data}), which shards parameters (FSDP); "
                                "change model.base_channels or mesh.data")
        _require(c % m.num_heads == 0, f"{where} are not divisible by model.num_heads={m.num_heads}; change model.num_heads")
    _require(d.schedule in SCHEDULES, f"diffusion.schedule='{d.schedule}' is unknown; use one of {list(SCHEDULES)}")
    _require(d.target in TARGETS, f"diffusion.target='{d.target}' is unknown; use one of {list(TARGETS)}")
    _require(d.timesteps > 1, f"diffusion.timesteps={d.timesteps} must be at least 2")
    _require(d.min_snr_gamma >= 0, f"diffusion.min_snr_gamma={d.min_snr_gamma} must be >= 0 (0: off)")
    _require(0 <= d.label_dropout < 1, f"diffusion.label_dropout={d.label_dropout} must be in [0, 1)")
    _require(0 < d.sample_steps <= d.timesteps, f"diffusion.sample_steps={d.sample_steps} must be in [1, diffusion.timesteps]")
    _require(0 <= d.eta <= 1, f"diffusion.eta={d.eta} must be in [0, 1] (0: DDIM, 1: DDPM)")
    _require(d.guidance >= 0, f"diffusion.guidance={d.guidance} must be >= 0")
    _require(
        d.sample_num > 0 and d.sample_num % data == 0,
        f"diffusion.sample_num={d.sample_num} must be a positive multiple of the data axis ({data})",
    )
    _require(0 <= cfg.data.val_fraction < 1, f"data.val_fraction={cfg.data.val_fraction} must be in [0, 1)")
