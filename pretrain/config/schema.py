"""The run's configuration schema: typed sections with their defaults, one config type per task.
Plain dataclasses with no JAX behind them, so launchers and tools read configs without loading a
framework; loading and checking them is the config package's job.
"""

import dataclasses

from models.configs import TransformerConfig, UNetConfig


@dataclasses.dataclass
class WandbConfig:
    """Weights & Biases (pretrain/metrics/wandb.py): the log rows and the resolved config."""

    mode: str = "disabled"  # online, offline (files under run.output_dir/wandb, `wandb sync` later) or disabled
    project: str = ""
    entity: str = ""  # "": the API key's default


@dataclasses.dataclass
class RunConfig:
    name: str = "run"
    seed: int = 0
    steps: int = 100
    output_dir: str = "runs/run"
    # Names one launch of the run; its retries (tpu_vm.sh --retries, a JobSet restart, a Slurm
    # requeue) pass the same id, so that checkpoint.overwrite=true clears only what a different
    # launch left and a retry resumes. The launchers set it; "": every start is a new launch.
    launch_id: str = ""
    wandb: WandbConfig = dataclasses.field(default_factory=WandbConfig)


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
    # Language model: the residual stream between the layers' matmuls split over `model` along its
    # positions (`length`: sequence parallelism) or its width (`embed`, as MaxText), or not (`none`).
    residual_split: str = "none"


@dataclasses.dataclass
class DataSource:
    """One dataset of a mixture (data.sources)."""

    path: str  # a directory (local or gs://) from `pretrain prepare text`
    weight: float = 1.0  # its share of the training tokens, relative to the other sources' weights
    name: str = ""  # in metrics (tokens/NAME, eval_loss/NAME); "": the path's last part

    @classmethod
    def from_string(cls, text: str) -> "DataSource":
        """The command line's shorthand NAME=PATH:WEIGHT (a list of them, comma-separated)."""
        name, _, rest = text.partition("=")
        path, _, weight = rest.rpartition(":")
        try:
            return cls(path=path, weight=float(weight), name=name)
        except ValueError:
            raise ValueError(f"'{text}' is not NAME=PATH:WEIGHT, e.g. web=gs://bucket/web:0.7") from None


@dataclasses.dataclass
class DataConfig:
    # stdlib: the Python standard library's sources, prepared on first use; synthetic: random
    # ids of the right shape; anything else: a directory (local or gs://) from `pretrain prepare`.
    source: str = "stdlib"
    # Several prepared datasets mixed by weight (they replace data.source), all with one tokenizer:
    # a YAML list of {path, weight, name}, or NAME=PATH:WEIGHT,... on the command line.
    sources: list[DataSource] = dataclasses.field(default_factory=list)
    # 0: every dataset repeats (reshuffled each time) for as long as the run goes; N: the run ends,
    # with a checkpoint, before the first step whose batch it cannot fill once a dataset was read N times.
    num_epochs: int = 0
    seq_len: int = 128
    # Threads that read and pack this process's rows (lanes) in parallel (0: one after another), each
    # lane with its next 16 records in flight at once; neither this nor prefetch changes the batches.
    workers: int = 16
    prefetch: int = 4  # global batches read ahead of the loop by a thread (0: none)
    cache_dir: str = "~/.cache/pretrain"  # the prepared stdlib corpus (gs:// datasets are read in place)
    max_corpus_mb: float = 8.0  # stdlib: how much of it to read
    val_fraction: float = 0.02  # stdlib: share of documents held out


@dataclasses.dataclass
class ImageDataConfig:
    # digits: scikit-learn's bundled handwritten digits (1,797 8x8 images, 10 classes), upscaled;
    # synthetic: random images of the right shape; anything else: a directory (local or gs://),
    # either from `pretrain prepare images` or of PNG/JPEG files (class subdirectories give labels).
    source: str = "digits"
    workers: int = 0  # threads that decode and augment (0: the training thread); no effect on the batches
    prefetch: int = 2  # global batches read ahead of the loop by a thread (0: none); no effect on the batches
    augment: bool = True  # random horizontal flips (off for digits, which flipping changes)
    num_epochs: int = 0  # as data.num_epochs of a language model run
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
    # A step whose loss or gradient norm is not finite is skipped (nothing it computed is applied);
    # this many skipped in a row stop the run with exit code 4 (pretrain/run/runtime.py), and no
    # checkpoint is taken while the latest step was skipped.
    max_skipped_steps: int = 10


