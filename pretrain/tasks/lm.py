"""The language-model task: a Llama-style decoder on packed token rows (one prepared dataset or a
weighted mixture), with the vocabulary-parallel chunked cross-entropy."""

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from etils import epath

from data import corpus, pipeline, records
from data import tokenizer as tokenizer_lib
from models.attention import BACKENDS, causal_share, splash_blocks
from models.configs import REMAT_CHOICES, ROPE_SCALINGS, RopeScaling
from models.layers import REMAT_POLICIES
from models.transformer import Transformer
from pretrain.config import ConfigError, require
from pretrain.config.schema import LanguageModelRun
from pretrain.evals import harness
from pretrain.run import checkpoint
from pretrain.tasks.base import Task, check_execution
from pretrain.train import sharding
from pretrain.train.loss import output_cross_entropy


AUTO_ATTENTION = {"tpu": "splash", "gpu": "cudnn"}  # model.attention=auto by platform; xla elsewhere

# Which forward work a remat policy makes the backward pass do again: (weight matmuls, attention).
# Attention is recomputed unless its einsums are saved, which splash's kernel never is.
RECOMPUTED = {"none": (0, 0), "full": (1, 1), "dots": (0, 0), "dots_no_batch": (0, 1), "offload": (0, 1)}


def recomputed(m) -> tuple[float, int]:
    """(share of the layers' weight matmuls, of attention) that the backward pass computes again. Under
    remat=custom a projection is recomputed unless its output is kept; attention always is (the
    output projection's weight gradient needs its output, which no name keeps)."""
    if m.remat != "custom":
        return RECOMPUTED[m.remat]
    e, h, k, d, f = m.embed_dim, m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim
    flops = {"qkv": e * (h + 2 * k) * d, "out_proj": h * d * e, "mlp_in": 2 * e * f, "mlp_out": f * e}
    kept = dataclasses.asdict(m.remat_custom)
    return sum(v for name, v in flops.items() if kept[name] == "remat") / sum(flops.values()), 1


def _check_transformer(cfg: LanguageModelRun, data: int, model: int, platform: str):
    m = cfg.model
    known = sorted(BACKENDS) + ["auto"]
    require(m.attention in known, f"model.attention='{m.attention}' is unknown; use one of {known}")
    require(
        not (m.attention == "cudnn" and platform != "gpu"),
        f"model.attention=cudnn needs an NVIDIA GPU (this is {platform}); use model.attention=xla",
    )
    for key in ("num_layers", "embed_dim", "num_heads", "num_kv_heads", "head_dim", "mlp_dim", "vocab_size", "max_seq_len", "loss_chunk_tokens"):
        require(getattr(m, key) > 0, f"model.{key} must be positive")
    require(m.head_dim % 2 == 0, f"model.head_dim={m.head_dim} must be even for rotary embeddings")
    _check_rope_scaling(m.rope_scaling)
    for name, choice in dataclasses.asdict(m.remat_custom).items():
        require(choice in REMAT_CHOICES, f"model.remat_custom.{name}='{choice}' is unknown; use one of {list(REMAT_CHOICES)}")
    require(
        m.num_heads % m.num_kv_heads == 0,
        f"model.num_kv_heads={m.num_kv_heads} must divide model.num_heads={m.num_heads}",
    )
    for key in ("num_heads", "mlp_dim", "vocab_size"):
        require(
            getattr(m, key) % model == 0,
            f"model.{key}={getattr(m, key)} is not divisible by the model axis ({model}); "
            f"change model.{key} or mesh.model",
        )
    split = cfg.mesh.residual_split
    if split != "none":
        key, size = ("data.seq_len", cfg.data.seq_len) if split == "length" else ("model.embed_dim", m.embed_dim)
        require(size % model == 0, f"mesh.residual_split={split} splits {key}={size} over the model axis ({model}), "
                f"which does not divide it; change {key} or mesh.model")
    require(
        m.num_kv_heads < model or m.num_kv_heads % model == 0,
        f"model.num_kv_heads={m.num_kv_heads} is not divisible by the model axis ({model}); "
        "use a multiple of it, or fewer kv heads than it (they are then replicated)",
    )
    require(
        m.embed_dim % data == 0,
        f"model.embed_dim={m.embed_dim} is not divisible by the data axis ({data}), which shards parameters (FSDP)",
    )
    require(
        cfg.data.seq_len <= m.max_seq_len,
        f"data.seq_len={cfg.data.seq_len} exceeds model.max_seq_len={m.max_seq_len}; lower data.seq_len",
    )
    require(cfg.data.seq_len > 0, "data.seq_len must be positive")
    if m.attention == "splash":
        _check_splash(cfg, platform)
    for key in ("harness_every", "harness_limit"):
        require(getattr(cfg.eval, key) >= 0, f"eval.{key}={getattr(cfg.eval, key)} must be >= 0")
    require(cfg.eval.harness_num_fewshot >= -1,
            f"eval.harness_num_fewshot={cfg.eval.harness_num_fewshot} must be >= 0, or -1 for each task's own")


