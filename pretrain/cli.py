"""`pretrain` command line: train, smoke, plan, goodput, prepare, export, import-hf, sample; each command a
function of the package that does the work."""

import argparse
import json
import sys
import time

import jax
from etils import epath

from data.prepare.local import prepare_images, prepare_text
from data.records import DataError
from data.tokenizer import MODEL_TYPES

from pretrain import config as config_lib
from pretrain import formats
from pretrain.build import build
from pretrain.config import ConfigError, require
from pretrain.evals import harness
from pretrain.formats import weights
from pretrain.inference import digits_pipeline, encode, load, sample
from pretrain.run import checkpoint, goodput, runtime
from pretrain.tpu import devices as tpu_devices
from pretrain.train import loop
from pretrain.train.step import TrainStep

# `pretrain smoke FAMILY`: its preset, run on 8 faked CPU devices into runs/smoke-FAMILY.
SMOKE = {"llm": ("llm", "smoke"), "diffusion": ("diffusion", "smoke"), "text-to-image": ("diffusion", "smoke-text-to-image")}


def start(cfg: config_lib.Config) -> TrainStep:
    """This process's runtime started, the train step built over its devices, and the data opened."""
    runtime.setup(cfg)  # before anything asks JAX for its devices
    train_step = build(cfg, jax.devices())
    train_step.task.open_data(train_step.mesh.shape["model"])
    return train_step


