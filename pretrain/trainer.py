"""The shared trainer: sharded state creation, the jitted train and eval steps, the loop.

State is a flat nnx.State of (model, optimizer) or, with train.ema_decay, (model, optimizer,
EMA model), and travels through jax.jit as a pure pytree with explicit shardings and donated
buffers; the graph is split once, not per step. The EMA is a second copy of the model, so it
is sharded like the parameters. A step's randomness (what the diffusion loss draws) comes
from run.seed and the step number, so a resumed run draws what an uninterrupted one would.
"""

import contextlib
import functools
import signal
import threading
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding

from pretrain import optim, sharding
from pretrain.checkpoint import Checkpointer, restore_params
from pretrain.config import Config
from pretrain.metrics import MetricsLogger, total_peak_flops
from pretrain.profiling import StepProfiler
from pretrain.runtime import Watchdog, wait_for_all
from pretrain.sharding import global_batch, local_rows, logical_spec, process_rows


class _SigtermFlag:
    """Notes SIGTERM (what TPU VMs and GKE send before preemption) instead of dying on it."""

    def __enter__(self):
        self.received, self._previous = False, None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def ema_decay(decay: float, updates: int):
    """The EMA's decay at its update number `updates` (0, 1, ...): low at first, so the average
    soon leaves the random initial weights, then `decay`."""
    return jnp.minimum(decay, (1.0 + updates) / (10.0 + updates))