def _check_mixture(d):
    """data.sources, its names already resolved."""
    if not d.sources:
        return
    require(d.source != "synthetic", "data.sources and data.source=synthetic exclude each other; drop one")
    for i, s in enumerate(d.sources):
        require(s.path, f"data.sources[{i}] has no path; give the directory of a prepared text dataset")
        require(s.weight > 0, f"data.sources[{i}] ({s.name}) has weight {s.weight}; weights must be positive")
    names = [s.name for s in d.sources]
    twice = sorted({n for n in names if names.count(n) > 1})
    require(not twice, f"data.sources names {twice} more than one dataset; give each a distinct name")


def _check_rope_scaling(s: RopeScaling):
    require(s.type in ROPE_SCALINGS, f"model.rope_scaling.type='{s.type}' is unknown; use one of {list(ROPE_SCALINGS)}")
    if s.type == "none":
        return
    require(s.factor >= 1, f"model.rope_scaling.factor={s.factor} must be >= 1 (how many times longer the context gets)")
    if s.type == "llama3":
        require(0 < s.low_freq_factor < s.high_freq_factor,
                f"model.rope_scaling: low_freq_factor={s.low_freq_factor} and high_freq_factor={s.high_freq_factor} "
                "must satisfy 0 < low < high (Llama 3.1 uses 1 and 4)")
        require(s.original_max_position_embeddings > 0, "model.rope_scaling.original_max_position_embeddings must be "
                                                         "positive (the context of pretraining, 8192 for Llama 3)")


def _check_resumed_tokenizer(cfg: LanguageModelRun, tokenizer: tokenizer_lib.Tokenizer | None):
    """Continued pretraining must read text as the weights learnt it: the data's tokenizer is the one
    kept with the parameters of checkpoint.resume_from, where that run kept one."""
    wanted = cfg.checkpoint.resume_from
    if not wanted or wanted.isdigit() or tokenizer is None:
        return
    try:
        directory, _ = checkpoint.locate(wanted)
    except ConfigError:
        return  # the starting point (pretrain/run/checkpoint.py) reports a path without checkpoints
    theirs = tokenizer_lib.read(checkpoint.run_dir(directory))
    require(theirs is None or theirs.same_ids(tokenizer),
            f"data.source={cfg.data.source} was tokenised with another tokenizer than the one of checkpoint.resume_from="
            f"{wanted}; prepare the data with `pretrain prepare text --tokenizer {checkpoint.run_dir(directory)}`")


def _check_splash(cfg: LanguageModelRun, platform: str):
    m, length = cfg.model, cfg.data.seq_len
    require(
        platform in ("tpu", "cpu"),
        f"model.attention=splash is a TPU kernel (this is {platform}); use model.attention=auto",
    )
    blocks = splash_blocks(length, m.splash_block_q, m.splash_block_kv)
    for key, block in zip(("splash_block_q", "splash_block_kv"), blocks):
        require(
            block % 128 == 0 and length % block == 0,
            f"model.attention=splash: its blocks of {block} tokens (model.{key}={getattr(m, key)}, capped at "
            f"data.seq_len={length}) must be a multiple of 128 that divides data.seq_len; change data.seq_len or "
            f"model.{key}, or use model.attention=xla",
        )



