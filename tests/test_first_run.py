"""First-run experience (issue 13): where the command lines keep JAX's persistent compilation cache and how to turn
it off, and the one-line notices before long phases."""
from pathlib import Path

import jax
import numpy as np

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


def test_the_restorer_announces_each_new_size_once(capsys):
    r = standin_restorer()
    for shape in ((1, 16, 16, 3), (1, 16, 16, 3), (1, 24, 16, 3)):
        r(np.zeros(shape, np.float32))
    err = capsys.readouterr().err
    assert err.count("jsr: compiling the standin restorer for 1 x 16x16 images") == 1
    assert err.count("jsr: compiling the standin restorer for 1 x 16x24 images") == 1
