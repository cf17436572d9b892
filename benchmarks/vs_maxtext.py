"""This project's train step against MaxText's, on the same model, mesh, batch, dtype and remat.

    python benchmarks/vs_maxtext.py [--shapes tiny,125m,tiny-1dev,125m-1dev,gqa] [--rounds 6] [--steps 3]
                                    [--loop-runs 2] [--ours-python .venv-tpu/bin/python]
    python benchmarks/vs_maxtext.py --aot [ROWS|ACCELERATOR]

Each side runs in a worker process of its own: ours with this Python, MaxText 0.2.5 in a
Python 3.12 virtualenv (installed on first use under ~/.cache/pretrain/maxtext-venv). The two
workers compile one after the other (no persistent compilation cache), then take turns: a few
steps of ours, a few of MaxText's, and again, so both see the same machine load. Prints the CPU
(model and bfloat16 units), the median step time of each, their ratio and both compile times, one
row per shape. Then each program's own training loop, as its users run it: `pretrain train` (its
metrics.jsonl) and MaxText's `train` (its metrics_file), --loop-runs runs each, alternated, the
median of the step times each logged from step 5: the harness above times the compiled steps
alone, and the two tables should agree within the noise.

Ours runs in --ours-python (default: this Python). MaxText needs Python 3.12 and so jax 0.12, whose
XLA CPU backend runs a sharded step much faster than jax 0.10's, the newest on Python 3.11 (on a
2-core EPYC, our 125m step on 2 x 4 devices: 11.1 s under 0.10.2, 7.3 s under 0.12.0.1): to compare
the programs rather than the XLA releases, give ours the same jax, e.g. the `tpu` extra's Python 3.12
(.venv-tpu/bin/python, `make tpu-venv`). Both jax versions are printed; a warning says when they differ.

It refuses a machine whose 1-minute load is above 0.5 (benchmarks/idle.py), and takes a turn again
whenever other programs used more than 0.5 cores during it (--any-load: neither).

Both run synthetic batches on faked CPU devices, bfloat16 compute, float32 weights, the shape's
remat (full unless it names one; MaxText's policy of the same saves, MAXTEXT_REMAT), scanned layers,
AdamW (weight decay 0.1, clipping at 1.0), no z-loss. Our mesh data x model is MaxText's fsdp x
tensor (our `data` axis shards the batch and, FSDP-style, the weights).

--aot compares compiled programs for a TPU slice instead, running nothing: ours from `pretrain plan`,
MaxText's from its `train_compile` (XLA dumps its optimized HLO), both compiled here through libtpu
for the same model, slice, global batch, sequence, microbatches, remat, mesh and attention. Each
side compiles in its own users' environment: ours in the project's `tpu` extra (.venv-tpu, `make
tpu-venv`), MaxText's in its virtualenv, and each row names the jax and libtpu of each, as XLA's
choices differ between releases (libtpu 0.0.42 -> 0.0.52: 70b FSDP 64 temporaries 50.9 -> 36.6
GiB). Per chip and side: XLA's arguments and temporaries, the matmul FLOPs executed and the collective bytes per
step by kind, both counted from the optimized HLO by pretrain/plan/hlo.py (loops by their trip counts,
windowed einsums' permutes as the all-gathers and reduce-scatters they implement). A row set
(comma-separated names of AOT_ROWS, or an accelerator type for its rows) picks rows; default all.
Each side's compile takes minutes and several GB of memory; they run one at a time.
"""

import argparse
import glob
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import idle  # benchmarks/idle.py, beside this script

ROOT = Path(__file__).resolve().parent.parent
MAXTEXT = "maxtext[tpu]==0.2.5"
MAXTEXT_VENV = Path("~/.cache/pretrain/maxtext-venv").expanduser()
OURS_TPU_PYTHON = ROOT / ".venv-tpu/bin/python"  # `make tpu-venv`: the `tpu` extra, as a pod installs it
# MaxText 0.2.5 needs Python 3.12 (this machine's pyenv has one); PYTHON312=... picks another.
PYTHON312_CANDIDATES = ["/root/.pyenv/versions/3.12.1/bin/python3", "python3.12"]

