"""Every command line answers --help with its usage and exit status 0; an unknown flag is still an error."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("cmd,words", [(["train.py"], "--workdir"), (["evaluate.py"], "--lambda_sem"),
                                       (["-m", "jsr.infer"], "--lambda_sem")])
def test_help_exits_zero_and_lists_the_knobs(cmd, words):
    r = subprocess.run([sys.executable, *cmd, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert words in r.stdout


def test_unknown_flag_is_an_error():
    r = subprocess.run([sys.executable, "train.py", "--no_such_flag"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode != 0
