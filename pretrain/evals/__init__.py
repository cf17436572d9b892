"""Downstream evaluation of the language model: EleutherAI's lm-evaluation-harness scored by the
JAX model (harness.py), for `pretrain eval` and for eval.harness_* during training."""
