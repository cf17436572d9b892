"""Asynchronous Orbax checkpoints under run.output_dir/checkpoints/<step>/, local or gs://.

Each step holds the items `params` (the model), `optimizer` (its state and step count),
`ema` (the moving average of the parameters, if the run keeps one), `data_position` (how
many records each row of the global batch has read: one global array, so it restores onto
any number of processes) and `config` (the resolved config as JSON).
Params are a separate item so that a run can start from another run's (or an imported
model's) weights with a fresh optimizer. Orbax writes each step into a temporary directory
and commits it only when complete, so a kill mid-save leaves the previous steps intact and
the partial one invisible to a resume (`committed_steps`).

With checkpoint.local_dir, a local tier holds the same items between the persistent saves, each
process's shards in its own directory on its own host (LocalCheckpointer); a restart resumes from
the newest step that either tier holds whole (`starting_point`).
"""

import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable, Iterable

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.experimental.v1 import partial as ocp_partial
import yaml
from etils import epath

from pretrain import config as config_lib
from pretrain.config import ConfigError
from pretrain.config.schema import Config
from pretrain.run import runtime


DATA_ITEM = "data_position"  # records read by each row of the global batch (data/pipeline.py)


def absolute(path: str) -> epath.Path:
    """Orbax's TensorStore writer wants absolute paths; gs:// ones already are."""
    return epath.Path(path if "://" in str(path) else os.path.abspath(path))


def _manager(directory: epath.Path, cfg: Config) -> ocp.CheckpointManager:
    c = cfg.checkpoint
    options = ocp.CheckpointManagerOptions(
        max_to_keep=c.keep or None,
        keep_period=c.keep_every or None,
        enable_async_checkpointing=c.async_,
        cleanup_tmp_directories=True,  # partial saves of a killed run are removed, never read
    )
    return ocp.CheckpointManager(directory, options=options)


def committed_steps(directory: epath.Path) -> list[int]:
    """The committed steps in a checkpoints directory (partial saves are not among them)."""
    return sorted(ocp.path.step.checkpoint_steps(directory)) if directory.exists() else []


def _checkpoints_dir(path: str) -> tuple[epath.Path, int | None]:
    """(checkpoints directory, step or None) for a run dir, its checkpoints/ dir, or one step's dir."""
    path = absolute(path)
    if path.name.isdigit():
        return path.parent, int(path.name)
    return (path / "checkpoints" if (path / "checkpoints").exists() else path), None


class Checkpointer:
    """Saves the run's state (async) and restores it: the persistent tier, run.output_dir/checkpoints."""

    tier = "persistent"

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.manager = _manager(absolute(cfg.run.output_dir) / "checkpoints", cfg)

    def save(self, step: int, state, data_position) -> float:
        """Start saving `step` (the train state, one item per part, and the data position, a global
        array); returns the seconds the loop was blocked (the device-to-host copy)."""
        start = time.perf_counter()
        items = {name: self._save(part) for name, part in state.items()}
        items[DATA_ITEM] = self._save({"positions": data_position})
        items["config"] = ocp.args.JsonSave(config_lib.to_dict(self.cfg))
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        return time.perf_counter() - start

    def restore(self, step: int, abstract_state, abstract_position) -> tuple[dict, object]:
        """(the parts of the state of `step` by name, the data position or None if the checkpoint has
        none), placed straight into the shardings of the abstract arguments."""
        items = {name: self._restore(part) for name, part in abstract_state.items()}
        if DATA_ITEM in self._items(step):
            items[DATA_ITEM] = self._restore({"positions": abstract_position})
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        position = restored[DATA_ITEM]["positions"] if DATA_ITEM in items else None
        return {name: restored[name] for name in abstract_state}, position

    def _save(self, tree):
        return ocp.args.StandardSave(tree)

    def _restore(self, abstract):
        return ocp.args.StandardRestore(abstract)

    def _items(self, step: int) -> set[str]:
        return {p.name for p in (self.manager.directory / str(step)).iterdir()}

    def reached_preemption(self, step: int) -> bool:
        """True on every host at the same step once any host got a preemption notice (multi-host)."""
        return self.manager.reached_preemption(step)

    def wait(self) -> float:
        start = time.perf_counter()
        self.manager.wait_until_finished()
        return time.perf_counter() - start

    def close(self):
        self.manager.close()


# --- the local tier (checkpoint.local_dir) ---------------------------------------------------


def _local_root(cfg: Config) -> epath.Path:
    """This process's own directory of the local tier. A replaced host, or a process numbered
    differently after a restart, finds none of its steps there."""
    return absolute(cfg.checkpoint.local_dir) / cfg.run.name / f"process_{jax.process_index()}"