class LanguageModelTask(Task):
    unit = "tokens"
    model_class = Transformer

    @staticmethod
    def resolve(cfg: LanguageModelRun, mesh_shape: tuple[int, int], platform: str) -> LanguageModelRun:
        """The config checked for this model on this mesh and platform, with `auto` attention
        resolved (a new config: the run's config.yaml then names the backend it ran)."""
        if cfg.model.attention == "auto":
            attention = AUTO_ATTENTION.get(platform, "xla")
            cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, attention=attention))
        if any(not s.name for s in cfg.data.sources):  # a dataset is named by its directory
            named = [dataclasses.replace(s, name=s.name or s.path.rstrip("/").rsplit("/", 1)[-1]) for s in cfg.data.sources]
            cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, sources=named))
        check_execution(cfg.model, platform, (*REMAT_POLICIES, "custom"))  # custom: the layers name their tensors
        _check_transformer(cfg, *mesh_shape, platform)
        _check_mixture(cfg.data)
        return cfg

    @staticmethod
    def axis_rules(cfg: LanguageModelRun, model_axis: int) -> tuple:
        """The shared rules, with the kv heads replicated where the model axis outgrows them and the
        residual stream split as mesh.residual_split says."""
        return sharding.axis_rules(cfg.model.num_kv_heads, model_axis, cfg.mesh.residual_split)

    def __init__(self, cfg: LanguageModelRun):
        super().__init__(cfg)
        self.tokenizer = None  # the dataset's data.tokenizer.Tokenizer, once opened (none for synthetic data)
        self.harness_tasks = None  # eval.harness_tasks, loaded (pretrain/evals/harness.py)

    def loss(self, model, batch, mesh, rules, key=None):
        """(summed loss, number of target tokens, summed metrics) over a batch; needs no randomness.
        A mixture's batch also counts its target tokens per dataset (the metrics' "units")."""
        hidden = model(batch["inputs"], batch["segment_ids"], batch["positions"])
        mask = (batch["segment_ids"] > 0).astype(jnp.float32)
        total, ce_sum, z_sum = output_cross_entropy(
            hidden, model.output_weight(), batch["targets"], mask, z_loss=self.cfg.optim.z_loss,
            chunk_tokens=self.cfg.model.loss_chunk_tokens, mesh=mesh, rules=rules,
        )
        sums = {"loss": ce_sum, "z_loss": z_sum}
        if "dataset_ids" in batch:
            ids = batch["dataset_ids"]
            sums["units"] = jnp.stack([jnp.sum(mask * (ids == j)) for j in range(len(self.cfg.data.sources))])
        return total, jnp.sum(mask), sums

    def units_per_step(self) -> int:
        return self.cfg.train.global_batch * self.cfg.data.seq_len

    def flops_per_step(self) -> float:
        return self.cfg.model.flops_per_token(self.cfg.data.seq_len) * self.units_per_step()

    def planned_flops(self) -> dict[str, float]:
        """MFU counted as MaxText counts it, 6 FLOPs per matmul parameter and token plus attention over
        the whole sequence (the train logs' count), and with causal attention ("causal": half of that
        attention). Executed: the MFU count plus what remat recomputes (the forward pass is a third of
        the count), attention halved under splash, whose kernels skip the blocks above the diagonal and
        run where the program's text does not show them ("hidden"), and under xla the share of the
        scores its query blocks compute."""
        m, tokens, model_flops = self.cfg.model, self.units_per_step(), self.flops_per_step()
        head = 6 * m.embed_dim * m.vocab_size * tokens
        attention = 12 * m.num_layers * m.num_heads * m.head_dim * self.cfg.data.seq_len * tokens
        matmuls, recomputed_attention = recomputed(m)
        splash = m.attention == "splash"
        if splash and m.remat != "none":
            recomputed_attention = 1
        share = 0.5 if splash else causal_share(self.cfg.data.seq_len) if m.attention == "xla" else 1.0
        attention_executed = attention * (1 + recomputed_attention / 3) * share
        executed = model_flops - attention + matmuls * (model_flops - head - attention) / 3 + attention_executed
        return {"model": model_flops, "executed": executed, "hidden": attention_executed if splash else 0.0,
                "causal": model_flops - attention / 2}

    def batch_shapes(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        shape = (self.cfg.train.global_batch, self.cfg.data.seq_len)
        names = ("inputs", "targets", "segment_ids", "positions") + (("dataset_ids",) if self.cfg.data.sources else ())
        return {k: (shape, np.dtype(np.int32)) for k in names}

    def open_data(self, model_axis: int):
        """Open (and for the embedded corpus, build once) the prepared dataset, or each dataset of a
        mixture, and check it against the model. Bad data raises ConfigError or DataError here, before
        the run writes anything."""
        d, m = self.cfg.data, self.cfg.model
        if self.cfg.eval.harness_tasks and self.harness_tasks is None:
            if d.source == "synthetic":
                raise ConfigError("eval.harness_tasks needs the model's tokenizer, which synthetic data lacks; train on text")
            self.harness_tasks = harness.load_tasks(self.cfg.eval.harness_tasks)
        if d.source == "synthetic" or self.sources is not None:
            return
        if d.sources:
            return self._prepare_mixture(model_axis)
        if d.source == "stdlib":
            directory = corpus.stdlib_dataset(
                d.cache_dir, vocab_size=m.vocab_size, seq_len=d.seq_len,
                max_bytes=int(d.max_corpus_mb * 2**20), val_fraction=d.val_fraction,
            )
        else:
            directory = epath.Path(d.source)  # local or gs://, read in place
        _, sources = self._open(directory, f"data.source={d.source}", model_axis)
        self._one_dataset(sources)

    def _open(self, directory, label: str, model_axis: int) -> tuple[dict, dict]:
        """(manifest, split -> source) of one prepared text dataset, checked against the model."""
        d, m = self.cfg.data, self.cfg.model
        manifest = records.read_manifest(directory, "text")
        self.tokenizer = tokenizer_lib.read(directory)
        _check_resumed_tokenizer(self.cfg, self.tokenizer)
        vocab = manifest["vocab_size"]
        padded = -(-vocab // model_axis) * model_axis
        if m.vocab_size not in (vocab, padded):
            pad_note = f" (its {vocab} pieces padded to a multiple of the model axis, {model_axis})" if padded != vocab else ""
            raise ConfigError(
                f"model.vocab_size={m.vocab_size} does not match the tokenizer of {label}; set model.vocab_size={padded}{pad_note}"
            )
        if manifest["seq_len"] > d.seq_len:
            raise ConfigError(
                f"data.seq_len={d.seq_len} is shorter than the pieces prepared in {label} (up to {manifest['seq_len']} "
                f"tokens), which cannot be packed into rows; set data.seq_len>={manifest['seq_len']} or prepare again "
                f"with --seq-len {d.seq_len}"
            )
        sources = {split: records.open_split(directory, manifest, split) for split in ("train", "validation")}
        if sources["train"] is None:
            raise ConfigError(f"{label} has no training records; prepare it with more text")
        return manifest, sources

    def _prepare_mixture(self, model_axis: int):
        """data.sources: one tokenizer for all; each dataset's weight, a share of tokens, becomes a share
        of records by its mean targets per record."""
        opened, first = [], None
        for i, s in enumerate(self.cfg.data.sources):
            label = f"data.sources[{i}] ({s.name}: {s.path})"
            manifest, sources = self._open(epath.Path(s.path), label, model_axis)
            if first is None:
                first = (label, manifest["tokenizer_sha256"], s.path)
            elif manifest["tokenizer_sha256"] != first[1]:
                raise ConfigError(f"{first[0]} and {label} were prepared with different tokenizers; prepare {s.path} "
                                  f"again with the first's: `pretrain prepare text --tokenizer {first[2]} ...`")
            train = manifest["splits"]["train"]
            opened.append((s, sources, (train["tokens"] - train["documents"]) / train["records"]))
        weights = [s.weight / targets for s, _, targets in opened]
        shares = [w / sum(weights) for w in weights]
        self.sources = {"train": pipeline.Mixture([src["train"] for _, src, _ in opened], shares)}
        self.held_out = {s.name: src["validation"] for s, src, _ in opened if src["validation"] is not None}
        self.passes = [(f"epoch/{s.name}", share, len(src["train"])) for (s, src, _), share in zip(opened, shares)]

    @staticmethod
    def _record(position: int) -> int:
        return pipeline.text_record(position)

    def _synthetic(self, rows: Sequence[int]):
        c = self.cfg
        return pipeline.synthetic_text_rows(vocab_size=c.model.vocab_size, seq_len=c.data.seq_len,
                                            global_batch=c.train.global_batch, rows=rows, seed=c.run.seed)

    def _pipeline(self, source, train: bool, **kwargs):
        return pipeline.text_rows(source, seq_len=self.cfg.data.seq_len, **kwargs)

    def eval_metrics(self, loss: float) -> dict:
        return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0))}

    def write_samples(self, model, step: int, local_dir: Path) -> dict[str, float]:
        """Nothing: `pretrain sample` generates text from any checkpoint."""
        return {}

    def downstream_every(self) -> int | None:
        return self.cfg.eval.harness_every if self.cfg.eval.harness_tasks else None

    def downstream(self, model) -> dict[str, float]:
        """eval.harness_tasks scored on the run's mesh, a training step's rows per forward pass."""
        e, t = self.cfg.eval, self.cfg.train
        lm = harness.make_lm(model, self.tokenizer, t.global_batch // t.microbatches)
        results = harness.evaluate(lm, self.harness_tasks, num_fewshot=None if e.harness_num_fewshot < 0 else e.harness_num_fewshot,
                                   limit=e.harness_limit, progress=False)
        return harness.metric_row(results)

