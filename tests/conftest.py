"""Test-wide setup: 8 fake CPU devices for sharding tests, full f32 matmuls for parity tests, one embedded tiny
SD model and one XLA compilation cache per test session (shared with the subprocesses tests start)."""
import atexit
import os
import shutil
import tempfile

# Must happen before jax is imported anywhere: sharding tests need a multi-device mesh on one CPU.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# Compiling is most of the suite's time on the 2-core CPU, and the tests run each program a few times on tiny
# models: without LLVM's optimisations a tiny train step compiles ~2x faster (fidelity step, 2026-11-30, loaded
# machine: 478 s vs 913 s) and runs no slower at these sizes (the convolutions and matmuls are library calls).
# Numerics are IEEE float either way (no fast-math), so tolerances are unchanged. Subprocesses inherit it.
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
# The command lines' XLA:CPU preset (jsr.cli.cpu_compile_defaults), for the tests in this process too: without
# it, reading a program back from the session's cache (every module after jax.clear_caches) is quadratic in the
# program's size in XLA's YNNPACK fusion loader.
from jsr.cli import cpu_compile_defaults  # noqa: E402 - jsr.cli imports no jax at module level

cpu_compile_defaults()
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# A fresh cache per session (never the user's ~/.cache/jsr, which an older jsr may have written): the tiny SD
# folder is written once (~1 min on 2 cores) instead of once per test module, and programs compiled by one test
# (the tiny restorer, train steps) are reused by later tests and by train.py / evaluate.py subprocesses.
# With pytest-xdist the controller makes the folder and its workers (which inherit its environment) share it: the
# tiny model is written once (atomically, jsr.weights.tiny) and every worker reads the others' compiled programs.
if "JSR_TEST_SESSION_CACHE" in os.environ:
    _SESSION_CACHE = os.environ["JSR_TEST_SESSION_CACHE"]
else:
    _SESSION_CACHE = tempfile.mkdtemp(prefix="jsr-tests-")
    os.environ["JSR_TEST_SESSION_CACHE"] = _SESSION_CACHE
    atexit.register(shutil.rmtree, _SESSION_CACHE, ignore_errors=True)
os.environ["JSR_CACHE"] = os.path.join(_SESSION_CACHE, "models")
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(_SESSION_CACHE, "xla")
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "1"

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

try:  # The PyTorch side is optional; parity tests skip without it.
    import torch  # noqa: E402

    torch.set_num_threads(max(1, os.cpu_count() or 1))
except ImportError:  # pragma: no cover
    pass


import gc  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _free_compiled_programs_after_each_module():
    """Drop JAX's in-memory compiled programs when a test module ends. An xdist worker runs many modules in one
    process and held every program it ever compiled (8 GB resident near the end of the default run on the 2-core
    machine, 2026-11-30, where the other worker was OOM-killed). Later modules that need a program again read it
    back from the session's persistent compilation cache (JAX_COMPILATION_CACHE_DIR above) instead of keeping it."""
    yield
    jax.clear_caches()
    gc.collect()