def _layout(cfg: Config) -> dict:
    """What this process's local shards are valid for: this run, as many processes, the same
    devices in this one, the same mesh. Anything else restores from the persistent tier."""
    return {"output_dir": str(absolute(cfg.run.output_dir)), "processes": jax.process_count(),
            "devices": sorted(d.id for d in jax.local_devices()), "mesh": config_lib.to_dict(cfg)["mesh"]}


def _written_under_this_layout(root: epath.Path, cfg: Config) -> bool:
    return (root / "layout.json").exists() and json.loads((root / "layout.json").read_text()) == _layout(cfg)


def local_steps(cfg: Config) -> list[int]:
    """The steps this process holds whole in its local directory, written under this layout."""
    root = _local_root(cfg)
    if not cfg.checkpoint.local_dir or not _written_under_this_layout(root, cfg):
        return []
    return committed_steps(root / "checkpoints")


def _local_manager(directory: epath.Path, cfg: Config, items: list[str]) -> ocp.CheckpointManager:
    """Each process its own primary: it writes every shard it holds, replicas too, and commits alone."""
    processes = ocp.options.MultiprocessingOptions(primary_host=None, barrier_sync_key_prefix="local")
    arrays = ocp.type_handlers.create_type_handler_registry(
        (jax.Array, ocp.type_handlers.ArrayHandler(primary_host=None, replica_id=None, use_replica_parallel=False)))
    registry = ocp.DefaultCheckpointHandlerRegistry()
    for item in (*items, DATA_ITEM):
        handler = ocp.PyTreeCheckpointHandler(multiprocessing_options=processes, type_handler_registry=arrays)
        registry.add(item, ocp.args.PyTreeSave, handler)
        registry.add(item, ocp.args.PyTreeRestore, handler)
    registry.add("config", ocp.args.JsonSave, ocp.JsonCheckpointHandler(multiprocessing_options=processes))
    options = ocp.CheckpointManagerOptions(
        max_to_keep=2, enable_async_checkpointing=cfg.checkpoint.async_, cleanup_tmp_directories=True,
        multiprocessing_options=processes, save_root_metadata=False, enable_per_process_directory_creation=True,
        single_host_load_and_broadcast=False)
    return ocp.CheckpointManager(directory, options=options, handler_registry=registry)


class LocalCheckpointer(Checkpointer):
    """The local tier: every process writes the shards it holds into its own directory under
    checkpoint.local_dir, as Orbax's emergency checkpointing does; no process reads another's disk.
    The two latest steps are kept, so that a kill while some processes had committed the newest
    leaves the one before whole on all."""

    tier = "local"

    def __init__(self, cfg: Config, items: list[str], start: int):
        """items: the names of the state's parts; start: the step the run starts from (local steps
        after it, left by an attempt that went further than the tier resumed from, are removed)."""
        self.cfg, root = cfg, _local_root(cfg)
        # Orbax warns at every item of every local save that it does not log global sizes then.
        logging.getLogger("absl").addFilter(lambda r: "Global object size logging disabled" not in r.getMessage())
        if root.exists() and not _written_under_this_layout(root, cfg):
            root.rmtree()  # nothing in it can be restored here
        for step in committed_steps(root / "checkpoints"):
            if step > start:  # by hand: Orbax's delete waits for every process, and only some hold it
                (root / "checkpoints" / str(step)).rmtree()
        root.mkdir(parents=True, exist_ok=True)
        (root / "layout.json").write_text(json.dumps(_layout(cfg)))
        self.manager = _local_manager(root / "checkpoints", cfg, items)

    def _save(self, tree):
        return ocp.args.PyTreeSave(tree)

    def _restore(self, abstract):
        return ocp.args.PyTreeRestore(abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract))


def locate(path: str, step: int | None = None) -> tuple[epath.Path, int]:
    """(checkpoints directory, step) for a run dir, its checkpoints/ dir or one step's dir: the given
    step, else the one the path names, else the latest."""
    directory, named = _checkpoints_dir(path)
    steps = committed_steps(directory)
    if not steps:
        raise ConfigError(f"{path} holds no checkpoint; point at a run directory (run.output_dir), its checkpoints/ "
                          "or one step's directory")
    step = step if step is not None else named if named is not None else max(steps)
    if step not in steps:
        raise ConfigError(f"{path} has no checkpoint of step {step}; it has steps {steps}")
    return directory, step


