"""The training loop: run the compiled step on the batch placed ahead of it, then hand the step to a
few events (log, evaluate, save, ...) that each decide whether this step is theirs.

A new per-step concern is one more `Event` (its `after(done)`, and `before(step)` if it must act
before a step is dispatched), added to the list in `fit`.
"""

import contextlib
import dataclasses
import queue
import signal
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

from models import layers
from pretrain.metrics.logger import MetricsLogger
from pretrain.metrics.mfu import total_peak_flops
from pretrain.run.checkpoint import Checkpointer, Fresh, InitFrom, LocalCheckpointer, Resume, StartingPoint, restore_params
from pretrain.run.goodput import Timeline
from pretrain.run.outputs import RunFiles
from pretrain.run.profiling import StepProfiler
from pretrain.run.runtime import DIVERGED_EXIT_CODE, PREEMPTED_EXIT_CODE, Watchdog, agreed, wait_for_all
from pretrain.train import sharding
from pretrain.train.sharding import local_rows


@dataclasses.dataclass
class Done:
    """A dispatched step, as the events see it."""

    step: int
    state: object
    metrics: dict  # device arrays: reading them waits for the step
    position: np.ndarray  # this process's data position after the step's batch
    last: bool  # the run stops after it (the end, or preempted)
    end: bool  # the run is done after it: run.steps reached, or the data ran out (data.num_epochs)


class Throughput:
    """Seconds per step over the steps since the last reading, time spent `paused()` left out, and
    the units (real tokens, images) each of those steps trained on, as device scalars read at a log row."""

    def __init__(self):
        self.reset()

    def step_time(self) -> float:
        return (time.perf_counter() - self.start) / max(self.steps, 1)

    def reset(self):
        self.start, self.steps, self.units = time.perf_counter(), 0, []

    @contextlib.contextmanager
    def paused(self):
        try:
            yield
        finally:
            self.reset()


class Preemption(contextlib.AbstractContextManager):
    """Whether the run must stop after this step to be resumed elsewhere. One process catches SIGTERM
    (what TPU VMs and GKE send before preemption) itself; with several, JAX's preemption service
    catches it and tells every process to stop at the same step (checkpointer.reached_preemption)."""

    def __init__(self, checkpointer: Checkpointer):
        self.checkpointer, self.received, self.previous = checkpointer, False, None
        self.noticed_at = None  # when SIGTERM came (one process) or the shared stop step was reached
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._note)

    def _note(self, signum, frame):
        self.received, self.noticed_at = True, time.monotonic()

    def requested(self, step: int) -> bool:
        stop = self.received or (jax.process_count() > 1 and self.checkpointer.reached_preemption(step))
        if stop and self.noticed_at is None:
            self.noticed_at = time.monotonic()
        return stop

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


class Diverged(Exception):
    """train.max_skipped_steps steps in a row were not finite: the run stops, with no checkpoint of
    any step since the first of them."""

    def __init__(self, first: int, last: int, limit: int):
        super().__init__(f"steps {first} to {last} were not finite (a NaN or an infinity in the loss, the gradients "
                         f"or the parameters they would give), train.max_skipped_steps={limit} in a row; the run stops "
                         f"with exit code {DIVERGED_EXIT_CODE} and its last checkpoint is from before step {first}: "
                         "resume from it with a lower optim.lr, other data or a different seed")


# --- the events ---------------------------------------------------------------------------


class Event:
    """One concern of the loop: `before` a step is dispatched, `after` it (both do nothing here)."""

    def before(self, step: int):
        pass

    def after(self, done: Done):
        pass


class Every(Event):
    """Due every `period` steps (0: never) and at the run's end."""

    def __init__(self, period: int):
        self.period = period

    def due(self, done: Done) -> bool:
        return done.end or (self.period > 0 and done.step % self.period == 0)


