"""The train step: sharded state creation and the jitted train and eval steps, without the loop.

State is an nnx.State of {"params": model, "optimizer": its state, "ema": the moving average of
the parameters (with train.ema_decay)}, named like the checkpoint items that hold them, and
travels through jax.jit as a pure pytree with explicit shardings and donated buffers; the graph
is split once, not per step. The EMA is a second copy of the model, so it is sharded like the
parameters. A step's randomness (what the diffusion loss draws) comes from run.seed and the step
number, so a resumed run draws what an uninterrupted one would.
"""

import contextlib
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding

from pretrain.config.schema import Config
from pretrain.train import optim
from pretrain.train.sharding import global_batch, logical_spec, process_rows, within_slice


def ema_decay(decay: float, updates: int):
    """The EMA's decay at its update number `updates` (0, 1, ...): low at first, so the average
    soon leaves the random initial weights, then `decay`."""
    return jnp.minimum(decay, (1.0 + updates) / (10.0 + updates))


class TrainStep:
    """A run's compiled step and everything it is built from: the abstract state and its shardings,
    the batch layout, the jitted train and eval steps. `pretrain plan` and the benchmarks use it
    alone; `pretrain.train.loop.fit` runs it."""

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
        self.train_jit = jax.jit(
            self.train_step,
            in_shardings=(self.state_shardings, self.batch_sharding),
            out_shardings=(self.state_shardings, None),
            donate_argnums=0,
        )
        self.eval_jit = jax.jit(self.eval_step, in_shardings=(self.state_shardings, self.batch_sharding))

    @functools.cached_property
    def rows(self) -> list[int]:
        """The rows of each global batch that this process reads (its devices hold them)."""
        return process_rows(self.batch_sharding, self.cfg.train.global_batch)

    @contextlib.contextmanager
    def context(self):
        """Mesh and logical-axis rules, active wherever models are traced."""
        with jax.set_mesh(self.mesh), nnx.logical_axis_rules(self.rules):
            yield

    def _create(self) -> dict:
        model = self.task.build_model(nnx.Rngs(self.cfg.run.seed))
        parts = {"params": model, "optimizer": nnx.Optimizer(model, self.tx, wrt=nnx.Param)}
        return parts | ({"ema": nnx.clone(model)} if self.cfg.train.ema_decay else {})

    def init_state(self) -> nnx.State:
        """Parameters, optimizer state (and EMA), created by one jitted call straight into their shardings."""
        with self.context():
            return jax.jit(lambda: nnx.split(self._create())[1], out_shardings=self.state_shardings)()

    # --- the steps ------------------------------------------------------------------------

    def _grads(self, params_graphdef, params, batch, key, rules=None):
        def loss_fn(p):
            total, weight, sums = self.task.loss(nnx.merge(params_graphdef, p), batch, self.mesh, rules or self.rules, key)
            return total, (weight, sums)

        (_, (weight, sums)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return grads, weight, sums

    def _grads_by_slice(self, params_graphdef, params, batch, key):
        """_grads of each slice's rows of `batch` apart, stacked [slices, ...] along `replica`: summed
        over the microbatches, they cross the slices' network (DCN) once per step, not once per
        microbatch. Each slice draws its randomness from its own key."""
        slices, inner = self.mesh.shape["replica"], within_slice(self.rules)
        rows = jax.tree.map(lambda x: x.reshape(slices, x.shape[0] // slices, *x.shape[1:]), batch)

        def one_slice(rows, i):
            with nnx.logical_axis_rules(inner):
                return self._grads(params_graphdef, params, rows, jax.random.fold_in(key, i), inner)

        return jax.vmap(one_slice, spmd_axis_name="replica")(rows, jnp.arange(slices))

    def train_step(self, state, batch):
        parts = nnx.merge(self.graphdef, state)
        model, optimizer = parts["params"], parts["optimizer"]
        params_graphdef, params = nnx.split(model)
        step = optimizer.step[...]
        key = jax.random.fold_in(jax.random.key(self.cfg.run.seed), step)
        k = self.cfg.train.microbatches
        if k == 1:
            grads, weight, sums = self._grads(params_graphdef, params, batch, key)
        else:
            # Microbatch i takes rows i, i+k, i+2k, ...: every device keeps its share of every microbatch.
            micro = jax.tree.map(lambda x: x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1), batch)

            grads_of = self._grads if self.mesh.shape["replica"] == 1 else self._grads_by_slice

            def accumulate(carry, inputs):
                mb, i = inputs
                mb = jax.lax.with_sharding_constraint(mb, self.batch_sharding)
                grads = grads_of(params_graphdef, params, mb, jax.random.fold_in(key, i))
                return jax.tree.map(jnp.add, carry, grads), None

            first = jax.tree.map(lambda x: x[0], micro)
            zero = jax.eval_shape(lambda: grads_of(params_graphdef, params, first, key))
            zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zero)
            (grads, weight, sums), _ = jax.lax.scan(accumulate, zero, (micro, jnp.arange(k)))
            if self.mesh.shape["replica"] > 1:  # the one reduction over the slices, in the compute dtype as in a microbatch
                dtype = jnp.dtype(self.cfg.model.dtype)
                grads = jax.tree.map(lambda g: jnp.sum(g.astype(dtype), axis=0).astype(g.dtype), grads)
                weight, sums = jax.tree.map(lambda x: jnp.sum(x, axis=0), (weight, sums))
        # Losses are sums over tokens; one division makes the step independent of how the batch was split.
        # What the step trained on: real target tokens (padding left out) or images, per dataset if the task counts so.
        units = sums.pop("units", weight)
        weight = jnp.maximum(weight, 1.0)
        grads = jax.tree.map(lambda g: g / weight, grads)
        metrics = {name: value / weight for name, value in sums.items()} | {"units": units}
        metrics["grad_norm"] = optax.tree.norm(grads)
        metrics["lr"] = self.lr(step)
        # A step that overflowed, in its loss, its gradients or the parameters it would leave, changes
        # nothing (parameters, optimizer state with its step count, EMA): the loop counts it skipped
        # (pretrain/train/loop.py's Guard), so no checkpoint ever holds a NaN or an infinity. The new
        # parameters are computed twice: here only checked, a pass that stores none of them, then, if
        # they pass, by the update that writes them in place. Choosing between new and old state after
        # the update would hold a second copy of parameters and moments and take a pass over both.
        p, g, s = (nnx.as_pure(x) for x in (nnx.state(model, nnx.Param), grads, optimizer.opt_state))
        new = optax.apply_updates(p, self.tx.update(g, s, p)[0])
        finite = [jnp.isfinite(metrics["loss"]), jnp.isfinite(metrics["grad_norm"])]
        metrics["finite"] = jnp.all(jnp.stack(finite + [jnp.isfinite(x).all() for x in jax.tree.leaves(new)]))
        return jax.lax.cond(metrics["finite"], self._update, lambda state, *_: state, state, grads, step), metrics

    def _update(self, state, grads, step):
        """The state after the optimizer's update with these gradients (and the EMA's)."""
        parts = nnx.merge(self.graphdef, state)
        model = parts["params"]
        parts["optimizer"].update(model, grads)
        if "ema" in parts:
            decay = ema_decay(self.cfg.train.ema_decay, step)
            ema = parts["ema"]
            nnx.update(ema, optax.incremental_update(nnx.state(model, nnx.Param), nnx.state(ema, nnx.Param), 1 - decay))
        return nnx.state(parts)

    def eval_step(self, state, batch):
        model = nnx.merge(self.graphdef, state)["params"]
        total, weight, sums = self.task.loss(model, batch, self.mesh, self.rules)
        return sums["loss"], weight

    def sampling_model(self, state):
        """The model to sample from: the EMA if the run keeps one."""
        parts = nnx.merge(self.graphdef, state)
        return parts.get("ema", parts["params"])

    def compile(self):
        """Ahead-of-time compile of the train step; returns (executable, seconds)."""
        start = time.perf_counter()
        with self.context():
            compiled = self.train_jit.lower(self.abstract_state_with_shardings(), self.batch_spec).compile()
        return compiled, time.perf_counter() - start

    def abstract_state_with_shardings(self):
        return jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), self.abstract_state, self.state_shardings
        )

    def place_batch(self, local_batch):
        return global_batch(local_batch, self.batch_sharding, self.cfg.train.global_batch)

    def data_position(self, positions: np.ndarray) -> jax.Array:
        """Where each row of the global batch is in its stream (this process's rows: `positions`, see
        data/pipeline.py), as one global array (for checkpoints)."""
        if positions.max(initial=0) >= 2**31:  # int32 without jax_enable_x64: refuse rather than wrap
            raise OverflowError(f"a data position ({positions.max()}) outgrew the checkpoint's int32")
        return self.place_batch({"p": positions.astype("int32")})["p"]

    def abstract_position(self) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct((self.cfg.train.global_batch,), "int32", sharding=self.batch_sharding)