SHAPES = {
    # The tiny Llama of issue 13 on 8 faked devices.
    "tiny": dict(layers=4, embed=256, heads=4, kv_heads=4, head_dim=64, mlp=1024, vocab=32000, tied=False,
                 seq=256, batch=8, mesh=(2, 4)),
    # A 125m-class model (configs/llm/125m.yaml's widths) at a CPU-sized sequence.
    "125m": dict(layers=12, embed=768, heads=12, kv_heads=12, head_dim=64, mlp=2048, vocab=32000, tied=True,
                 seq=256, batch=8, mesh=(2, 4)),
    # The tiny Llama on one device.
    "tiny-1dev": dict(layers=4, embed=256, heads=4, kv_heads=4, head_dim=64, mlp=1024, vocab=32000, tied=False,
                      seq=256, batch=8, mesh=(1, 1)),
    # The 125m-class model on one device.
    "125m-1dev": dict(layers=12, embed=768, heads=12, kv_heads=12, head_dim=64, mlp=2048, vocab=32000, tied=True,
                      seq=256, batch=8, mesh=(1, 1)),
    # Grouped-query attention on a 4 x 2 mesh, saving the weight matmuls' outputs (MaxText's `minimal`).
    "gqa": dict(layers=6, embed=512, heads=8, kv_heads=2, head_dim=64, mlp=1536, vocab=32000, tied=False,
                seq=256, batch=8, mesh=(4, 2), remat="dots_no_batch"),
}

TURN_RETRIES, TURN_PAUSE_S = 10, 15  # a disturbed turn is taken again, at most this often
REPLY = "@@ "  # prefix of the workers' protocol lines on stdout; everything else goes to their log


# --- workers: each builds, compiles, then runs `run K` commands read from stdin ------------------


def reply(**fields):
    print(REPLY + json.dumps(fields), flush=True)


def serve(step):
    """Answer `run K` with K step times (each step waited for), until stdin closes."""
    import jax

    for line in sys.stdin:
        times, cpu = [], []
        for _ in range(int(line.split()[1])):
            start, start_cpu = time.perf_counter(), time.process_time()
            jax.block_until_ready(step())
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
        reply(times=times, cpu=cpu)


def ours_overrides(s: dict) -> list[str]:
    """Our config for a shape: the smoke preset with these overrides."""
    return [
        f"runtime.fake_cpu_devices={s['mesh'][0] * s['mesh'][1]}", "runtime.compilation_cache_dir=",
        f"mesh.data={s['mesh'][0]}", f"mesh.model={s['mesh'][1]}",
        f"model.num_layers={s['layers']}", f"model.embed_dim={s['embed']}", f"model.num_heads={s['heads']}",
        f"model.num_kv_heads={s['kv_heads']}", f"model.head_dim={s['head_dim']}", f"model.mlp_dim={s['mlp']}",
        f"model.vocab_size={s['vocab']}", f"model.tie_embeddings={str(s['tied']).lower()}",
        f"model.max_seq_len={s['seq']}", "model.dtype=bfloat16", f"model.remat={s.get('remat', 'full')}",
        "model.scan_layers=true",
        f"data.seq_len={s['seq']}", "data.source=synthetic", f"train.global_batch={s['batch']}",
        "optim.weight_decay=0.1", "optim.clip_norm=1.0", "optim.z_loss=0",
    ]


def ours_worker(s: dict):
    sys.path.insert(0, str(ROOT))
    from pretrain import cli, config as config_lib

    overrides = ours_overrides(s)
    train_step = cli.start(config_lib.load(str(ROOT / "configs/llm/smoke.yaml"), overrides))
    compiled, compile_s = train_step.compile()
    state = train_step.init_state()
    batch = train_step.place_batch(next(train_step.task.batches("train", train_step.rows)))
    box = {"state": state}

    def step():
        box["state"], metrics = compiled(box["state"], batch)
        return metrics

    with train_step.context():
        step(), step()  # warm-up
        reply(compile_s=compile_s, jax=jax_version())
        serve(step)


