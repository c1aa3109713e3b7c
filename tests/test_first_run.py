"""First-run experience (issue 13): where the command lines keep JAX's persistent compilation cache and how to turn
it off, and the one-line notices before long phases."""
import os
from pathlib import Path

import jax
import numpy as np
import pytest

from jsr import cli, console
from tests.helpers import standin_restorer


def test_compilation_cache_location_and_opt_out(monkeypatch, tmp_path):
    for var in ("JSR_XLA_CACHE", "JAX_COMPILATION_CACHE_DIR", "JSR_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cli.compilation_cache_dir() == tmp_path / "home" / ".cache" / "jsr" / "xla"
    monkeypatch.setenv("JSR_CACHE", str(tmp_path / "c"))
    assert cli.compilation_cache_dir() == tmp_path / "c" / "xla"
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax"))
    assert cli.compilation_cache_dir() == tmp_path / "jax"
    monkeypatch.setenv("JSR_XLA_CACHE", str(tmp_path / "mine"))
    assert cli.compilation_cache_dir() == tmp_path / "mine"
    monkeypatch.setenv("JSR_XLA_CACHE", "off")
    assert cli.compilation_cache_dir() is None


def test_enable_sets_jax_config_and_the_notice_names_it(monkeypatch, tmp_path, capsys):
    before = jax.config.jax_compilation_cache_dir
    try:
        monkeypatch.setenv("JSR_XLA_CACHE", str(tmp_path / "xla"))
        assert cli.enable_compilation_cache() == tmp_path / "xla" and (tmp_path / "xla").is_dir()
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "xla")
        console.compiling("the train step")
        assert capsys.readouterr().err == (f"jsr: compiling the train step (slow on the first run only; cached in "
                                           f"{tmp_path / 'xla'})...\n")
        monkeypatch.setenv("JSR_XLA_CACHE", "off")
        assert cli.enable_compilation_cache() is None and not jax.config.jax_compilation_cache_dir
        console.compiling("x")
        assert "cache is off" in capsys.readouterr().err
        monkeypatch.setenv("JSR_QUIET", "1")
        console.compiling("x")
        assert capsys.readouterr().err == ""
    finally:
        jax.config.update("jax_compilation_cache_dir", before)


def test_every_program_is_cached_unless_the_user_sets_a_threshold(monkeypatch, tmp_path):
    """The command lines store the small programs too (JAX's default skips those under 1 s: ~100 of them, 4.8 s,
    in a warm start of the first command); $JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS keeps the user's choice."""
    before = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
    try:
        monkeypatch.setenv("JSR_XLA_CACHE", str(tmp_path / "xla"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
        monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")  # (conftest sets it: a user's choice)
        cli.enable_compilation_cache()
        assert jax.config.jax_persistent_cache_min_compile_time_secs == 1.0
        monkeypatch.delenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")
        cli.enable_compilation_cache()
        assert jax.config.jax_persistent_cache_min_compile_time_secs == 0
    finally:
        jax.config.update("jax_compilation_cache_dir", before[0])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", before[1])


def test_the_restorer_announces_each_new_size_once(capsys):
    r = standin_restorer()
    for shape in ((1, 16, 16, 3), (1, 16, 16, 3), (1, 24, 16, 3)):
        r(np.zeros(shape, np.float32))
    err = capsys.readouterr().err
    assert err.count("jsr: compiling the standin restorer for 1 x 16x16 images") == 1
    assert err.count("jsr: compiling the standin restorer for 1 x 16x24 images") == 1


def test_cpu_fast_compile_preset_is_added_once_and_can_be_refused(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    monkeypatch.delenv("JSR_XLA_CPU_PRESET", raising=False)
    assert cli.cpu_compile_defaults() == cli.CPU_FAST_COMPILE
    assert os.environ["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=2 {cli.CPU_FAST_COMPILE}"
    assert cli.cpu_compile_defaults() is None  # already there: not twice
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_opt_preset=CPU_OPT_PRESET_FAST_RUNTIME")
    assert cli.cpu_compile_defaults() is None  # the user's own preset wins
    assert os.environ["XLA_FLAGS"] == "--xla_cpu_opt_preset=CPU_OPT_PRESET_FAST_RUNTIME"
    monkeypatch.delenv("XLA_FLAGS")
    monkeypatch.setenv("JSR_XLA_CPU_PRESET", "default")
    assert cli.cpu_compile_defaults() is None and "XLA_FLAGS" not in os.environ


def test_the_preset_is_on_in_this_session():
    """conftest applies it before jax starts: the flag reaches XLA (an unknown preset name would abort at start)."""
    assert cli.CPU_FAST_COMPILE in os.environ["XLA_FLAGS"]


def test_cpu_compile_fast_turns_llvm_optimisation_off_for_the_loops_programs():
    """config.cpu_compile (the tiny configs: "fast") reaches the step's and the preview's compiler options."""
    from configs import base
    from jsr.train import loop

    c = base.get_config("fidelity")
    c.model.remat = "none"
    assert c.cpu_compile == "optimized" and loop.compiler_options(c) is None
    base.tiny(c)
    assert c.cpu_compile == "fast" and loop.compiler_options(c) == loop.CPU_FAST_COMPILE_OPTIONS
    c.model.remat = "blocks"  # merged with the remat mode's own option
    assert loop.compiler_options(c) == {**loop.CPU_FAST_COMPILE_OPTIONS,
                                        "xla_disable_hlo_passes": "cse_barrier_expander"}
    c.cpu_compile = "quick"
    with pytest.raises(ValueError, match="cpu_compile must be one of optimized, fast, got 'quick'"):
        loop.compiler_options(c)
