"""The model families the trainer knows, by the config's `task`: each a Task (pretrain/tasks/base.py)."""

from pretrain.config import ConfigError
from pretrain.tasks.diffusion import DiffusionTask
from pretrain.tasks.lm import LanguageModelTask

TASKS = {"llm": LanguageModelTask, "diffusion": DiffusionTask}


def task_class(name: str) -> type:
    if name not in TASKS:
        raise ConfigError(f"task='{name}' is not known; use one of {sorted(TASKS)}")
    return TASKS[name]