def maxtext_args(s: dict, steps: int) -> list[str]:
    """MaxText's config for a shape, after its base.yml: the same model, mesh, batch, dtype, remat
    and optimizer as ours, on synthetic data, for `steps` steps."""
    devices = s["mesh"][0] * s["mesh"][1]
    return [
        "run_name=vs_maxtext", f"base_output_directory={tempfile.mkdtemp(prefix='vs-maxtext-')}",
        "hardware=cpu", "skip_jax_distributed_system=true", "dataset_type=synthetic", "jax_cache_dir=",
        "enable_checkpointing=false", "enable_tensorboard=false", "enable_dropout=false", f"steps={steps}",
        f"base_num_decoder_layers={s['layers']}", f"base_emb_dim={s['embed']}", f"base_num_query_heads={s['heads']}",
        f"base_num_kv_heads={s['kv_heads']}", f"head_dim={s['head_dim']}", f"base_mlp_dim={s['mlp']}",
        f"vocab_size={s['vocab']}", f"logits_via_embedding={str(s['tied']).lower()}",
        "normalize_embedding_logits=false",
        f"max_target_length={s['seq']}", f"per_device_batch_size={s['batch'] / devices}",
        "dtype=bfloat16", "weight_dtype=float32", f"remat_policy={MAXTEXT_REMAT[s.get('remat', 'full')]}",
        "scan_layers=true", "attention=dot_product",
        f"ici_fsdp_parallelism={s['mesh'][0]}", f"ici_tensor_parallelism={s['mesh'][1]}",
        "opt_type=adamw", "adam_weight_decay=0.1", "gradient_clipping_threshold=1.0", "z_loss_multiplier=0",
    ]