@dataclasses.dataclass
class CheckpointConfig:
    every: int = 0  # save every N steps; 0: only at the end (and on preemption)
    # Also save once this many minutes passed since the last save (0: never), by process 0's clock,
    # checked at log rows (train.log_every) and shared with every process.
    every_minutes: float = 30.0
    keep: int = 3  # most recent checkpoints kept; 0: all
    keep_every: int = 0  # also keep every Nth step for good; 0: none
    async_: bool = True  # `checkpoint.async`: write in the background while training goes on
    # "": resume from the latest checkpoint in run.output_dir, if any; a step number: that step;
    # a path (a run dir, its checkpoints/ dir or one step's dir, local or gs://): start from
    # those parameters with a fresh optimizer and data position.
    resume_from: str = ""
    overwrite: bool = False  # replace the checkpoints of another run or model in run.output_dir
    # The local tier: a directory on each host's own disk or memory (a local SSD, /dev/shm), where
    # every host writes the shards it holds every local_every steps or local_every_minutes, between
    # the saves to run.output_dir. "": none. A restart resumes from the newest step either tier holds
    # whole; a host that lost its directory (or was replaced) sends the run back to the persistent one.
    local_dir: str = ""
    local_every: int = 0
    local_every_minutes: float = 5.0


@dataclasses.dataclass
class Config:
    """What every run has, whatever it trains; a task's config adds its model and data."""

    task: str = ""
    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    runtime: RuntimeConfig = dataclasses.field(default_factory=RuntimeConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)


@dataclasses.dataclass
class EvalConfig:
    """Downstream evals during training (pretrain/evals/harness.py): lm-evaluation-harness tasks by
    name or task YAML path, scored every harness_every steps (0: at the end only), as log rows
    harness/TASK/METRIC."""

    harness_tasks: list[str] = dataclasses.field(default_factory=list)
    harness_every: int = 0
    harness_limit: int = 0  # the first N documents of each task; 0: all
    harness_num_fewshot: int = -1  # examples in each prompt; -1: each task's own


@dataclasses.dataclass
class LanguageModelRun(Config):
    """The config of a language-model run: a decoder transformer on token rows."""

    task: str = "llm"
    model: TransformerConfig = dataclasses.field(default_factory=TransformerConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)


@dataclasses.dataclass
class DiffusionConfig:
    schedule: str = "cosine"  # of alpha_bar: cosine, linear or scaled_linear (Stable Diffusion's)
    timesteps: int = 1000
    target: str = "v"  # what the UNet predicts: eps or v
    min_snr_gamma: float = 5.0  # min-SNR-gamma loss weighting; 0: plain mean squared error
    label_dropout: float = 0.1  # share of training labels (captions) replaced by "no label" (""), for guidance
    sample_steps: int = 50  # sampler steps for the eval grid (and `pretrain sample`'s default)
    eta: float = 0.0  # 0: deterministic DDIM, 1: DDPM
    # The sampler's timesteps, as diffusers' timestep_spacing: linspace, leading or trailing.
    spacing: str = "trailing"
    clip_sample: bool = True  # keep each step's predicted clean image in [-1, 1], as diffusers' clip_sample
    # diffusers' steps_offset (added to leading spacing's timesteps) and set_alpha_to_one (the last step
    # lands on alpha_bar 1, else on alpha_bar[0]); Stable Diffusion's schedulers have 1 and false.
    steps_offset: int = 0
    set_alpha_to_one: bool = True
    guidance: float = 1.0  # classifier-free guidance weight; 1: the plain conditional model
    sample_num: int = 40  # images in the eval grid
    prompts: list[str] = dataclasses.field(default_factory=list)  # of a text-to-image eval grid, cycled ("": none)


@dataclasses.dataclass
class DiffusionRun(Config):
    """The config of a diffusion run: a UNet for the model, image data, and the diffusion process."""

    task: str = "diffusion"
    model: UNetConfig = dataclasses.field(default_factory=UNetConfig)
    data: ImageDataConfig = dataclasses.field(default_factory=ImageDataConfig)
    diffusion: DiffusionConfig = dataclasses.field(default_factory=DiffusionConfig)


CONFIGS = {"llm": LanguageModelRun, "diffusion": DiffusionRun}  # by `task`