class Guard(Event):
    """Watches each step's `finite` flag (the train step applied nothing of a step that was not):
    counts the skipped steps, says whether a checkpoint may be taken (not while the latest step was
    skipped), and raises Diverged after train.max_skipped_steps in a row. Step n's flag is read
    once step n+1 is dispatched, so the loop stays a step ahead of the devices; every process reads
    the same flags at the same steps and so decides alike."""

    def __init__(self, limit: int):
        self.limit, self.pending = limit, []
        self.skipped, self.streak = 0, 0  # in this start of the run; the current run of skipped steps

    def after(self, done: Done):
        self.pending.append((done.step, done.metrics["finite"]))
        self.settle(upto=done.step if done.last else done.step - 1)

    def settle(self, upto: int):
        """Reads the flags of the steps up to `upto` (waiting for them)."""
        while self.pending and self.pending[0][0] <= upto:
            step, finite = self.pending.pop(0)
            self.streak = 0 if bool(finite) else self.streak + 1
            self.skipped += self.streak > 0
            if self.streak >= self.limit:
                raise Diverged(step - self.streak + 1, step, self.limit)

    def may_save(self, step: int) -> bool:
        self.settle(upto=step)
        return self.streak == 0


class Log(Every):
    """A metrics row every train.log_every steps, a progress line in between."""

    def __init__(self, train_step, logger: MetricsLogger, throughput: Throughput, history: dict, feed: "Feed",
                 guard: Guard):
        super().__init__(train_step.cfg.train.log_every)
        self.feed, self.waited, self.train_step, self.guard = feed, 0.0, train_step, guard
        self.total, self.unit = train_step.cfg.run.steps, train_step.task.unit
        self.datasets = [s.name for s in getattr(train_step.cfg.data, "sources", [])]  # a mixture counts units per dataset
        self.capacity = train_step.task.units_per_step()  # a step's units if nothing were padding
        self.flops_per_unit = train_step.task.flops_per_step() / self.capacity
        # Only process 0 writes rows; on CPU the peak is measured, seconds the others need not spend.
        cfg = train_step.cfg
        multiply = layers.multiply_dtype(cfg.model.dtype).name  # on CPU the peak is this dtype's
        self.peak = total_peak_flops(cfg.runtime.peak_flops_per_device, multiply) if logger.enabled else float("nan")
        self.logger, self.throughput, self.history = logger, throughput, history

    def after(self, done: Done):
        self.throughput.steps += 1
        self.throughput.units.append(done.metrics["units"])
        if not self.due(done):
            self.logger.progress(done.step, self.throughput.step_time() * (self.total - done.step))
            return
        metrics, per_dataset = jax.device_get((done.metrics, self.throughput.units))  # waits for the step
        self.guard.settle(upto=done.step)
        metrics = {k: float(v) for k, v in metrics.items() if k not in ("units", "finite")}
        per_dataset = np.sum(per_dataset, axis=0)
        step_time, units = self.throughput.step_time(), float(np.sum(per_dataset))
        seconds = step_time * self.throughput.steps
        drawn = {f"{self.unit}/{name}": float(n) for name, n in zip(self.datasets, np.atleast_1d(per_dataset))}
        epochs = self.train_step.task.epochs(done.position, self.train_step.rows)
        # Throughput and MFU count what was trained on: padding is no work.
        self.logger.write({"step": done.step, **metrics, "step_time_s": step_time, f"{self.unit}_per_sec": units / seconds,
                           "mfu": self.flops_per_unit * units / seconds / self.peak,
                           "pad_fraction": 1 - units / (self.capacity * self.throughput.steps),
                           "data_wait_s": self.feed.waited - self.waited, "eta_s": step_time * (self.total - done.step),
                           "skipped_steps": self.guard.skipped,
                           **drawn, **{k: round(v, 4) for k, v in epochs.items()}})
        self.waited = self.feed.waited
        self.history["train_loss"].append(metrics["loss"])
        self.throughput.reset()


