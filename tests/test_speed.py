"""Time estimates before a restore (issue 13): the restorer times its calls by phase, a SpeedLog keeps seconds per
call by configuration, machine and call shape (each program's first call, which compiles, left out), and the
plan line of a size that was timed before carries the estimate."""
import json
import time

import numpy as np
import pytest

from jsr.sr.infer import GB, RestoreOptions
from jsr.sr.speed import Phase, SpeedLog, compile_free, describe_duration
from tests.helpers import standin_restorer

TILED = RestoreOptions(vae_tile=64, vae_overlap=16, latent_tile=8, latent_overlap=2, max_memory=GB)


def test_each_programs_first_call_is_left_out():
    staged = Phase("decode", "staged", calls=6, programs=3, call_shape=(1, 64, 64))  # 3 stages x 2 windows
    assert compile_free([9.0, 1.0, 8.0, 2.0, 7.0, 3.0], staged) == [1.0, 2.0, 3.0]
    tiles = Phase("latent", "tiles", calls=4, programs=1, call_shape=(1, 8, 8))
    assert compile_free([5.0, 1.0, 1.0, 1.0], tiles) == [1.0, 1.0, 1.0]
    assert compile_free([5.0], Phase("encode", "whole", 1, 1, (1, 64, 64))) == []


def test_log_estimates_from_recorded_calls_and_persists(tmp_path):
    path = tmp_path / "speed.json"
    log = SpeedLog(path, machine_name="cpu:test")
    phases = [Phase("encode", "staged", 4, 2, (1, 64, 64)), Phase("latent", "tiles", 3, 1, (1, 8, 8))]
    assert log.estimate("m", phases) is None  # nothing timed yet
    timing = {"encode": [10.0, 1.0, 10.0, 3.0], "latent": [10.0, 0.5, 0.5]}
    assert log.record("m", phases, timing) == 2
    # 4 calls x 2 s (the mean of the non-first calls) + 3 calls x 0.5 s
    assert log.estimate("m", phases) == pytest.approx(4 * 2.0 + 3 * 0.5)
    again = SpeedLog(path, machine_name="cpu:test")  # read back from the file
    assert again.estimate("m", phases) == pytest.approx(9.5)
    # Keyed by configuration, machine and call shape: none of them carries over.
    assert again.estimate("other model", phases) is None
    assert SpeedLog(path, machine_name="gpu:test").estimate("m", phases) is None
    bigger = [Phase("encode", "staged", 4, 2, (1, 128, 128)), phases[1]]
    assert again.estimate("m", bigger) is None
    # More calls of a timed shape scale the estimate (a larger image has more windows of the same size).
    assert again.estimate("m", [Phase("encode", "staged", 40, 2, (1, 64, 64))]) == pytest.approx(80.0)
    # A restore that stopped part-way (fewer durations than planned calls) records nothing.
    assert log.record("m2", phases, {"encode": [1.0], "latent": [1.0, 1.0, 1.0]}) == 1
    assert json.loads(path.read_text())["entries"]


def test_a_damaged_log_is_an_empty_one(tmp_path):
    path = tmp_path / "speed.json"
    path.write_text("{not json")
    log = SpeedLog(path, machine_name="cpu:test")
    assert log.entries == {}
    phases = [Phase("latent", "tiles", 2, 1, (1, 8, 8))]
    log.record("m", phases, {"latent": [1.0, 2.0]})
    assert SpeedLog(path, machine_name="cpu:test").estimate("m", phases) == pytest.approx(4.0)


def test_durations_read_as_people_say_them():
    assert describe_duration(0.2) == "~1 s"
    assert describe_duration(42) == "~42 s"
    assert describe_duration(200) == "~3 min 20 s"
    assert describe_duration(1500) == "~25 min"
    assert describe_duration(3900) == "~1 h 5 min"


def test_the_restorer_times_its_phases_and_the_next_run_prints_an_estimate(tmp_path, capsys):
    x = np.random.default_rng(0).random((1, 200, 136, 3), np.float32)
    r = standin_restorer()
    r.speed = SpeedLog(tmp_path / "speed.json", machine_name="cpu:test")
    r.profile = "standin"
    plan = r.plan(x.shape[:1] + (200, 136, 3), TILED)
    steps: list[int] = []
    r(x, TILED, steps.append)
    assert sum(steps) == plan.steps
    assert {p.name: len(r.last_timing[p.name]) for p in plan.phases} == {p.name: p.calls for p in plan.phases}
    assert r.last_compiled
    err = capsys.readouterr().err
    assert "time: no estimate yet" in err  # nothing timed on this machine before

    # A new process (a new restorer, the same log file) knows the time before any work.
    r2 = standin_restorer()
    r2.speed, r2.profile = SpeedLog(tmp_path / "speed.json", machine_name="cpu:test"), "standin"
    est = r2.estimate_seconds(r2.plan(x.shape, TILED))
    assert est is not None and est > 0
    t0 = time.perf_counter()
    r2(x, TILED)
    took = time.perf_counter() - t0
    err = capsys.readouterr().err
    assert "jsr: plan: 1 x 136x200" in err and "of model calls (timed on an earlier run here)" in err
    # The stand-in's calls are milliseconds; the estimate leaves out compiling, so it is below the first run's
    # wall time and of its order on a rerun (generous bounds: a loaded CI machine).
    assert est < took + 1.0
    # Same size again in this process: nothing compiles, every call counts.
    r2(x, TILED)
    assert not r2.last_compiled
