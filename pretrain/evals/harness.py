"""EleutherAI's lm-evaluation-harness scored by this stack's language model: `pretrain eval`, and
eval.harness_* during training.

`JaxLM` is an lm_eval model: log-likelihoods, rolling log-likelihoods and greedy generations come
from the model's own forward pass, on whatever mesh its parameters live. Requests are tokenised as
the harness's Hugging Face backend tokenises them (BOS first, the context's trailing spaces moved
to the continuation), so its scores and ours agree on an exported model. Rows go through a few
fixed shapes (`batch_size` rows, lengths rounded up to a power of two), so compiles stay few.
"""

import logging
import os
from pathlib import Path
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from data.tokenizer import Tokenizer
from pretrain.config import ConfigError

MIN_LENGTH = 16  # the shortest padded length


def _lm_eval():
    try:
        import lm_eval  # noqa: PLC0415 - an optional dependency: `pip install .[eval]`
        import lm_eval.api.model  # noqa: PLC0415
        import lm_eval.tasks  # noqa: PLC0415
        import lm_eval.utils  # noqa: PLC0415
    except ImportError:
        raise ConfigError("lm-evaluation-harness is not installed; pip install '.[eval]' (lm_eval)") from None
    for name in ("lm-eval", "lm_eval"):  # its per-request progress lines drown the run's log
        logging.getLogger(name).setLevel(logging.WARNING)
    return lm_eval


@nnx.jit
def _scores(model, inputs, targets, segment_ids):
    """Per position: the log-probability of the target token, and whether it is the greedy choice."""
    positions = jnp.broadcast_to(jnp.arange(inputs.shape[1]), inputs.shape)
    logprobs = jax.nn.log_softmax(model.logits(model(inputs, segment_ids, positions)), axis=-1)
    picked = jnp.take_along_axis(logprobs, targets[..., None], axis=-1)[..., 0]
    return picked, jnp.argmax(logprobs, axis=-1) == targets


@nnx.jit
def _next_tokens(model, inputs, segment_ids, last):
    """Each row's greedy next token after its position `last`."""
    positions = jnp.broadcast_to(jnp.arange(inputs.shape[1]), inputs.shape)
    hidden = jnp.take_along_axis(model(inputs, segment_ids, positions), last[:, None, None], axis=1)
    return jnp.argmax(model.logits(hidden)[:, 0], axis=-1)


def _host(arrays) -> list[np.ndarray]:
    """Whole arrays on this host, wherever their shards live (every process of a run gets them all)."""
    return [np.asarray(multihost_utils.process_allgather(a, tiled=True)) for a in arrays]


def _padded(rows: list[list[int]], batch_size: int, max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, segment ids) of `rows`, right-padded to [batch_size, the next power of two]."""
    length = min(max_length, max(MIN_LENGTH, 1 << (max(map(len, rows)) - 1).bit_length()))
    ids, segments = np.zeros((batch_size, length), np.int32), np.zeros((batch_size, length), np.int32)
    for i, row in enumerate(rows):
        ids[i, : len(row)], segments[i, : len(row)] = row, 1
    return ids, segments


class _Scoring:
    """The model's side of an lm_eval TemplateLM (which make_lm puts it with): tokenising as the
    Hugging Face backend does, scoring and generating."""

    def __init__(self, model, tokenizer: Tokenizer, batch_size: int):
        super().__init__()
        self.model, self.tokenizer, self.batch_size, self.max_length = model, tokenizer, batch_size, model.cfg.max_seq_len

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer.bos_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        ids = self.tokenizer.encode([string])[0]
        return ids if add_special_tokens is False else [self.tokenizer.bos_id, *ids]

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(sum of the continuation's log-probabilities, whether it is all greedy) per request,
        its tokens cut on the left to max_length + 1 as the Hugging Face backend cuts them."""
        rows = [(context + continuation)[-(self.max_length + 1):] for _, context, continuation in requests]
        picked, greedy = self._score([r[:-1] for r in rows], [r[1:] for r in rows])
        out = []
        for (_, _, continuation), row, p, g in zip(requests, rows, picked, greedy):
            span = slice(len(row) - 1 - len(continuation), len(row) - 1)
            out.append((float(np.sum(p[span], dtype=np.float64)), bool(g[span].all())))
        return out

    def _score(self, inputs: list[list[int]], targets: list[list[int]]):
        """Per-position log-probabilities and greedy flags of each row, longest rows batched first."""
        order = sorted(range(len(inputs)), key=lambda i: -len(inputs[i]))
        picked, greedy = [None] * len(inputs), [None] * len(inputs)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            ids, segments = _padded([inputs[i] for i in chunk], self.batch_size, self.max_length)
            wanted, _ = _padded([targets[i] for i in chunk], self.batch_size, ids.shape[1])
            p, g = _host(_scores(self.model, ids, wanted, segments))
            for row, i in enumerate(chunk):
                picked[i], greedy[i] = p[row], g[row]
        return picked, greedy

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each text's log-likelihood, in disjoint windows of max_length tokens, as the harness's
        Hugging Face backend makes them."""
        utils, windows, owners = _lm_eval().utils, [], []
        for i, (text,) in enumerate(r.args for r in requests):
            for context, continuation in map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owners.append(i)
        totals = np.zeros(len(requests))
        for i, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows)):
            totals[i] += logprob
        return totals.tolist()

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations, each cut at the first of its stop strings (or at EOS)."""
        args = [r.args for r in requests]
        return [text for start in range(0, len(args), self.batch_size)
                for text in self._greedy(args[start : start + self.batch_size])]

    def _greedy(self, chunk: list[tuple[str, dict]]) -> list[str]:
        """One padded pass per token for a batch of (context, generation settings): the shapes
        stay the few of the log-likelihoods'."""
        budgets = [int(kwargs.get("max_gen_toks", 256)) for _, kwargs in chunk]
        stops = [[u] if isinstance(u, str) else list(u or []) for u in (kwargs.get("until") for _, kwargs in chunk)]
        # The context keeps the room the generation needs (at least its last token), cut on the left.
        rows = [self.tok_encode(context)[-max(1, self.max_length - b):] for (context, _), b in zip(chunk, budgets)]
        made, live = [[] for _ in chunk], set(range(len(chunk)))
        while live:
            ids, segments = _padded([r + m for r, m in zip(rows, made)], self.batch_size, self.max_length)
            last = np.zeros(self.batch_size, np.int32)
            last[: len(chunk)] = [len(r) + len(m) - 1 for r, m in zip(rows, made)]
            (tokens,) = _host((_next_tokens(self.model, ids, segments, last),))
            for i in sorted(live):
                if tokens[i] != self.tokenizer.eos_id:
                    made[i].append(int(tokens[i]))
                text = self.tokenizer.decode(made[i])
                if (tokens[i] == self.tokenizer.eos_id or len(made[i]) >= budgets[i] or any(s in text for s in stops[i])
                        or len(rows[i]) + len(made[i]) >= self.max_length):
                    live.discard(i)
        texts = [self.tokenizer.decode(m) for m in made]
        return [t[: min((t.index(s) for s in stop if s in t), default=len(t))] for t, stop in zip(texts, stops)]


