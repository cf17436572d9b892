"""TPU hardware: the kinds and slices Cloud sells (kinds), and their devices as JAX sees them (devices)."""