class Evaluate(Every):
    """The held-out loss (and the task's samples) every train.eval_every steps and at the end."""

    def __init__(self, train_step, logger: MetricsLogger, pauses, history: dict, files: RunFiles):
        super().__init__(train_step.cfg.train.eval_every)
        self.train_step, self.logger, self.pauses, self.history, self.files = train_step, logger, pauses, history, files

    def after(self, done: Done):
        if not self.due(done):
            return
        with self.pauses("eval", done.step):
            losses = evaluate(self.train_step, done.state)
            if losses:
                per_set = {f"eval_loss/{name}": loss for name, loss in losses.items() if name}
                self.logger.write({"step": done.step, **self.train_step.task.eval_metrics(losses[""]), **per_set})
                self.history["eval_loss"].append(losses[""])
            scores = self.train_step.task.write_samples(self.train_step.sampling_model(done.state), done.step, self.files.local)
            if scores:
                self.logger.write({"step": done.step, **scores})


class Downstream(Every):
    """The task's downstream evals (lm-evaluation-harness for a language model) every `every` steps
    and at the end, as a log row; their time is booked as eval."""

    def __init__(self, train_step, every: int, logger: MetricsLogger, pauses):
        super().__init__(every)
        self.train_step, self.logger, self.pauses = train_step, logger, pauses

    def after(self, done: Done):
        if self.due(done):
            with self.pauses("eval", done.step):
                row = self.train_step.task.downstream(self.train_step.sampling_model(done.state))
            self.logger.write({"step": done.step, **row})


class Save(Every):
    """A checkpoint of one tier every `every` steps and once `minutes` passed since its last one. The
    persistent tier also saves at the end and when preempted; the local tier (`covered_by` the
    persistent one) skips the steps that one saves."""

    def __init__(self, train_step, checkpointer: Checkpointer, every: int, minutes: float, logger: MetricsLogger,
                 pauses, files: RunFiles, guard: Guard, covered_by: "Save | None" = None):
        super().__init__(every)
        self.train_step, self.checkpointer, self.logger, self.pauses, self.files = train_step, checkpointer, logger, pauses, files
        self.guard, self.covered_by, self.saved_step = guard, covered_by, None
        cfg = train_step.cfg
        self.minutes, self.check_every, self.timeout_s = minutes, cfg.train.log_every, cfg.runtime.init_timeout_s
        self.saved_at = time.monotonic()

    def by_clock(self, step: int) -> bool:
        """Asked at log rows, where the loop waits for the step anyway; process 0's clock decides for all."""
        if not self.minutes or step % self.check_every:
            return False
        elapsed = time.monotonic() - self.saved_at >= 60 * self.minutes
        return agreed(f"{self.checkpointer.tier}_save_by_clock/{step}", elapsed, self.timeout_s)

    def after(self, done: Done):
        if self.covered_by is not None and (done.last or self.covered_by.saved_step == done.step):
            return
        if not (done.last or self.due(done) or self.by_clock(done.step)):
            return
        name = "checkpoint" if self.covered_by is None else f"{self.checkpointer.tier} checkpoint"
        if not self.guard.may_save(done.step):
            self.logger.note(f"{name} {done.step} not taken: the step was not finite and applied nothing; the last "
                             "checkpoint stands")
            return
        with self.pauses("checkpoint", done.step):
            self.files.sync()  # what was logged up to this step is stored before the checkpoint that covers it
            blocked = self.checkpointer.save(done.step, done.state, self.train_step.data_position(done.position))
        self.saved_at, self.saved_step = time.monotonic(), done.step
        self.logger.note(f"{name} {done.step}: the loop was blocked {blocked:.2f} s; writing in the background")


class Account(Every):
    """Closes the goodput timeline's stretch of steps at each log row (pretrain/run/goodput.py)."""

    def __init__(self, train_step, timeline: Timeline, feed, guard: Guard):
        super().__init__(train_step.cfg.train.log_every)
        self.timeline, self.feed, self.guard = timeline, feed, guard

    def after(self, done: Done):
        if done.last or self.due(done):
            self.guard.settle(upto=done.step)
            self.timeline.steps_until(done.step, self.feed.waited, self.guard.skipped)


