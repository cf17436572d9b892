"""JAX pretraining stack: trainer, CLI, sharding, optimizer, metrics."""