class Trainer:
    def __init__(self, cfg: Config, task, mesh, rules):
        self.cfg, self.task, self.mesh, self.rules = cfg, task, mesh, rules
        self.tx = optim.make(cfg.optim, cfg.run.steps)
        self.lr = optim.schedule(cfg.optim, cfg.run.steps)
        with self.context():
            abstract = nnx.eval_shape(self._create)
            self.graphdef, self.abstract_state = nnx.split(abstract)
            self.state_shardings = nnx.get_named_sharding(self.abstract_state, mesh)
        self.batch_sharding = NamedSharding(mesh, logical_spec(("batch",), rules))
        self.batch_spec = {
            k: jax.ShapeDtypeStruct(shape, dtype, sharding=self.batch_sharding)
            for k, (shape, dtype) in task.batch_shapes().items()
        }
        self._train_step = jax.jit(
            self.train_step,
            in_shardings=(self.state_shardings, self.batch_sharding),
            out_shardings=(self.state_shardings, None),
            donate_argnums=0,
        )
        self._eval_step = jax.jit(self.eval_step, in_shardings=(self.state_shardings, self.batch_sharding))

    @functools.cached_property
    def rows(self) -> list[int]:
        """The rows of each global batch that this process reads (its devices hold them)."""
        return process_rows(self.batch_sharding, self.cfg.train.global_batch)

    @contextlib.contextmanager
    def context(self):
        """Mesh and logical-axis rules, active wherever models are traced."""
        with jax.set_mesh(self.mesh), nnx.logical_axis_rules(self.rules):
            yield

    def _create(self):
        model = self.task.build_model(nnx.Rngs(self.cfg.run.seed))
        optimizer = nnx.Optimizer(model, self.tx, wrt=nnx.Param)
        return (model, optimizer, nnx.clone(model)) if self.cfg.train.ema_decay else (model, optimizer)

    def init_state(self) -> nnx.State:
        """Parameters, optimizer state (and EMA), created by one jitted call straight into their shardings."""
        with self.context():
            return jax.jit(lambda: nnx.split(self._create())[1], out_shardings=self.state_shardings)()

    # --- the steps ------------------------------------------------------------------------

    def _grads(self, params_graphdef, params, batch, key):
        def loss_fn(p):
            total, weight, sums = self.task.loss(nnx.merge(params_graphdef, p), batch, self.mesh, self.rules, key)
            return total, (weight, sums)

        (_, (weight, sums)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return grads, weight, sums

    def train_step(self, state, batch):
        model, optimizer, *ema = nnx.merge(self.graphdef, state)
        params_graphdef, params = nnx.split(model)
        step = optimizer.step[...]
        key = jax.random.fold_in(jax.random.key(self.cfg.run.seed), step)
        k = self.cfg.train.microbatches
        if k == 1:
            grads, weight, sums = self._grads(params_graphdef, params, batch, key)
        else:
            # Microbatch i takes rows i, i+k, i+2k, ...: every device keeps its share of every microbatch.
            micro = jax.tree.map(lambda x: x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1), batch)

            def accumulate(carry, inputs):
                mb, i = inputs
                mb = jax.lax.with_sharding_constraint(mb, self.batch_sharding)
                grads = self._grads(params_graphdef, params, mb, jax.random.fold_in(key, i))
                return jax.tree.map(jnp.add, carry, grads), None

            first = jax.tree.map(lambda x: x[0], micro)
            zero = jax.eval_shape(lambda: self._grads(params_graphdef, params, first, key))
            zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zero)
            (grads, weight, sums), _ = jax.lax.scan(accumulate, zero, (micro, jnp.arange(k)))
        # Losses are sums over tokens; one division makes the step independent of how the batch was split.
        weight = jnp.maximum(weight, 1.0)
        grads = jax.tree.map(lambda g: g / weight, grads)
        metrics = {name: value / weight for name, value in sums.items()}
        metrics["grad_norm"] = optax.tree.norm(grads)
        metrics["lr"] = self.lr(step)
        optimizer.update(model, grads)
        if ema:
            decay = ema_decay(self.cfg.train.ema_decay, step)
            average = optax.incremental_update(nnx.state(model, nnx.Param), nnx.state(ema[0], nnx.Param), 1 - decay)
            nnx.update(ema[0], average)
        return nnx.state((model, optimizer, *ema)), metrics

    def eval_step(self, state, batch):
        model = nnx.merge(self.graphdef, state)[0]
        total, weight, sums = self.task.loss(model, batch, self.mesh, self.rules)
        return sums["loss"], weight

    def sampling_model(self, state):
        """The model to sample from: the EMA if the run keeps one."""
        return nnx.merge(self.graphdef, state)[-1 if self.cfg.train.ema_decay else 0]

    def compile(self):
        """Ahead-of-time compile of the train step; returns (executable, seconds)."""
        start = time.perf_counter()
        with self.context():
            compiled = self._train_step.lower(self.abstract_state_with_shardings(), self.batch_spec).compile()
        return compiled, time.perf_counter() - start

    def abstract_state_with_shardings(self):
        return jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), self.abstract_state, self.state_shardings
        )

    # --- the loop -------------------------------------------------------------------------

    def evaluate(self, state) -> float | None:
        """Mean loss over the same held-out batches every time; None without held-out data."""
        batches = self.task.batches("validation", self.rows)
        if batches is None:
            return None
        sums = [self._eval_step(state, self.place_batch(next(batches))) for _ in range(self.cfg.train.eval_batches)]
        total, count = jax.device_get(jax.tree.map(lambda *x: sum(x), *sums))  # one host sync for the whole eval
        return float(total) / max(float(count), 1.0)

    def place_batch(self, local_batch):
        return global_batch(local_batch, self.batch_sharding, self.cfg.train.global_batch)

    def data_position(self, rows) -> jax.Array:
        """The records each row of the global batch has read, as one global array (for checkpoints)."""
        return global_batch({"p": rows.positions.astype("int32")}, self.batch_sharding, self.cfg.train.global_batch)["p"]

    def initial_state(self, plan, checkpointer: Checkpointer, rows):
        """(state, step) to start from: fresh, a checkpoint of this run (the data position of `rows`
        included), or another checkpoint's parameters with a fresh optimizer (checkpoint.resume_plan)."""
        if plan is None:
            return self.init_state(), 0
        kind, where = plan
        abstract = self.abstract_state_with_shardings()
        if kind == "full":
            position_spec = jax.ShapeDtypeStruct((self.cfg.train.global_batch,), "int32", sharding=self.batch_sharding)
            (parts, position), step = checkpointer.restore(where, abstract, position_spec), where
            if position is not None:
                rows.set_positions(local_rows(position))
            elif jax.process_index() == 0:
                print(f"checkpoint {where} holds no data position; the data starts from the beginning")
        else:
            params = restore_params(where, abstract[0])
            parts, step = [params, self.init_state()[1]], 0
            if self.cfg.train.ema_decay:  # the average starts at the weights we start from
                parts.append(jax.tree.map(jnp.copy, params))
        if jax.process_index() == 0:
            print(f"resumed from step {where}" if kind == "full" else f"starting from the parameters in {where}")
        # Back into the exact pytree the step was compiled for (restored subtrees may be plain dicts).
        return jax.tree.unflatten(jax.tree.structure(self.abstract_state), jax.tree.leaves(parts)), step

    def fit(self, plan=None) -> dict:
        """Train to run.steps from `plan` (checkpoint.resume_plan), checkpointing as configured.
        SIGTERM (or, multi-host, JAX's preemption sync point) ends the run after a checkpoint."""
        cfg, task = self.cfg, self.task
        train_batches = task.batches("train", self.rows)
        compiled, compile_s = self._compile_logged()
        wait_for_all("compiled", cfg.runtime.init_timeout_s)
        peak = total_peak_flops(cfg.runtime.peak_flops_per_device)
        checkpointer = Checkpointer(cfg)
        state, start = self.initial_state(plan, checkpointer, train_batches)
        logger = MetricsLogger(cfg.run.output_dir, cfg.run.steps, task.unit, resume_step=start)
        profiler = StepProfiler(cfg.train.profile_steps, cfg.run.output_dir)
        units, flops = task.units_per_step(), task.flops_per_step()
        history = {"train_loss": [], "eval_loss": [], "preempted": False}
        run_start = window_start = time.perf_counter()
        window_steps = 0
        # One process: SIGTERM is ours to catch. Several: JAX's preemption service catches it and
        # tells every process to stop at the same step (checkpointer.reached_preemption).
        sigterm_flag = _SigtermFlag() if jax.process_count() == 1 else contextlib.nullcontext()
        with self.context(), sigterm_flag as sigterm, Watchdog(cfg.runtime.step_timeout_s, start) as watchdog:
            batch = self.place_batch(next(train_batches)) if start < cfg.run.steps else None
            for step in range(start + 1, cfg.run.steps + 1):
                profiler.begin(step)
                state, metrics = compiled(state, batch)
                watchdog.dispatched(step, metrics)
                profiler.end(step, metrics)
                window_steps += 1
                preempted = (sigterm is not None and sigterm.received) or checkpointer.reached_preemption(step)
                every = cfg.checkpoint.every
                save = preempted or step == cfg.run.steps or (every and step % every == 0)
                # Batch n+1 goes to the devices while step n runs (a checkpoint keeps step n's data position).
                if not save:
                    batch = self.place_batch(next(train_batches))
                if step % cfg.train.log_every == 0 or step == cfg.run.steps:
                    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}  # waits for the step
                    step_time = (time.perf_counter() - window_start) / window_steps
                    row = {"step": step, **metrics, "step_time_s": step_time, f"{task.unit}_per_sec": units / step_time}
                    row["mfu"] = flops / step_time / peak
                    row["eta_s"] = step_time * (cfg.run.steps - step)
                    logger.write(row)
                    history["train_loss"].append(metrics["loss"])
                    window_start, window_steps = time.perf_counter(), 0
                else:
                    logger.progress(step, (time.perf_counter() - window_start) / window_steps * (cfg.run.steps - step))
                if (cfg.train.eval_every and step % cfg.train.eval_every == 0) or step == cfg.run.steps:
                    with watchdog.paused():
                        eval_loss = self.evaluate(state)
                        if eval_loss is not None:
                            logger.write({"step": step, **task.eval_metrics(eval_loss)})
                            history["eval_loss"].append(eval_loss)
                        task.write_samples(self.sampling_model(state), step)
                    window_start, window_steps = time.perf_counter(), 0  # eval time is not step time
                if save:
                    with watchdog.paused():
                        logger.flush()  # metrics up to this step are stored before the checkpoint that covers them
                        blocked = checkpointer.save(step, state, self.data_position(train_batches))
                    logger.note(f"checkpoint {step}: the loop was blocked {blocked:.2f} s; writing in the background")
                    if not preempted and step < cfg.run.steps:
                        batch = self.place_batch(next(train_batches))
                    window_start, window_steps = time.perf_counter(), 0  # nor is checkpoint time
                if preempted:
                    history["preempted"] = True
                    break
        profiler.close(state)  # a run preempted inside the traced steps
        waited = checkpointer.wait()
        checkpointer.close()
        logger.close()
        wall = time.perf_counter() - run_start
        if history["preempted"]:
            logger.note(f"preempted: checkpoint {step} committed (waited {waited:.1f} s); run the same command to resume")
        elif start >= cfg.run.steps:
            logger.note(f"nothing to do: the checkpoint in {cfg.run.output_dir} is already at step {start} of {cfg.run.steps}; "
                        "raise run.steps to continue, or train again with another run.output_dir or checkpoint.overwrite=true")
        else:
            logger.note(f"done: {cfg.run.steps - start} steps in {wall:.1f} s (+ compile {compile_s:.1f} s); output in {cfg.run.output_dir}")
        return {"state": state, "compile_s": compile_s, "wall_s": wall, **history}

    def _compile_logged(self):
        if jax.process_index() == 0:
            if jax.process_count() > 1:
                batch = self.cfg.train.global_batch
                rows = sharding.rows_by_process(self.batch_sharding, batch)
                counts = " to ".join(map(str, sorted({len(r) for r in rows.values()})))
                print(f"data: {len(rows)} processes read {counts} of the {batch} rows each "
                      f"(process 0: rows {sharding.blocks(rows[0])})", flush=True)
            mesh = sharding.describe(self.mesh.shape)
            print(f"compiling the train step ({self.cfg.task}, mesh {mesh}) ...", flush=True)
        compiled, seconds = self.compile()
        if jax.process_index() == 0:
            print(f"compiled in {seconds:.1f} s", flush=True)
        return compiled, seconds