class Profile(Event):
    """The profiler trace of train.profile_steps."""

    def __init__(self, profiler: StepProfiler):
        self.profiler = profiler

    def before(self, step: int):
        self.profiler.begin(step)

    def after(self, done: Done):
        self.profiler.end(done.step, done.metrics)


# --- the loop ------------------------------------------------------------------------------


def fit(train_step, starting_point: StartingPoint = Fresh(), started: float | None = None) -> dict:
    """Train `train_step` (a pretrain.train.step.TrainStep) to run.steps from `starting_point`, checkpointing as configured.
    SIGTERM (or, multi-host, JAX's preemption sync point) ends the run after a checkpoint.
    `started`: when this attempt began (time.time()), for the goodput timeline."""
    cfg, task = train_step.cfg, train_step.task
    history = {"train_loss": [], "eval_loss": [], "preempted": False}
    with contextlib.ExitStack() as stack:
        files = stack.enter_context(contextlib.closing(RunFiles(cfg.run.output_dir)))  # closed last: the final copy
        timeline = stack.enter_context(contextlib.closing(Timeline(files.local, started or time.time(), cfg.run.launch_id)))
        rows = task.batches("train", train_step.rows)
        timeline.add("startup")
        compiled, compile_s = _compile_logged(train_step)
        wait_for_all("compiled", cfg.runtime.init_timeout_s)
        timeline.add("compile")
        run_start = time.perf_counter()
        checkpointer = stack.enter_context(contextlib.closing(Checkpointer(cfg)))
        tiers = {checkpointer.tier: checkpointer}
        if cfg.checkpoint.local_dir:
            local = LocalCheckpointer(cfg, list(train_step.abstract_state), _start_step(starting_point))
            tiers[local.tier] = stack.enter_context(contextlib.closing(local))
        state, start = initial_state(train_step, starting_point, tiers, rows)
        timeline.add("restore", step=start)
        timeline.resumed_at(start)
        logger = stack.enter_context(contextlib.closing(MetricsLogger(cfg, files.local, task.unit,
                                                                      resume_step=start)))
        watchdog = stack.enter_context(Watchdog(cfg.runtime.step_timeout_s, start))
        preemption = stack.enter_context(Preemption(checkpointer))
        throughput, guard = Throughput(), Guard(cfg.train.max_skipped_steps)
        feed = stack.enter_context(Feed(train_step, rows, cfg.data.prefetch))

        @contextlib.contextmanager
        def pauses(kind: str, step: int):  # evals and saves are neither step time nor a stuck step
            guard.settle(upto=step)
            timeline.steps_until(step, feed.waited, guard.skipped)
            with watchdog.paused(), throughput.paused():
                yield
            timeline.add(kind)

        profiler = StepProfiler(cfg.train.profile_steps, files.local)
        c = cfg.checkpoint
        saves = [Save(train_step, checkpointer, c.every, c.every_minutes, logger, pauses, files, guard)]
        if LocalCheckpointer.tier in tiers:
            saves.append(Save(train_step, tiers[LocalCheckpointer.tier], c.local_every, c.local_every_minutes, logger, pauses, files,
                              guard, covered_by=saves[0]))
        events = [Profile(profiler), guard, Log(train_step, logger, throughput, history, feed, guard),
                  Account(train_step, timeline, feed, guard), Evaluate(train_step, logger, pauses, history, files), *saves]
        if task.downstream_every() is not None:
            events.insert(-len(saves), Downstream(train_step, task.downstream_every(), logger, pauses))
        stack.enter_context(train_step.context())  # after Log, whose CPU peak is measured off the mesh
        state, last = _steps(compiled, state, start, cfg.run.steps, events, feed, watchdog, preemption, history)
        profiler.close(state)  # a run preempted inside the traced steps
        for tier in tiers.values():
            tier.wait()
        timeline.add("checkpoint", final=True, preempted=history["preempted"])
        preempted = (last, time.monotonic() - preemption.noticed_at) if history["preempted"] else None
        ran_out = start < cfg.run.steps and last < cfg.run.steps and not preempted
        _closing_note(logger, cfg, start, last, ran_out, preempted, compile_s, time.perf_counter() - run_start)
    return {"state": state, "compile_s": compile_s, "wall_s": time.perf_counter() - run_start, **history}


