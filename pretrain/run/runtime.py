"""Process-level set-up that must happen before JAX touches a device (faked CPU devices,
jax.distributed, the compilation cache), and the watchdog that ends a stuck run."""

import contextlib
import faulthandler
import os
import queue
import socket
import sys
import threading
import time
from pathlib import Path

import jax

from pretrain.config import ConfigError
from pretrain.config.checks import validate_runtime
from pretrain.config.schema import Config

# Exit codes, the contract with the launchers: 0 the run finished, 2 bad input and 4 a run whose
# steps stopped being finite (no retry helps either: a retry would diverge again), 3 a stuck step,
# 75 preempted with its checkpoint committed (sysexits' EX_TEMPFAIL); a retry of 3, 75 or any other
# failure resumes from the last checkpoint.
BAD_INPUT_EXIT_CODE = 2
STUCK_EXIT_CODE = 3
DIVERGED_EXIT_CODE = 4
PREEMPTED_EXIT_CODE = 75


def setup(cfg: Config):
    """Faked CPU devices, the multi-process runtime and the persistent compilation cache, as the config asks."""
    r = cfg.runtime
    validate_runtime(r)
    if r.fake_cpu_devices > 0:
        try:
            jax.config.update("jax_platforms", "cpu")
            jax.config.update("jax_num_cpu_devices", r.fake_cpu_devices)
        except RuntimeError:  # backends already up (an embedding program, a test session)
            if jax.local_device_count() != r.fake_cpu_devices:
                raise ConfigError(
                    f"runtime.fake_cpu_devices={r.fake_cpu_devices}, but JAX already started with "
                    f"{jax.local_device_count()} devices; set it before JAX initialises, or match the running count"
                ) from None
    _distributed(r)
    if r.fake_cpu_devices > 0:
        _size_cpu_thread_pool(r.fake_cpu_devices)
    if r.compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", str(Path(r.compilation_cache_dir).expanduser()))


def _size_cpu_thread_pool(devices_per_process: int):
    """XLA's CPU client runs with a thread pool of max(cores or $PJRT_NPROC, its devices), and how a
    matmul splits its sum follows the pool, so its roundings do too: sized by the run's devices
    rather than the process's, 1 process x 8 devices and 2 x 4 compute the same bits. Read when
    the client starts: after jax.distributed (which knows the process count without starting a
    backend, as jax.process_count() would), before any device."""
    from jax._src import distributed  # noqa: PLC0415

    processes = distributed.global_state.num_processes if jax.distributed.is_initialized() else 1
    os.environ["PJRT_NPROC"] = str(max(len(os.sched_getaffinity(0)), devices_per_process * processes))


def _detected_cluster(timeout_s: int):
    """(coordinator, process count, rank) from JAX's own cluster detection (TPU VM, GKE, Slurm under
    srun, Open MPI: what jax.distributed.initialize() would find), or None outside a cluster."""
    from jax._src.clusters import ClusterEnv  # noqa: PLC0415 - the detection has no public entry point

    if not any(env.is_env_present() for env in ClusterEnv._cluster_types if not env.opt_in_only_method):
        return None
    return ClusterEnv.auto_detect_unset_distributed_params(None, None, None, None, None, timeout_s)[:3]


def _wait_for_coordinator(address: str, timeout_s: int):
    """Ranks other than 0 check that process 0's coordinator answers before joining: JAX aborts the
    process, with a stack trace, when it does not."""
    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection((host, int(port)), timeout=2).close()
            return
        except OSError as e:
            if time.monotonic() > deadline:
                raise ConfigError(f"the coordinator {address} was not reached within runtime.init_timeout_s={timeout_s} "
                                  f"({e.strerror or e}); start process 0 first, check the address and port") from None
            time.sleep(0.5)


