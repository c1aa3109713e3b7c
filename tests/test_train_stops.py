"""A training run always stops: a data source with no usable image ends it with one line naming the folder and
the skip reasons (exit status 2 from train.py), and SIGTERM ends it while it waits for data that never comes.

Each case runs in a subprocess with a timeout, so a regression (the run spinning forever) fails the test instead
of hanging the suite.
"""
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import cv2
import numpy as np

from jsr.data import pipeline as P

ROOT = Path(__file__).resolve().parents[1]


def _bad_folder(root: Path) -> Path:
    """Three files that do not decode and one image smaller than the crop."""
    root.mkdir(parents=True)
    (root / "a.png").write_bytes(b"\x89PNG\r\n\x1a\ntruncated")
    (root / "b.jpg").write_bytes(b"")
    (root / "c.webp").write_bytes(os.urandom(300))
    cv2.imwrite(str(root / "small.png"), np.zeros((8, 8, 3), np.uint8))
    return root


def _python(code: str, timeout: float, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, **kw)


def test_a_folder_without_usable_images_stops_the_pipeline(tmp_path):
    folder = _bad_folder(tmp_path / "bad")
    r = _python(f"""
        from jsr.data import pipeline as P
        cfg = dict(source="folder", path={str(folder)!r}, crop_size=32, batch_size=2, small_images="skip",
                   prefetch_batches=2, read_threads=1)
        it = P.make_iterator(cfg, process_index=0, process_count=1)
        try:
            next(it)
        except P.DataStarvationError as e:
            print("STOPPED", e)
        """, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    line = r.stdout.strip()
    assert line.startswith("STOPPED") and "\n" not in line, r.stdout
    assert str(folder) in line and "all 4 of its images" in line
    assert "unreadable 3, too_small 1" in line
    # Each bad file is named once in the log, not once per pass over the folder.
    assert r.stderr.count("data: skipped") == 4, r.stderr[-3000:]


def test_good_images_among_bad_ones_keep_the_stream_going():
    """The check never fires while good examples still come: one good item in ten, shuffled over many epochs."""
    good = np.full((32, 32, 3), 128, np.uint8)

    class Records:
        def __len__(self):
            return 10

        def __getitem__(self, i):
            return {"name": f"rec{i}", "image": good if i == 7 else np.zeros((4, 4, 3), np.uint8), "prompt": ""}

    it = P.make_iterator(dict(crop_size=32, batch_size=1, small_images="skip", prefetch_batches=0, read_threads=0),
                         source=Records(), process_index=0, process_count=1)
    for _ in range(30):
        assert next(it)["hq"].shape == (1, 32, 32, 3)
    assert 9 * 29 <= it.skipped["too_small"] < 9 * 30


def test_train_py_on_a_folder_without_usable_images_exits_2_with_one_line(tmp_path):
    folder = _bad_folder(tmp_path / "bad")
    cmd = [sys.executable, "train.py", "--config", "configs/fidelity.py:tiny", "--workdir", str(tmp_path / "w"),
           "--config.data.source=folder", f"--config.data.path={folder}", "--config.data.small_images=skip",
           "--config.loss.lpips=0", "--config.mesh.num_devices=1"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 2, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: data: no usable image in " + str(folder)), last
    assert "unreadable 3, too_small 1" in last
    assert "Traceback" not in r.stderr
    # The config goes to the workdir, not the console (issue 13's 110-line dump).
    assert (tmp_path / "w" / "config.json").is_file() and "optim.b1" not in r.stderr


def test_sigterm_while_waiting_for_data_ends_the_run(tmp_path):
    """The input never yields (a stalled or starving pipeline); SIGTERM still ends the run, as 'preempted'."""
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, threading
        from configs import fidelity
        from jsr.train import loop

        class Stalled:
            interrupt_safe = True
            def __next__(self):
                print("WAITING", flush=True)
                threading.Event().wait()   # no batch, ever
            def get_state(self):
                return {{}}
            def close(self):
                pass

        loop.make_iterator = lambda cfg: Stalled()
        c = fidelity.get_config("tiny")
        c.loss.lpips, c.mesh.num_devices, c.log.image_every = 0.0, 1, 0
        out = loop.train(c, {str(tmp_path / 'w')!r})
        print("STATUS", out["status"], out["step"], flush=True)
        """)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "WAITING", proc.stderr.read()[-3000:]
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert "STATUS preempted 0" in out
    assert time.monotonic() - t0 < 60
    assert "preempted at step 0 while waiting for data" in err