def run_dir(directory: epath.Path) -> epath.Path:
    """The run directory of a checkpoints directory."""
    return directory.parent if directory.name == "checkpoints" else directory


def saved_config(directory: epath.Path, step: int) -> Config:
    """The resolved config stored with a checkpoint."""
    tree = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(directory / str(step) / "config")
    return config_lib.from_dict(tree)


def restore_params(path: str, abstract_params, step: int | None = None, item: str = "params"):
    """Only the model parameters (or, item="ema", their moving average) of a checkpoint (see `locate`
    for which step), into the shardings of `abstract_params`."""
    directory, step = locate(path, step)
    return ocp.StandardCheckpointer().restore(directory / str(step) / item, abstract_params)


def restore_array(directory: epath.Path, keys: tuple[str, ...], shape: tuple[int, ...], dtype) -> np.ndarray:
    """One parameter of a saved item (its path of keys, e.g. ("layers", "wq")) as a NumPy array in
    host memory, without reading the others."""
    def nested(leaf):
        for key in reversed((*keys, "value")):  # each parameter is saved as its variable's value
            leaf = {key: leaf}
        return leaf

    args = ocp.args.PyTreeRestore(item=nested(jax.ShapeDtypeStruct(shape, dtype)), partial_restore=True,
                                  restore_args=nested(ocp.RestoreArgs(restore_type=np.ndarray)))
    tree = ocp.PyTreeCheckpointer().restore(directory, args=args)
    for key in (*keys, "value"):
        tree = tree[key]
    return tree


class _OneAtATime(ocp.CheckpointHandler):
    """Writes a parameters item a few tensors at a time with Orbax's partial saves, each an addition
    to the same pytree, then moves the finished pytree where the step's item belongs: the item reads
    back as if the whole tree had been saved at once. Small tensors go together (up to BATCH_BYTES),
    since each partial save costs a commit."""

    BATCH_BYTES = 32 * 2**20

    def save(self, directory: epath.Path, args: "StreamedSave"):
        build = directory.parent / f"{directory.name}.build"
        batch, size = {}, 0
        for key, thunk in args.tensors:
            leaf = jax.device_put(thunk(), jax.devices("cpu")[0])  # Orbax writes a NumPy array through a copy
            node = batch
            for part in key.split("/"):
                node = node.setdefault(part, {})
            node["value"] = leaf  # each parameter is saved as its variable's value
            size += leaf.nbytes
            del leaf, node
            if size >= self.BATCH_BYTES:
                ocp_partial.save(build, batch)
                batch, size = {}, 0  # let them go before the next are made
        if batch:
            ocp_partial.save(build, batch)
        ocp_partial.finalize(build)
        if directory.exists():
            directory.rmdir()
        (build / "state").rename(directory)
        build.rmtree()

    def restore(self, directory: epath.Path, args=None):
        raise NotImplementedError("a parameters item reads back with ocp.args.StandardRestore")


@ocp.args.register_with_handler(_OneAtATime, for_save=True, for_restore=True)
@dataclasses.dataclass
class StreamedSave(ocp.args.CheckpointArgs):
    tensors: Iterable[tuple[str, Callable[[], np.ndarray]]]


def save_params(cfg: Config, tensors: Iterable[tuple[str, Callable[[], np.ndarray]]]):
    """A checkpoint of parameters alone (step 0, no optimizer or data position) under
    run.output_dir, such as an imported model that training can start from. tensors: [(path such as
    "layers/wq", thunk giving that parameter)], written a few at a time, so that host memory holds
    the largest parameter and at most 32 MiB of others, never the model."""
    manager = _manager(absolute(cfg.run.output_dir) / "checkpoints", cfg)
    items = {"params": StreamedSave(tensors), "config": ocp.args.JsonSave(config_lib.to_dict(cfg))}
    manager.save(0, args=ocp.args.Composite(**items), force=True)
    manager.wait_until_finished()
    manager.close()


# --- before a run writes anything ---------------------------------------------------------

# How the model runs, not what it holds.
EXECUTION_KEYS = {"dtype", "remat", "scan_layers", "attention", "splash_block_q", "splash_block_kv"}


def for_this_launch(cfg: Config) -> Config:
    """cfg, with checkpoint.overwrite off if run.output_dir was written by this very launch
    (run.launch_id, which the launchers keep across retries): a retry resumes, never clears."""
    saved_path = epath.Path(cfg.run.output_dir) / "config.yaml"
    if not (cfg.checkpoint.overwrite and cfg.run.launch_id and saved_path.exists()):
        return cfg
    saved = yaml.safe_load(saved_path.read_text()) or {}
    if saved.get("run", {}).get("launch_id") != cfg.run.launch_id:
        return cfg
    return dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, overwrite=False))


