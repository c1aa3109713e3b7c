"""XLA:CPU compiles the full-size (SD-2.1-base) fidelity and OSEDiff train steps at 128 px within 16 GiB of host
memory (issue [K] item 5), through ``benchmarks/compile_memory.py``: each step built as ``train.py`` jits it, over
abstract arguments, compiled in its own process under a 16 GiB watchdog with jsr's fast-compile preset.

Measured on the 2-core CPU (2026-11-30, beside other jobs): fidelity 2.84 GiB peak, 321 s to compile. The
tiny model's PiSA-SR pixel step (the cheapest to compile: no LPIPS) through the same script is the default-run
check that the script itself works.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "compile_memory.py"


def _run(tmp_path, *args):
    out = tmp_path / "rows.json"
    subprocess.run([sys.executable, str(SCRIPT), *args, "--out", str(out)], check=True, cwd=ROOT, timeout=3600)
    return json.loads(out.read_text())["rows"]


def test_the_script_compiles_the_tiny_step_and_reports_its_memory(tmp_path):
    (row,) = _run(tmp_path, "--programs", "pisa-pix", "--preset", "tiny", "--size", "64", "--limit", "8")
    assert "error" not in row, row.get("error")
    assert 0 < row["temp_bytes"] < row["peak_rss_bytes"] < 8 * 2**30
    assert row["compile_s"] > 0 and row["argument_bytes"] > 0
    assert "FAST_COMPILE" in row["xla_flags"]


def test_the_watchdog_stops_a_compile_past_the_limit(tmp_path):
    (row,) = _run(tmp_path, "--programs", "pisa-pix", "--preset", "tiny", "--size", "64", "--limit", "0.05")
    assert row["error"].startswith("stopped at") and "GiB resident" in row["error"]


@pytest.mark.slow
def test_full_size_fidelity_and_osediff_steps_compile_within_16_gib(tmp_path):
    rows = _run(tmp_path, "--programs", "fidelity,osediff", "--size", "128", "--limit", "16")
    for row in rows:
        assert "error" not in row, f"{row['program']}: {row.get('error')}"
        assert row["peak_rss_bytes"] < 16 * 2**30