def maxtext_env(s: dict) -> dict:
    """The environment MaxText runs in: faked CPU devices for the shape's mesh."""
    devices = s["mesh"][0] * s["mesh"][1]
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
    return {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": "", "XLA_FLAGS": flags}


def maxtext_worker(s: dict):
    os.environ.update(maxtext_env(s))
    import jax
    from flax import nnx
    from maxtext.configs import pyconfig
    from maxtext.trainers.pre_train import train
    from maxtext.utils import maxtext_utils, sharding, train_utils
    from maxtext.utils.max_utils import parse_libtpu_flags_to_dict

    argv = ["train", str(Path(pyconfig.__file__).parent / "base.yml"), *maxtext_args(s, steps=1_000_000)]
    config = pyconfig.initialize(argv)
    jax.config.update("jax_use_shardy_partitioner", config.shardy)
    # The first half of MaxText's train.train_loop: its state, shardings and jitted step.
    _, _, state_shardings, model, mesh, _, _, _, _, _, state = train_utils.setup_train_loop(config, None)
    graphdef, state = nnx.split(state)
    params_shardings, state_shardings = sharding.maybe_update_params_sharding_with_opt(config, state_shardings)
    p_train_step, _ = train_utils.jit_train_and_eval_step(
        config, graphdef, mesh, state, state_shardings, train.train_step, train.eval_step, None, params_shardings
    )
    with jax.set_mesh(mesh), nnx.logical_axis_rules(config.logical_axis_rules):
        shaped = maxtext_utils.get_shaped_batch(config, batch_sharding=sharding.get_input_data_sharding(config, mesh))
        start = time.perf_counter()
        options = parse_libtpu_flags_to_dict(config.compile_xla_flags)
        compiled = p_train_step.lower(state, shaped).compile(compiler_options=options)
        compile_s = time.perf_counter() - start
        batch = train.make_synthetic_batch(config, shaped)
    box = {"state": state}

    def step():
        box["state"], metrics = compiled(box["state"], batch)
        return metrics

    step(), step()
    reply(compile_s=compile_s, jax=jax_version())
    serve(step)


def jax_version():
    import jax

    return jax.__version__


# --- the driver --------------------------------------------------------------------------------


def python312() -> str:
    """A Python 3.12 that runs (a pyenv shim named python3.12 may exist without a 3.12 behind it)."""
    for python in filter(None, [os.environ.get("PYTHON312"), *PYTHON312_CANDIDATES]):
        if shutil.which(python) and subprocess.run([python, "-c", "import sys; assert sys.version_info[:2] == (3, 12)"],
                                                   capture_output=True).returncode == 0:
            return python
    sys.exit("error: MaxText 0.2.5 needs Python 3.12; install one, or point PYTHON312=... at it")


def maxtext_python() -> Path:
    python = MAXTEXT_VENV / "bin/python"
    if not python.exists() or subprocess.run([python, "-c", "import maxtext"], capture_output=True).returncode:
        print(f"installing {MAXTEXT} into {MAXTEXT_VENV} (once) ...", flush=True)
        subprocess.run([python312(), "-m", "venv", MAXTEXT_VENV], check=True)
        subprocess.run([python, "-m", "pip", "install", "-q", MAXTEXT], check=True)
    return python


class Worker:
    def __init__(self, python, side: str, shape: str, log: Path):
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT) if side == "ours" else ""}
        self.log = log
        self.proc = subprocess.Popen(
            [str(python), __file__, "--worker", side, "--shapes", shape], cwd=ROOT, env=env, text=True,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log.open("w"),
        )

    def receive(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(REPLY):
                return json.loads(line[len(REPLY):])
        tail = self.log.read_text().splitlines()[-30:]
        raise RuntimeError(f"worker exited ({self.proc.wait()}); end of {self.log}:\n" + "\n".join(tail))

    def run(self, steps: int) -> dict:
        """Wall and process CPU seconds of each of `steps` steps."""
        self.proc.stdin.write(f"run {steps}\n")
        self.proc.stdin.flush()
        return self.receive()

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()


def turn(worker, steps: int, any_load: bool) -> tuple[dict, float]:
    """One side's turn of `steps` steps, taken again (after a pause) while other programs used more
    than idle.IDLE_LOAD cores during it; (its step times, the cores others used)."""
    for attempt in range(TURN_RETRIES):
        busy, start = idle.busy_seconds(), time.perf_counter()
        r = worker.run(steps)
        load = idle.others(busy, sum(r["cpu"]), time.perf_counter() - start)
        if load <= idle.IDLE_LOAD or any_load:
            return r, load
        print(f"  (other programs used {load:.2f} cores during a turn; taking it again in {TURN_PAUSE_S} s)", flush=True)
        time.sleep(TURN_PAUSE_S)
    print(f"error: other programs kept using more than {idle.IDLE_LOAD} cores; stop them, or pass --any-load", file=sys.stderr)
    sys.exit(2)


def compare(shape: str, rounds: int, steps: int, ours_py: str, maxtext_py: Path, logs: Path, any_load: bool) -> dict:
    ours = Worker(ours_py, "ours", shape, logs / f"{shape}-ours.log")
    ours_ready = ours.receive()  # compile one at a time: compile times are not shared cores
    theirs = Worker(maxtext_py, "maxtext", shape, logs / f"{shape}-maxtext.log")
    theirs_ready = theirs.receive()
    times = {"ours": [], "maxtext": []}
    cpu = {"ours": [], "maxtext": []}
    seen = []  # cores other programs used in each kept turn
    for _ in range(rounds):
        for side, worker in (("ours", ours), ("maxtext", theirs)):
            r, load = turn(worker, steps, any_load)
            times[side] += r["times"]
            cpu[side] += r["cpu"]
            seen.append(load)
    ours.close(), theirs.close()
    return {"others_max": max(seen),
        "ours_ms": 1000 * statistics.median(times["ours"]), "maxtext_ms": 1000 * statistics.median(times["maxtext"]),
        "ours_cpu_s": statistics.median(cpu["ours"]), "maxtext_cpu_s": statistics.median(cpu["maxtext"]),
        "ours_compile_s": ours_ready["compile_s"], "maxtext_compile_s": theirs_ready["compile_s"],
        "jax": (ours_ready["jax"], theirs_ready["jax"]),
    }


# --- each program's own training loop -----------------------------------------------------------

LOOP_STEPS, LOOP_FROM = 20, 5  # steps per run; step times are counted from this step on


def own_loop(side: str, s: dict, ours_py: str, maxtext_py: Path, log: Path) -> tuple[float, float]:
    """One run of a side's own training loop, as its users run it (`pretrain train` with its
    metrics.jsonl, MaxText's `train` with its metrics_file), for LOOP_STEPS steps: the median of the
    step times it logged from step LOOP_FROM on, and the cores other programs used meanwhile."""
    # The run directory (ours writes checkpoints, about 1.2 GB for 125m) goes once its metrics are read.
    with tempfile.TemporaryDirectory(prefix=f"vs-maxtext-{side}-loop-") as tmp:
        work = Path(tmp)
        if side == "ours":
            metrics, key, env = work / "run" / "metrics.jsonl", "step_time_s", {**os.environ, "PYTHONPATH": str(ROOT)}
            cmd = [ours_py, "-m", "pretrain", "train", str(ROOT / "configs/llm/smoke.yaml"), *ours_overrides(s),
                   f"run.steps={LOOP_STEPS}", "train.log_every=1", f"run.output_dir={work / 'run'}"]
        else:
            metrics, key, env = work / "metrics.txt", "perf/step_time_seconds", maxtext_env(s)
            base = next(MAXTEXT_VENV.glob("lib/python*/site-packages/maxtext/configs/base.yml"))
            cmd = [str(maxtext_py), "-m", "maxtext.trainers.pre_train.train", str(base), *maxtext_args(s, LOOP_STEPS),
                   f"metrics_file={metrics}"]
        busy, start = idle.busy_seconds(), time.perf_counter()
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        with log.open("w") as out:
            subprocess.run(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, check=True)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        own_cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
        rows = [json.loads(line) for line in metrics.read_text().splitlines()]
        times = [r[key] for r in rows if key in r and r["step"] >= LOOP_FROM]
        return statistics.median(times), idle.others(busy, own_cpu, time.perf_counter() - start)


def own_loops(shape: str, runs: int, ours_py: str, maxtext_py: Path, logs: Path) -> dict:
    """`runs` runs of each side's own loop, alternated (ours, MaxText's, ours, ...): each run's
    median step in ms, and the most cores other programs used during any of them."""
    ms, seen = {"ours": [], "maxtext": []}, []
    for i in range(runs):
        for side in ("ours", "maxtext"):
            step_s, others = own_loop(side, SHAPES[shape], ours_py, maxtext_py, logs / f"{shape}-{side}-loop{i}.log")
            ms[side].append(1000 * step_s)
            seen.append(others)
    return {**ms, "others_max": max(seen)}


# --- --aot: compiled programs for a TPU slice, side by side -------------------------------------

# The issue's comparison: Llama-3-8B at 128 x 8192 tokens per step, one batch (no microbatches).
_8B_128 = ["train.global_batch=128", "train.microbatches=1", "data.seq_len=8192", "model.remat=full",
           "model.attention=splash"]
AOT_ROWS = {  # name: (accelerator, config, overrides)
    "8b-fsdp32": ("v5p-64", "configs/llm/8b.yaml", _8B_128 + ["mesh.data=32", "mesh.model=1"]),
    # MaxText splits the activations between layers along their width over its tensor axis in each case.
    **{f"8b-fsdp8-tp4-{split}": ("v5p-64", "configs/llm/8b.yaml", _8B_128 + ["mesh.data=8", "mesh.model=4",
                                                                             f"mesh.residual_split={split}"])
       for split in ("none", "length", "embed")},
    "8b-preset": ("v5p-64", "configs/llm/8b.yaml", []),
    "70b-fsdp64": ("v5p-128", "configs/llm/70b.yaml", ["train.global_batch=128", "train.microbatches=1",
                                                       "model.remat=full", "model.attention=splash",
                                                       "mesh.data=64", "mesh.model=1"]),
    "1b-preset": ("v5e-16", "configs/llm/1b.yaml", []),
}
ROW_WIDTH = max(map(len, AOT_ROWS))
# Our remat policies and attention as MaxText's: `minimal` saves the weight matmuls' outputs and
# recomputes attention, which is what `dots` does around splash's kernel. Ours `none` (save
# everything) has no MaxText policy: its remat_policy=none reads as None, jax.checkpoint's policy
# that saves nothing, the same as `full`.
MAXTEXT_REMAT = {"full": "full", "dots": "minimal", "dots_no_batch": "minimal", "offload": "minimal_offloaded"}
MAXTEXT_ATTENTION = {"splash": "flash", "xla": "dot_product"}
GIB = 2**30


def aot_rows(selection: str) -> list[str]:
    """Row names from `all`, an accelerator type, or a comma-separated list of names."""
    if selection == "all":
        return list(AOT_ROWS)
    by_accelerator = [name for name, row in AOT_ROWS.items() if row[0] == selection]
    return by_accelerator or selection.split(",")


def ours_aot(accelerator: str, config: str, overrides: list[str], work: Path, log: Path) -> dict:
    """`pretrain plan --json` for the row, run in the project's `tpu` environment: its memory, FLOPs
    and collectives, and the resolved mesh, remat and attention that MaxText is then given. XLA dumps
    the optimized HLO beside MaxText's."""
    cmd = [str(OURS_TPU_PYTHON), "-m", "pretrain", "plan", config, "--topology", accelerator, "--json", *overrides]
    env = {**aot_environ(), "XLA_FLAGS": dump_flags(work / "ours-hlo")}
    done = subprocess.run(cmd, cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=log.open("w"))
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not lines:
        last = (log.read_text().strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"pretrain plan failed ({done.returncode}): {last[:300]} (all of it in {log})")
    r = json.loads(lines[-1])
    if r["temporaries_gib"] is None:
        raise RuntimeError(f"ours does not compile: {r['oom']}")
    return {"arguments_gib": r["arguments_gib"], "temporaries_gib": r["temporaries_gib"],
            "matmul_flops": r["matmul_flops_per_chip"], "collectives": r["collective_bytes"]["ici"],
            "plan": r}


def maxtext_argv(accelerator: str, cfg, plan: dict, out_dir: Path) -> list[str]:
    """MaxText's `train_compile` arguments for the model, batch, mesh, remat and attention that our
    plan resolved. Its per-device batch is per microbatch; gradient accumulation multiplies it."""
    m, t = cfg.model, cfg.train
    return [
        f"compile_topology={accelerator}", "compile_topology_num_slices=1", "dataset_type=synthetic",
        "enable_checkpointing=false", f"base_output_directory={out_dir}", "run_name=aot", "enable_dropout=false",
        f"base_num_decoder_layers={m.num_layers}", f"base_emb_dim={m.embed_dim}", f"base_num_query_heads={m.num_heads}",
        f"base_num_kv_heads={m.num_kv_heads}", f"head_dim={m.head_dim}", f"base_mlp_dim={m.mlp_dim}",
        f"vocab_size={m.vocab_size}", f"logits_via_embedding={str(m.tie_embeddings).lower()}",
        "normalize_embedding_logits=false", f"rope_max_timescale={int(m.rope_theta)}",
        f"max_target_length={cfg.data.seq_len}", f"gradient_accumulation_steps={t.microbatches}",
        f"per_device_batch_size={t.global_batch / t.microbatches / plan['chips']:g}",
        f"dtype={m.dtype}", "weight_dtype=float32", "scan_layers=true",
        f"remat_policy={MAXTEXT_REMAT[plan['remat']]}", f"attention={MAXTEXT_ATTENTION[plan['attention']]}",
        f"ici_fsdp_parallelism={plan['mesh']['data']}", f"ici_tensor_parallelism={plan['mesh']['model']}",
        "opt_type=adamw", "adam_weight_decay=0.1", "gradient_clipping_threshold=1.0", "z_loss_multiplier=0",
    ]


def maxtext_aot(python: Path, argv: list[str], work: Path, log: Path) -> dict:
    """Compile MaxText's train step with XLA dumping its optimized HLO; its memory analysis from the
    line `train_compile` prints, its FLOPs and collectives counted from the dump."""
    from pretrain.plan import hlo

    dump = work / "maxtext-hlo"
    env = {**aot_environ(), "TPU_SKIP_MDS_QUERY": "1", "PYTHONPATH": "", "XLA_FLAGS": dump_flags(dump)}
    env.pop("JAX_PLATFORMS", None)
    cmd = [str(python), "-m", "maxtext.trainers.pre_train.train_compile", *argv]
    done = subprocess.run(cmd, cwd=work, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    log.write_text(done.stdout)
    memory = re.search(r"Memory analysis: CompiledMemoryStats\((.*?)\)", done.stdout)
    dumped = sorted(glob.glob(str(dump / "*jit_train_step*after_optimizations.txt")), key=os.path.getsize)
    if done.returncode or not memory or not dumped:
        raise RuntimeError(f"MaxText's train_compile failed ({done.returncode}); see {log}")
    stats = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", memory[1])}
    text = Path(dumped[-1]).read_text()  # the train step (the largest, should XLA dump more than one)
    chips = int(re.search(r"num_partitions=(\d+)", text)[1])
    return {"arguments_gib": stats["argument_size_in_bytes"] / GIB, "temporaries_gib": stats["temp_size_in_bytes"] / GIB,
            "matmul_flops": hlo.matmul_flops(text), "collectives": hlo.collective_bytes(text, [0] * chips)["ici"],
            "hlo": dumped[-1], "compiler": compiler(python)}


def compiler(python: Path) -> str:
    """The jax and libtpu installed for `python`, as `pretrain plan` names its own."""
    probe = "import importlib.metadata as m; print(f\"jax {m.version('jax')}, libtpu {m.version('libtpu')}\")"
    return subprocess.run([str(python), "-c", probe], capture_output=True, text=True, check=True).stdout.strip()


def dump_flags(folder: Path) -> str:
    return f"--xla_dump_to={folder} --xla_dump_hlo_module_re=jit_train_step --xla_dump_hlo_as_text"


# libtpu's harmless complaint about a missing TPU, silenced (FACTS.md).
QUIET_LIBTPU = {"TPU_ACCELERATOR_TYPE": "v5litepod-4", "TPU_WORKER_HOSTNAMES": "localhost"}


def aot_environ() -> dict:
    """This process's environment for a side's compile, without TPU_LIBRARY_PATH: JAX sets it here
    to this environment's libtpu once its backends start, and a side inheriting it would compile with
    that libtpu instead of its own (and still name its own in the row)."""
    return {**{k: v for k, v in os.environ.items() if k != "TPU_LIBRARY_PATH"}, **QUIET_LIBTPU}
AOT_KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")


def aot_line(name: str, side: str, r: dict) -> str:
    c = r["collectives"]
    kinds = " ".join(f"{c[k] / 1e9:9.2f}" for k in AOT_KINDS)
    return (f"{name:>{ROW_WIDTH}} {side:>7} {r['arguments_gib']:9.2f} {r['temporaries_gib']:9.2f} "
            f"{r['matmul_flops'] / 1e12:10,.0f} {sum(c.values()) / 1e9:9.2f} {kinds}")


def aot_row(name: str, maxtext_py: Path, work: Path):
    """Compile one row, ours then MaxText's, and print a line for each and one for the settings."""
    from pretrain import config as config_lib

    accelerator, config, overrides = AOT_ROWS[name]
    config = str(ROOT / config)
    (work / name).mkdir()
    ours = ours_aot(accelerator, config, overrides, work / name, work / f"{name}-ours.log")
    print(aot_line(name, "ours", ours), flush=True)
    cfg, plan = config_lib.load(config, overrides), ours["plan"]
    if plan["remat"] not in MAXTEXT_REMAT:
        print(f"{name:>{ROW_WIDTH}} MaxText: no remat policy of its saves what model.remat={plan['remat']} saves "
              "(its remat_policy=none recomputes everything, as full does)", flush=True)
        return
    argv = maxtext_argv(accelerator, cfg, plan, work / name)
    theirs = maxtext_aot(maxtext_py, argv, work / name, work / f"{name}-maxtext.log")
    print(aot_line(name, "MaxText", theirs))
    print(f"{'':>{ROW_WIDTH}} {accelerator}, mesh data {plan['mesh']['data']} x model {plan['mesh']['model']}, "
          f"{cfg.train.global_batch} x {cfg.data.seq_len} tokens in {cfg.train.microbatches} microbatch(es), "
          f"remat {plan['remat']} (MaxText {MAXTEXT_REMAT[plan['remat']]}), attention {plan['attention']}; "
          f"ours compiled by {plan['compiler']} (the project's tpu extra), MaxText's by {theirs['compiler']}",
          flush=True)


def run_aot(selection: str) -> int:
    sys.path.insert(0, str(ROOT))
    names = aot_rows(selection)
    unknown = [n for n in names if n not in AOT_ROWS]
    if unknown:
        print(f"error: unknown row(s) {', '.join(unknown)}; choose from {', '.join(AOT_ROWS)} or an accelerator "
              f"type of theirs", file=sys.stderr)
        return 2
    if not OURS_TPU_PYTHON.exists():
        print(f"error: {OURS_TPU_PYTHON} is missing; `make tpu-venv` installs the project's tpu extra there", file=sys.stderr)
        return 2
    maxtext_py = maxtext_python()
    work = Path(tempfile.mkdtemp(prefix="vs-maxtext-aot-"))
    print(f"logs and both sides' optimized HLO in {work}/ROW; per chip per step, GB = 1e9 bytes")
    print(f"{'row':>{ROW_WIDTH}} {'side':>7} {'args GiB':>9} {'temp GiB':>9} {'matmul TF':>10} {'coll. GB':>9} "
          f"{'all-gath':>9} {'red-scat':>9} {'all-red':>9} {'all-to-all':>9} {'permute':>9}", flush=True)
    for name in names:
        try:
            aot_row(name, maxtext_py, work)
        except RuntimeError as e:  # one row's failure does not stop the others
            print(f"{name:>{ROW_WIDTH}}: {e}", flush=True)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, of {', '.join(SHAPES)}")
    parser.add_argument("--rounds", type=int, default=6, help="turns each side takes")
    parser.add_argument("--steps", type=int, default=3, help="steps per turn")
    parser.add_argument("--loop-runs", type=int, default=2,
                        help=f"runs of each side's own training loop per shape ({LOOP_STEPS} steps each; 0: none)")
    parser.add_argument("--ours-python", default=sys.executable,
                        help="the Python our side runs in (default: this one); .venv-tpu/bin/python has MaxText's jax")
    parser.add_argument("--worker", choices=("ours", "maxtext"), help=argparse.SUPPRESS)
    parser.add_argument("--aot", nargs="?", const="all", metavar="ROWS",
                        help=f"compare compiled TPU programs instead: rows of {', '.join(AOT_ROWS)}, or an accelerator")
    idle.add_flag(parser)
    args = parser.parse_args()
    if args.aot:
        return run_aot(args.aot)
    shapes = args.shapes.split(",")
    if args.worker:
        (ours_worker if args.worker == "ours" else maxtext_worker)(SHAPES[shapes[0]])
        return 0
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        print(f"error: unknown shape(s) {', '.join(unknown)}; choose from {', '.join(SHAPES)}", file=sys.stderr)
        return 2
    idle.check(args.any_load)
    maxtext_py = maxtext_python()
    logs = Path(tempfile.mkdtemp(prefix="vs-maxtext-logs-"))
    from pretrain.metrics import cpu  # here: MaxText's worker runs this file without our package

    print(f"CPU: {cpu.describe()}")
    print(f"{args.rounds} turns of {args.steps} steps each; worker logs in {logs}")
    header = (f"{'shape':>10} {'mesh':>5} {'ours ms':>9} {'MaxText ms':>10} {'speed-up':>8} {'ours compile s':>14} "
              f"{'MaxText compile s':>17} {'CPU s/step ours':>15} {'MaxText':>7} {'others, cores':>13}")
    print(header, flush=True)
    speedups = {}
    for shape in shapes:
        r = compare(shape, args.rounds, args.steps, args.ours_python, maxtext_py, logs, args.any_load)
        speedups[shape] = r["maxtext_ms"] / r["ours_ms"]
        mesh = "x".join(map(str, SHAPES[shape]["mesh"]))
        print(
            f"{shape:>10} {mesh:>5} {r['ours_ms']:9.0f} {r['maxtext_ms']:10.0f} {r['maxtext_ms'] / r['ours_ms']:7.2f}x "
            f"{r['ours_compile_s']:14.1f} {r['maxtext_compile_s']:17.1f} "
            f"{r['ours_cpu_s']:15.2f} {r['maxtext_cpu_s']:7.2f} {r['others_max']:13.2f}",
            flush=True,
        )
    print(f"jax {r['jax'][0]} (ours), {r['jax'][1]} (MaxText); speed-up = MaxText's step time / ours (medians).")
    if r["jax"][0] != r["jax"][1]:
        print("warning: the two sides ran different jax releases, whose XLA CPU backends differ in speed; pass "
              "--ours-python with a Python holding MaxText's jax (.venv-tpu/bin/python) to compare the programs")
    print("CPU s/step: the process's CPU time per step, which the load of other programs inflates less than wall time.")
    print(f"others, cores: the most that other programs used during a kept turn (a turn above {idle.IDLE_LOAD} is taken again).")
    if args.loop_runs:
        print(f"\neach program's own training loop, {args.loop_runs} runs each alternated, {LOOP_STEPS} steps per run, "
              f"the median logged step from step {LOOP_FROM}; speed-up of the medians beside the harness's", flush=True)
        print(f"{'shape':>10} {'mesh':>5} {'ours ms':>15} {'MaxText ms':>15} {'speed-up':>8} {'harness':>8} {'others, cores':>13}")
        for shape in shapes:
            r = own_loops(shape, args.loop_runs, args.ours_python, maxtext_py, logs)
            ours, theirs = statistics.median(r["ours"]), statistics.median(r["maxtext"])
            print(f"{shape:>10} {'x'.join(map(str, SHAPES[shape]['mesh'])):>5} {' '.join(f'{t:.0f}' for t in r['ours']):>15} "
                  f"{' '.join(f'{t:.0f}' for t in r['maxtext']):>15} {theirs / ours:7.2f}x {speedups[shape]:7.2f}x "
                  f"{r['others_max']:13.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