def _steps(compiled, state, start: int, total: int, events: list[Event], feed, watchdog, preemption, history: dict):
    """Steps start+1 .. total (fewer if preempted or the data runs out), each handed to the events.
    Returns (state, last step)."""
    upcoming = feed.next() if start < total else None  # (batch, position); None: no more data
    last = start
    while upcoming is not None:
        step, (batch, position) = last + 1, upcoming
        for event in events:
            event.before(step)
        state, metrics = compiled(state, batch)
        watchdog.dispatched(step, metrics)
        stop = preemption.requested(step)
        # Batch n+1 goes to the devices while step n runs; without one, step n is the last.
        upcoming = None if stop or step == total else feed.next()
        done = Done(step, state, metrics, position, last=upcoming is None, end=upcoming is None and not stop)
        for event in events:
            event.after(done)
        history["preempted"], last = stop, step
    return state, last


class Feed(contextlib.AbstractContextManager):
    """Global batches placed on the devices, each with this process's data position after it (what a
    checkpoint of the step that trains on it keeps). With data.prefetch > 0 a thread reads and packs
    that many batches ahead of the loop; each carries the position it was read at, so a checkpoint
    holds the position of the batch trained on, never of what was read ahead."""

    def __init__(self, train_step, rows, prefetch: int = 0):
        self.train_step, self.rows = train_step, rows
        self.waited = 0.0  # seconds the loop waited for input (reading, packing, placing)
        self.ahead, self.stopped = (queue.Queue(prefetch) if prefetch else None), threading.Event()
        if self.ahead is not None:
            threading.Thread(target=self._read_ahead, daemon=True).start()

    def _read(self):
        """(host batch, position after it), or what reading raised (StopIteration at a finite end)."""
        try:
            return next(self.rows), self.rows.positions.copy()
        except Exception as e:  # noqa: BLE001 - handed to the loop, which raises it
            return e

    def _read_ahead(self):
        while not self.stopped.is_set():
            item = self._read()
            while not self.stopped.is_set():
                try:
                    self.ahead.put(item, timeout=0.1)
                    break
                except queue.Full:
                    pass
            if isinstance(item, Exception):
                return

    def next(self) -> tuple[dict, np.ndarray] | None:
        """The next (placed batch, position after it); None once finite data (data.num_epochs) ran out."""
        start = time.perf_counter()
        item = self.ahead.get() if self.ahead is not None else self._read()
        if isinstance(item, StopIteration):
            return None
        if isinstance(item, Exception):
            raise item
        host, position = item
        batch = self.train_step.place_batch(host)
        self.waited += time.perf_counter() - start
        return batch, position

    def __exit__(self, *exc):
        self.stopped.set()


def evaluate(train_step, state) -> dict[str, float]:
    """Mean loss over the same held-out batches every time, by held-out set ("": all of them; a
    mixture has one set per dataset); {} without held-out data."""
    sums = {name: [train_step.eval_jit(state, train_step.place_batch(next(batches))) for _ in range(train_step.cfg.train.eval_batches)]
            for name, batches in train_step.task.eval_batches(train_step.rows).items()}
    if not sums:
        return {}
    sums = jax.device_get(sums)  # one host sync for the whole eval
    totals = {name: np.sum(s, axis=0) for name, s in sums.items()}
    losses = {name: float(total) / max(float(count), 1.0) for name, (total, count) in totals.items()}
    total, count = np.sum(list(totals.values()), axis=0)
    return losses | {"": float(total) / max(float(count), 1.0)}


