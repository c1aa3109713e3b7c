"""Train a one-step SR model: ``python train.py --config configs/ctsr.py:stage1 --workdir /ckpt/run``.

Configs are Python (``configs/*.py``, ``file.py:variant``); override any field with ``--config.a.b=value``.
Resumes from the newest checkpoint in ``--workdir``. On TPU pods run the same command on every host.
"""

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py[:variant]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and exported LoRAs.")
flags.mark_flags_as_required(["config", "workdir"])


def _quiet_orbax() -> None:
    # Orbax logs every file operation at INFO through absl; keep its warnings, drop the rest.
    import logging as pylogging

    logging.get_absl_handler().addFilter(
        lambda r: r.levelno >= pylogging.WARNING or "/orbax/" not in r.pathname.replace("\\", "/"))


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    _quiet_orbax()
    from jsr.train.loop import train

    summary = train(_CONFIG.value, _WORKDIR.value)
    logging.info("finished: step %d, %s", summary["step"], summary["status"])
    print(f"training {summary['status']} at step {summary['step']}; workdir {_WORKDIR.value}")
    for path in summary["exported"]:
        print(f"exported {path}")


if __name__ == "__main__":
    from jsr.cli import run

    run(main)