def make_lm(model, tokenizer: Tokenizer, batch_size: int):
    """An lm_eval model over `model` (a models.transformer.Transformer), `batch_size` rows per pass."""

    class JaxLM(_Scoring, _lm_eval().api.model.TemplateLM):
        pass

    return JaxLM(model, tokenizer, batch_size)


def load_tasks(names: list[str]) -> tuple[list[str], object]:
    """(task names, the harness's TaskManager) for names of its tasks or paths of task YAMLs, each
    task built once here (its dataset read): one that cannot load is a one-line ConfigError now,
    before any step."""
    lm_eval = _lm_eval()
    yamls = {n: Path(n).resolve() for n in names if n.endswith((".yaml", ".yml"))}
    missing = [n for n, p in yamls.items() if not p.is_file()]
    if missing:
        raise ConfigError(f"no task YAML at {', '.join(missing)}; give lm-eval task names or paths of task YAMLs")
    manager = lm_eval.tasks.TaskManager(include_path=sorted({str(p.parent) for p in yamls.values()}) or None)
    specs = []
    for name in names:
        if name not in yamls:
            specs.append(name)
            continue
        defined = [t for t, e in manager.task_index.items() if e.yaml_path and Path(e.yaml_path).resolve() == yamls[name]]
        if not defined:
            raise ConfigError(f"{name} defines no lm-eval task; a task YAML names its task under `task:`")
        specs += defined
    unknown = [t for t in specs if not manager.match_tasks([t])]
    if unknown:
        raise ConfigError(f"unknown lm-eval task {', '.join(unknown)}; see `lm_eval ls tasks`, or give a task YAML's path")
    try:
        manager.load(specs)
    except Exception as e:  # noqa: BLE001 - a dataset it cannot fetch, a broken YAML: whatever the harness raises
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"lm-eval tasks {', '.join(specs)} cannot load: {first}") from None
    return specs, manager


def evaluate(lm, tasks: tuple[list[str], object], *, num_fewshot: int | None = None, limit: int | None = None,
             bootstrap_iters: int = 0, log_samples: bool = False, progress: bool = True) -> dict:
    """The harness's results (its `simple_evaluate`) of `lm` on `tasks` (from load_tasks); without
    `progress`, none of its progress bars (which a training log does not want)."""
    names, manager = tasks
    quiet = {} if progress else {"TQDM_DISABLE": "1"}
    with mock.patch.dict(os.environ, quiet):
        return _lm_eval().simple_evaluate(model=lm, tasks=names, task_manager=manager, num_fewshot=num_fewshot,
                                          limit=limit or None, bootstrap_iters=bootstrap_iters, log_samples=log_samples)


def table(results: dict) -> str:
    return _lm_eval().utils.make_table(results)


def metric_row(results: dict) -> dict[str, float]:
    """{"harness/TASK/METRIC": value} of every score the harness reports, its standard errors aside
    (a filter other than "none" follows the metric: harness/TASK/METRIC/FILTER)."""
    row = {}
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            metric, _, kind = key.partition(",")
            if metric in results["higher_is_better"].get(task, {}):
                row[f"harness/{task}/{metric}" + (f"/{kind}" if kind != "none" else "")] = float(value)
    return row