def _start_step(starting_point: StartingPoint) -> int:
    return starting_point.step if isinstance(starting_point, Resume) else 0


def initial_state(train_step, starting_point: StartingPoint, tiers: dict[str, Checkpointer], rows):
    """(state, step) to start from: fresh, a checkpoint of this run in one of its `tiers` (the data
    position of `rows` included), or another checkpoint's parameters with a fresh optimizer
    (checkpoint.starting_point)."""
    if isinstance(starting_point, Fresh):
        return train_step.init_state(), 0
    abstract = train_step.abstract_state_with_shardings()
    if isinstance(starting_point, Resume):
        step = starting_point.step
        parts, position = tiers[starting_point.tier].restore(step, abstract, train_step.abstract_position())
        if position is not None:
            rows.set_positions(local_rows(position))
        elif jax.process_index() == 0:
            print(f"checkpoint {step} holds no data position; the data starts from the beginning")
        note = f"resumed from step {step}" + (f" ({starting_point.tier} tier)" if starting_point.tier != Checkpointer.tier else "")
    else:
        assert isinstance(starting_point, InitFrom)
        params = restore_params(starting_point.path, abstract["params"])
        parts = dict(train_step.init_state()) | {"params": params}
        if "ema" in parts:  # the average starts at the weights we start from
            parts["ema"] = jax.tree.map(jnp.copy, params)
        step, note = 0, f"starting from the parameters in {starting_point.path}"
    if jax.process_index() == 0:
        print(note)
    # Back into the exact pytree the step was compiled for (restored subtrees may be plain dicts).
    leaves = [leaf for name in train_step.abstract_state for leaf in jax.tree.leaves(parts[name])]
    return jax.tree.unflatten(jax.tree.structure(train_step.abstract_state), leaves), step


def _compile_logged(train_step):
    if jax.process_index() == 0:
        if jax.process_count() > 1:
            batch = train_step.cfg.train.global_batch
            rows = sharding.rows_by_process(train_step.batch_sharding, batch)
            counts = " to ".join(map(str, sorted({len(r) for r in rows.values()})))
            print(f"data: {len(rows)} processes read {counts} of the {batch} rows each "
                  f"(process 0: rows {sharding.blocks(rows[0])})", flush=True)
        mesh, m = sharding.describe(train_step.mesh.shape), train_step.cfg.model
        on_cpu = train_step.mesh.devices.flat[0].platform == "cpu" and m.dtype == "bfloat16"
        multiply = f", bfloat16 matmuls multiplied in {layers.multiply_dtype(m.dtype).name} on this CPU" * on_cpu
        print(f"compiling the train step ({train_step.cfg.task}, mesh {mesh}{multiply}) ...", flush=True)
    compiled, seconds = train_step.compile()
    if jax.process_index() == 0:
        print(f"compiled in {seconds:.1f} s", flush=True)
    return compiled, seconds


def _closing_note(logger, cfg, start: int, last: int, ran_out: bool, preempted: tuple[int, float] | None,
                  compile_s: float, wall: float):
    if ran_out:
        logger.note(f"the data ran out (data.num_epochs={cfg.data.num_epochs}) after step {last} of {cfg.run.steps}: "
                    f"{last - start} steps in {wall:.1f} s; output in {cfg.run.output_dir}")
    elif preempted is not None:
        step, seconds = preempted
        logger.note(f"preempted: checkpoint {step} committed {seconds:.1f} s after the notice; "
                    f"exit code {PREEMPTED_EXIT_CODE}: run the same command to resume")
    elif start >= cfg.run.steps:
        logger.note(f"nothing to do: the checkpoint in {cfg.run.output_dir} is already at step {start} of {cfg.run.steps}; "
                    "raise run.steps to continue, or train again with another run.output_dir or checkpoint.overwrite=true")
    else:
        logger.note(f"done: {cfg.run.steps - start} steps in {wall:.1f} s (+ compile {compile_s:.1f} s); "
                    f"output in {cfg.run.output_dir}")
