"""Process-level set-up that must happen before JAX touches a device."""

from pathlib import Path

import jax

from pretrain.config import Config, ConfigError


def setup(cfg: Config):
    """Faked CPU devices and the persistent compilation cache, as the config asks."""
    n = cfg.runtime.fake_cpu_devices
    if n > 0:
        try:
            jax.config.update("jax_platforms", "cpu")
            jax.config.update("jax_num_cpu_devices", n)
        except RuntimeError:  # backends already up (an embedding program, a test session)
            if jax.device_count() != n:
                raise ConfigError(
                    f"runtime.fake_cpu_devices={n}, but JAX already started with {jax.device_count()} devices; "
                    "set it before JAX initialises, or match the running count"
                ) from None
    if cfg.runtime.compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", str(Path(cfg.runtime.compilation_cache_dir).expanduser()))