def train(cfg_path, overrides) -> int:
    """Load and validate first (data, output dir, what to resume from); only then write anything, and
    train. Returns the exit code: 0 done, 4 diverged, 75 preempted (pretrain/run/runtime.py)."""
    started = time.time()
    train_step = start(config_lib.load(cfg_path, overrides))
    cfg = checkpoint.for_this_launch(train_step.cfg)  # resolved
    if cfg.checkpoint.overwrite != train_step.cfg.checkpoint.overwrite and jax.process_index() == 0:
        print(f"run.launch_id={cfg.run.launch_id} wrote {cfg.run.output_dir}: a retry of this launch resumes "
              "(checkpoint.overwrite applies to its first start only)")
    checkpoint.check_output_dir(cfg)
    starting_point = checkpoint.starting_point(cfg)
    runtime.wait_for_all("planned", cfg.runtime.init_timeout_s)  # every process read the run dir before it changes
    if jax.process_index() == 0:
        if cfg.checkpoint.overwrite:
            checkpoint.clear_output_dir(cfg)
        out = epath.Path(cfg.run.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(config_lib.to_yaml(cfg))
        tokenizer = getattr(train_step.task, "tokenizer", None)
        if tokenizer is not None:  # export and sample find it here
            tokenizer.write(out)
    try:
        result = loop.fit(train_step, starting_point, started)
    except loop.Diverged as e:
        print(f"error: {e}", file=sys.stderr)
        return runtime.DIVERGED_EXIT_CODE
    return runtime.PREEMPTED_EXIT_CODE if result["preempted"] else 0


def smoke(family: str, overrides) -> int:
    """The family's smoke preset; the text-to-image one makes its data (digits_pipeline) on its first start."""
    path = config_lib.preset_path(*SMOKE[family])
    overrides = ["runtime.fake_cpu_devices=8", f"run.output_dir=runs/smoke-{family}", *overrides]
    cfg = config_lib.load(path, overrides)
    if family == "text-to-image" and not epath.Path(cfg.data.source).exists():
        runtime.setup(cfg)
        digits_pipeline.prepare(cfg.data.source)
    return train(path, overrides)


def run_plan(args) -> int:
    """Plan one config, or each remat policy; exit 1 if nothing fits."""
    from pretrain import plan  # only this command needs libtpu

    plan.check_compiler()
    try:  # plan runs nothing here: the local CPU will do, whatever accelerators this machine has
        jax.config.update("jax_platforms", "cpu")
    except RuntimeError:  # backends already up (an embedding program)
        pass
    cfg = config_lib.load(args.config, args.overrides)
    if args.remat_sweep and args.mesh_sweep:
        raise ConfigError("--remat-sweep and --mesh-sweep sweep one thing at a time; pass one of them")
    sweep = "mesh" if args.mesh_sweep else "remat" if args.remat_sweep else None
    variants = plan.variants(cfg, args.topology, args.slices, sweep)
    rows, plan_one = [], plan.plan_apart if len(variants) > 1 else plan.plan
    for label, variant in variants:
        try:
            rows.append(plan_one(variant, args.topology, args.slices) | {"label": label})
        except plan.StartupError as e:
            print(f"error: a host of {args.topology} would not start: {e}", file=sys.stderr)
            return 1
        except ConfigError as e:
            if len(variants) == 1:
                raise
            print(f"skipped {label}: {e}", file=sys.stderr)  # a sweep goes on with the others
            continue
        if args.json:
            print(json.dumps(rows[-1]), flush=True)
    if not rows:
        raise ConfigError(f"no {sweep} variant of the sweep suits the config (each one's reason above)")
    if not args.json:
        print(plan.report(rows, sweep) if sweep else plan.describe(rows[0]))
    if note := plan.compiler_note(args.config):
        print(note, file=sys.stderr)
    if not any(r["fits"] for r in rows):
        print(f"error: {plan.why_not(rows[-1])}", file=sys.stderr)
        return 1
    return 0


def run_prepare(args):
    common = dict(val_fraction=args.val_fraction, workers=args.workers, shard_mb=args.shard_mb, overwrite=args.overwrite)
    if args.shard_mb <= 0:
        raise ConfigError(f"--shard-mb {args.shard_mb:g} must be positive")
    if getattr(args, "engine", "local") == "local" and args.beam_args:
        raise ConfigError(f"options after -- ({' '.join(args.beam_args)}) are Beam's; pass --engine beam, or drop them")
    if args.kind == "images" and (args.image_size or args.batch) and not args.pipeline:
        raise ConfigError("--image-size and --batch encode captioned images with a pipeline; pass --pipeline DIR, or drop them")
    if args.kind == "images" and args.overrides and not args.pipeline:
        raise ConfigError(f"{' '.join(args.overrides)}: runtime settings are for encoding with --pipeline; drop them")
    if args.kind == "images" and args.pipeline:
        require(args.image_size is not None, "--pipeline needs --image-size: the side the images are encoded at")
        common.pop("workers")
        runtime.setup(config_lib.runtime_only(args.overrides))
    if args.kind == "text":
        text = dict(tokenizer=args.tokenizer, vocab_size=args.vocab_size, model_type=args.model_type, seq_len=args.seq_len)
        if args.engine == "beam":
            from data.prepare import beam  # only this engine needs Apache Beam (the beam extra)

            manifest = beam.prepare_text(args.input, args.out, args.beam_args, **text, **common)
        else:
            manifest = prepare_text(args.input, args.out, **text, **common)
    elif args.pipeline:
        manifest = encode.prepare_captioned(args.input, args.out, pipeline=args.pipeline, image_size=args.image_size,
                                            batch=args.batch or 32, **common)
    else:
        manifest = prepare_images(args.input, args.out, **common)
    if not manifest:  # a process that encoded its share; process 0 wrote the dataset
        return
    for split, info in manifest["splits"].items():
        counts = ", ".join(f"{v:,} {k.replace('_', ' ')}" for k, v in info.items() if isinstance(v, int))
        print(f"{split}: {counts} in {len(info['shards'])} shard(s)")
    if args.kind == "text":
        print(f"tokenizer: {manifest['tokenizer_kind']} ({', '.join(manifest['files'])}), {manifest['vocab_size']:,} ids")
    print(f"wrote {args.out}")


def _prepare_parser(sub):
    p = sub.add_parser("prepare", help="build ArrayRecord shards (and a tokenizer for text) from raw files")
    kinds = p.add_subparsers(dest="kind", required=True)
    text = kinds.add_parser("text", help="text files, JSONL or Parquet (a 'text' field) -> token-id shards")
    images = kinds.add_parser("images", help="PNG/JPEG files (class subdirectories give labels) -> image shards")
    for k in (text, images):
        k.add_argument("--input", action="append", required=True, help="file, directory or glob; local or gs://; repeatable")
        k.add_argument("--out", required=True, help="output directory, local or gs://")
        k.add_argument("--val-fraction", type=float, default=0.01, help="share of documents held out for validation")
        k.add_argument("--workers", type=int, default=0, help="worker processes (0: one per CPU)")
        k.add_argument("--shard-mb", type=float, default=256, help="size of each ArrayRecord shard")
        k.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    text.add_argument("--tokenizer", help="an existing tokenizer: a SentencePiece .model file, a Hugging Face tokenizer.json "
                                           "(tokenizer_config.json beside it), or a directory holding either, such as a "
                                           "Llama checkpoint (default: train a SentencePiece model on the input)")
    text.add_argument("--vocab-size", type=int, default=32000, help="pieces of the trained tokenizer")
    text.add_argument("--model-type", choices=MODEL_TYPES, default="bpe")
    text.add_argument("--seq-len", type=int, default=2048, help="longer documents are split into pieces of this many tokens")
    images.add_argument("--pipeline", help="a Stable Diffusion pipeline directory (vae/, text_encoder/, tokenizer/): "
                                           "encode captioned images (a .txt beside each, or a JSONL/Parquet manifest of "
                                           "image and caption) into VAE moments and text states for text-to-image "
                                           "training; the dataset carries those parts of the pipeline")
    images.add_argument("--image-size", type=int, help="with --pipeline: resize (shorter side) and centre-crop to this")
    images.add_argument("--batch", type=int, help="with --pipeline: images encoded at once (default 32)")
    images.add_argument("overrides", nargs="*", metavar="runtime.KEY=VALUE",
                        help="with --pipeline: faked devices or jax.distributed, as for training (launch/ adds them): "
                             "every process encodes its rows of each batch, process 0 writes")
    text.add_argument("--engine", choices=("local", "beam"), default="local",
                      help="local: worker processes on this machine; beam: an Apache Beam pipeline, options after -- "
                           "(--runner=DataflowRunner --project=... --region=... --temp_location=gs://...; default: "
                           "Beam's DirectRunner over this machine's cores); the same records either way")


def _serving_parsers(sub):
    p = sub.add_parser("export", help="write a checkpoint's weights for serving: a Hugging Face Llama directory, or a "
                                      "diffusers pipeline of a UNet's EMA weights")
    p.add_argument("--format", choices=[f.NAME for f in formats.FORMATS],
                   help="the outside format (default: the model family's first: hf for a language model, diffusers for a "
                        "UNet; unet: this stack's own, for UNets diffusers cannot express)")
    p.add_argument("checkpoint", help="run directory, its checkpoints/ or one step's directory; local or gs://")
    p.add_argument("--out", help="output directory, local or gs:// (default: <run dir>/export)")
    p.add_argument("--step", type=int, help="which step (default: the latest)")
    p.add_argument("--dtype", choices=sorted(weights.DTYPES), default="bfloat16", help="dtype of the written weights")
    p.add_argument("--max-shard-mb", type=float, default=5 * 1024, help="split the weights into files of at most this size")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p = sub.add_parser("import-hf", help="turn a Hugging Face Llama directory, or a diffusers pipeline or UNet2DModel "
                                         "directory, into a checkpoint to train from")
    p.add_argument("hf_dir", help="directory with config.json (or model_index.json) and safetensors weights; local or gs://")
    p.add_argument("--out", required=True, help="new run directory; train from it with checkpoint.resume_from=OUT")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p = sub.add_parser("sample", help="generate text or images from a checkpoint or an exported directory")
    p.add_argument("checkpoint", help="run directory, checkpoints/ or step directory, or an exported directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--step", type=int, help="which checkpoint step (default: the latest)")
    text = p.add_argument_group("language model")
    p.add_argument("--prompt", help="the text to continue, or the prompt of a text-to-image model's images")
    text.add_argument("--max-new-tokens", type=int, default=64)
    text.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    text.add_argument("--json", action="store_true", help='print one line {"prompt_ids": [...], "ids": [...], "text": "..."}')
    image = p.add_argument_group("diffusion")
    image.add_argument("--num", type=int, default=64, help="how many images")
    image.add_argument("--negative-prompt", help="text-to-image: guide away from this (default: the empty prompt)")
    image.add_argument("--steps", type=int, help="sampler steps (default: the run's diffusion.sample_steps)")
    image.add_argument("--class", dest="label", type=int, help="class of every image (default: cycle through the classes)")
    image.add_argument("--guidance", type=float, help="classifier-free guidance weight (default: the run's diffusion.guidance)")
    image.add_argument("--eta", type=float, help="0: DDIM, 1: DDPM (default: the run's diffusion.eta)")
    image.add_argument("--noise", help="a .npy of the starting noise, float32 [N, H, W, C] (default: drawn from --seed)")
    image.add_argument("--dtype", choices=["float32", "bfloat16"], help="compute dtype (default: the model's model.dtype)")
    image.add_argument("--out", default="samples", help="directory for samples.png, samples.npy and labels.npy")
    image.add_argument("--overwrite", action="store_true", help="replace samples already in --out")
    p = sub.add_parser("eval", help="lm-evaluation-harness tasks scored by the language model of a checkpoint or export")
    p.add_argument("checkpoint", help="run directory, checkpoints/ or step directory, or an exported directory")
    p.add_argument("--tasks", nargs="+", required=True, help="lm-eval task names, or paths of task YAMLs")
    p.add_argument("--num-fewshot", type=int, help="examples in each prompt (default: each task's own)")
    p.add_argument("--limit", type=int, help="score only the first N documents of each task")
    p.add_argument("--batch-size", type=int, default=8, help="rows per forward pass")
    p.add_argument("--bootstrap-iters", type=int, default=100000, help="resamples for the standard errors (0: none)")
    p.add_argument("--step", type=int, help="which checkpoint step (default: the latest)")
    p.add_argument("--json", action="store_true", help="print the harness's results as one JSON object")


def run_serving(args):
    if args.command == "export":
        r = formats.export(args.checkpoint, args.out, step=args.step, format=args.format, dtype=args.dtype,
                           overwrite=args.overwrite, max_shard_bytes=int(args.max_shard_mb * 2**20))
        print(f"exported step {r['step']} to {r['out']}: {r['bytes'] / 2**20:,.1f} MiB of weights in {r['seconds']:.1f} s")
    elif args.command == "import-hf":
        r = formats.import_(args.hf_dir, args.out, overwrite=args.overwrite)
        print(f"imported {r['params']:,} parameters into {r['out']} in {r['seconds']:.1f} s; train from them with "
              f"`pretrain train {r['out']}/config.yaml checkpoint.resume_from={r['out']} run.output_dir=RUN data.source=DATA`")
    elif args.command == "eval":
        require(args.batch_size >= 1, f"--batch-size={args.batch_size} must be at least 1")
        require(args.limit is None or args.limit >= 1, f"--limit={args.limit} must be at least 1 (leave it out for all)")
        require(args.num_fewshot is None or args.num_fewshot >= 0, f"--num-fewshot={args.num_fewshot} must be >= 0")
        tasks = harness.load_tasks(args.tasks)  # before the model: a task that cannot load fails fast
        model, _, tokenizer = load.load(args.checkpoint, "llm", args.step)
        if tokenizer is None:
            raise ConfigError(f"{args.checkpoint} has no tokenizer next to the weights; the harness needs the model's tokenizer")
        results = harness.evaluate(harness.make_lm(model, tokenizer, args.batch_size), tasks, num_fewshot=args.num_fewshot,
                                   limit=args.limit, bootstrap_iters=args.bootstrap_iters)
        print(json.dumps(results["results"]) if args.json else harness.table(results))
    elif load.task_of(args.checkpoint) == "diffusion":
        r = sample.sample_images(args.checkpoint, args.out, num=args.num, steps=args.steps, label=args.label,
                                 guidance=args.guidance, eta=args.eta, noise=args.noise, seed=args.seed, step=args.step,
                                 dtype=args.dtype, prompt=args.prompt, negative_prompt=args.negative_prompt,
                                 overwrite=args.overwrite)
        print(f"wrote {r['num']} samples ({r['steps']} steps, guidance {r['guidance']}) to {r['out']}/samples.png, "
              "samples.npy and labels.npy")
    else:
        if args.prompt is None:
            raise ConfigError(f"{args.checkpoint} holds a language model; pass --prompt TEXT")
        r = sample.sample_text(args.checkpoint, args.prompt, max_new_tokens=args.max_new_tokens,
                               temperature=args.temperature, seed=args.seed, step=args.step)
        print(json.dumps(r) if args.json else args.prompt + r["text"])


def main(argv=None) -> int:
    tpu_devices.quiet_libtpu()
    parser = argparse.ArgumentParser(prog="pretrain", description="Pretrain language and diffusion models with JAX.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train from a YAML config; key=value pairs override it")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p = sub.add_parser("smoke", help="the tiny preset on 8 faked CPU devices with the embedded data")
    p.add_argument("family", nargs="?", default="llm", choices=list(SMOKE))
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p = sub.add_parser("plan", help="compile the train step for a TPU slice on this machine: memory per chip, "
                                    "whether it fits, FLOPs, collectives and a forecast step time")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--topology", required=True, help="Cloud accelerator type, e.g. v5p-64, v5e-16, v6e-16, v4-32")
    p.add_argument("--slices", type=int, default=1, help="number of such slices (multislice over DCN)")
    p.add_argument("--json", action="store_true", help="print one JSON object (per remat policy with --remat-sweep)")
    p.add_argument("--remat-sweep", action="store_true", help="plan every remat policy; a table ranked by the forecast")
    p.add_argument("--mesh-sweep", action="store_true",
                   help="plan every mesh.data x mesh.model of the slice; a table ranked by the forecast")
    p = sub.add_parser("goodput", help="where a run's wall time went, across all its attempts: productive steps, "
                                       "compiling, restoring, input, checkpoints, lost steps, restarts")
    p.add_argument("run_dir", help="the run's run.output_dir, local or gs://")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    _prepare_parser(sub)
    _serving_parsers(sub)
    argv = sys.argv[1:] if argv is None else list(argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    args, extra = parser.parse_known_args(argv[:cut])
    args.beam_args = argv[cut + 1:]  # `prepare text --engine beam -- BEAM_OPTIONS`
    if args.beam_args and args.command != "prepare":
        parser.error(f"options after -- ({' '.join(args.beam_args)}) are Beam's, for `prepare text --engine beam`")
    if extra and args.command != "plan":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:  # overrides after the options: `plan CONFIG --topology v5p-64 model.remat=full`
        args.overrides += extra
    try:
        if args.command == "train":
            return train(args.config, args.overrides)
        elif args.command == "smoke":
            return smoke(args.family, args.overrides)
        elif args.command == "plan":
            return run_plan(args)
        elif args.command == "goodput":
            r = goodput.report(args.run_dir)
            print(json.dumps(r) if args.json else goodput.format_report(r))
        elif args.command == "prepare":
            run_prepare(args)
        else:
            run_serving(args)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return runtime.BAD_INPUT_EXIT_CODE
    return 0