def _distributed(r):
    if jax.distributed.is_initialized() or r.distributed == "off":
        return
    if r.distributed == "explicit":
        coordinator, count, rank = r.coordinator, r.num_processes, r.process_id
    else:
        found = _detected_cluster(r.init_timeout_s)
        if found is None:
            if r.num_processes > 1:
                raise ConfigError(f"runtime.num_processes={r.num_processes}, but no cluster was detected (TPU VM, GKE, "
                                  "Slurm under srun, Open MPI); launch with launch/ or use runtime.distributed=explicit")
            return
        coordinator, count, rank = found
        if r.num_processes and r.num_processes != count:
            raise ConfigError(f"runtime.num_processes={r.num_processes}, but the cluster has {count} processes; "
                              "drop the key or make it match")
    if rank != 0:
        _wait_for_coordinator(coordinator, r.init_timeout_s)
    jax.distributed.initialize(coordinator, count, rank, initialization_timeout=r.init_timeout_s,
                               heartbeat_timeout_seconds=r.heartbeat_timeout_s)


def wait_for_all(name: str, timeout_s: int):
    """A barrier of every process through the coordination service (no-op for one process). Used
    after each process's compile, whose length varies: the first CPU collective (gloo) gives up
    on peers that are more than 30 s late."""
    if jax.process_count() > 1:
        from jax._src import distributed  # noqa: PLC0415 - the client's barrier is what Orbax uses too

        distributed.global_state.client.wait_at_barrier(name, timeout_s * 1000)


def agreed(name: str, value: bool, timeout_s: int) -> bool:
    """Process 0's `value`, the same on every process: a decision taken on one clock (through the
    coordination service's key-value store, as Orbax's time-based save policy does; no devices)."""
    if jax.process_count() == 1:
        return value
    from jax._src import distributed  # noqa: PLC0415

    client = distributed.global_state.client
    if jax.process_index() == 0:
        client.key_value_set(name, str(int(value)))
    return client.blocking_key_value_get(name, timeout_s * 1000) == "1"


def gathered(name: str, value: str, timeout_s: int) -> list[str]:
    """Every process's `value`, in process order, on every process (the coordination service's
    key-value store; no devices)."""
    if jax.process_count() == 1:
        return [value]
    from jax._src import distributed  # noqa: PLC0415

    client = distributed.global_state.client
    client.key_value_set(f"{name}/{jax.process_index()}", value)
    return [client.blocking_key_value_get(f"{name}/{i}", timeout_s * 1000) for i in range(jax.process_count())]


class Watchdog:
    """Ends the process with exit code 3 when no step has finished for `timeout_s` while the loop
    is training: an alive but stuck process (a hung collective, a hung read, or a peer stuck in
    either) is not something JAX detects.

    Used as a context around the loop, which hands over each step's outputs (`dispatched`); a
    thread waits for them in order, so the loop itself never blocks. `paused()` covers the time
    spent outside steps (evals, saves)."""

    def __init__(self, timeout_s: float, step: int):
        self.timeout_s, self.done = timeout_s, step
        self.steps = queue.Queue()
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.last_progress, self.pauses = time.monotonic(), 0
        self.threads = [threading.Thread(target=f, daemon=True) for f in (self._wait_in_order, self._check)]

    def __enter__(self):
        if self.timeout_s > 0:
            for t in self.threads:
                t.start()
        return self

    def __exit__(self, *exc):
        self.stopped.set()
        self.steps.put(None)

    def dispatched(self, step: int, outputs):
        if self.timeout_s > 0:
            self.steps.put((step, outputs))

    @contextlib.contextmanager
    def paused(self):
        with self.lock:
            self.pauses += 1
        try:
            yield
        finally:
            with self.lock:
                self.pauses -= 1
                self.last_progress = time.monotonic()

    def _wait_in_order(self):
        while (item := self.steps.get()) is not None:
            step, outputs = item
            jax.block_until_ready(outputs)
            with self.lock:
                self.done, self.last_progress = step, time.monotonic()

    def _check(self):
        while not self.stopped.wait(min(1.0, self.timeout_s / 4)):
            with self.lock:
                stuck = not self.pauses and time.monotonic() - self.last_progress > self.timeout_s
            if stuck:
                print(f"error: step {self.done + 1} did not finish within runtime.step_timeout_s={self.timeout_s:g} s "
                      f"(process {jax.process_index()}); exiting with code {STUCK_EXIT_CODE} so that a retry resumes "
                      "from the last checkpoint; where every thread was:", file=sys.stderr, flush=True)
                faulthandler.dump_traceback(file=sys.stderr, all_threads=True)  # the evidence of where it hung
                os._exit(STUCK_EXIT_CODE)