def check_output_dir(cfg: Config):
    """Refuse a run.output_dir that holds another run or another model, unless checkpoint.overwrite."""
    out = epath.Path(cfg.run.output_dir)
    saved_path = out / "config.yaml"
    if cfg.checkpoint.overwrite or not saved_path.exists():
        return
    saved = yaml.safe_load(saved_path.read_text()) or {}
    fix = "choose another run.output_dir, or pass checkpoint.overwrite=true to replace it"
    saved_name = saved.get("run", {}).get("name")
    if saved_name != cfg.run.name or saved.get("task") != cfg.task:
        raise ConfigError(f"run.output_dir={out} holds run '{saved_name}' ({saved.get('task')}), not '{cfg.run.name}'; {fix}")
    was = _model_differences(cfg, saved.get("model", {}))
    if was:
        raise ConfigError(f"run.output_dir={out} holds a model with {was}; {fix}")


def _model_differences(cfg: Config, saved_model: dict) -> str:
    """The saved model's settings that differ from cfg.model in what the parameters hold, or ''."""
    current = config_lib.to_dict(cfg)["model"]
    # A key that an older config lacks held its default then (model.rope_scaling, for one).
    saved_model = config_lib.to_dict(type(cfg.model)()) | saved_model
    changed = [k for k in current if k not in EXECUTION_KEYS and saved_model.get(k) != current[k]]
    return ", ".join(f"model.{k}={saved_model.get(k)}" for k in changed)


@dataclasses.dataclass(frozen=True)
class Fresh:
    """Start from new parameters."""


@dataclasses.dataclass(frozen=True)
class Resume:
    """Continue this run from its checkpoint of `step`, in the persistent or the local tier."""

    step: int
    tier: str = Checkpointer.tier


@dataclasses.dataclass(frozen=True)
class InitFrom:
    """Start from the parameters of another checkpoint (`path`), with a fresh optimizer and data."""

    path: str


StartingPoint = Fresh | Resume | InitFrom


def starting_point(cfg: Config) -> StartingPoint:
    """What the run starts from, checked before anything is written."""
    wanted = cfg.checkpoint.resume_from
    own = [] if cfg.checkpoint.overwrite else committed_steps(epath.Path(cfg.run.output_dir) / "checkpoints")
    if wanted.isdigit():
        if int(wanted) not in own:
            raise ConfigError(f"checkpoint.resume_from={wanted}: no such step in {cfg.run.output_dir}/checkpoints "
                              f"(it has {own or 'none'})")
        later = [s for s in own if s > int(wanted)]
        if later:  # they would be overwritten as the run goes on
            raise ConfigError(f"checkpoint.resume_from={wanted}: later steps {later} exist in {cfg.run.output_dir}; "
                              f"start a new run.output_dir with checkpoint.resume_from={cfg.run.output_dir}/checkpoints/{wanted}")
        return Resume(int(wanted))
    # A preempted run continues from its own latest step, also when it began from another's params:
    # the local tier's where every process holds it whole and it is newer than the persistent one's.
    local = []
    if cfg.checkpoint.local_dir and not cfg.checkpoint.overwrite:
        local = _held_by_all(local_steps(cfg), cfg.runtime.init_timeout_s)
    if local and max(local) > max(own, default=-1):
        return Resume(max(local), LocalCheckpointer.tier)
    if own:
        return Resume(max(own))
    if wanted:
        try:
            directory, step = locate(wanted)
        except ConfigError as e:
            raise ConfigError(f"checkpoint.resume_from: {e}") from None
        was = _model_differences(cfg, config_lib.to_dict(saved_config(directory, step))["model"])
        if was:
            raise ConfigError(f"checkpoint.resume_from={wanted} holds a model with {was}; set the model keys to match it")
        return InitFrom(wanted)
    return Fresh()


def _held_by_all(steps: list[int], timeout_s: int) -> list[int]:
    """The steps every process holds, on every process."""
    held = [set(json.loads(v)) for v in runtime.gathered("local_steps", json.dumps(steps), timeout_s)]
    return sorted(set.intersection(*held))


def clear_output_dir(cfg: Config):
    """checkpoint.overwrite=true: remove what an earlier run left, so its steps are never mistaken for ours."""
    out = epath.Path(cfg.run.output_dir)
    for name in ("checkpoints", "tensorboard", "goodput"):
        if (out / name).exists():
            (out / name).rmtree()
    if (out / "metrics.jsonl").exists():
        (out / "metrics.jsonl").unlink()
