"""Test-wide setup: 8 fake CPU devices for sharding tests, full f32 matmuls for parity tests."""
import os

# Must happen before jax is imported anywhere: sharding tests need a multi-device mesh on one CPU.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

try:  # The PyTorch side is optional; parity tests skip without it.
    import torch  # noqa: E402

    torch.set_num_threads(max(1, os.cpu_count() or 1))
except ImportError:  # pragma: no cover
    pass
