"""Train a one-step SR model: ``python train.py --config configs/ctsr.py:stage1 --workdir /ckpt/run``.

Configs are Python (``configs/*.py``, ``file.py:variant``); override any field with ``--config.a.b=value``.
Resumes from the newest checkpoint in ``--workdir``. On TPU pods run the same command on every host (JAX finds the
other hosts itself); any other multi-process job gives each process the coordinator, the process count and its id
(``--coordinator_address/--num_processes/--process_id`` or ``$JAX_COORDINATOR_ADDRESS/$JAX_NUM_PROCESSES/
$JAX_PROCESS_ID``; ``jsr.train.distributed``).
"""

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py[:variant]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and exported LoRAs.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "Multi-process job: host:port of process 0, the same on every process "
    "(default $JAX_COORDINATOR_ADDRESS; on a TPU pod slice JAX finds it).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-process job: how many processes "
                                      "(default $JAX_NUM_PROCESSES).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-process job: this process, 0..num_processes-1 "
                                   "(default $JAX_PROCESS_ID).")
_HEARTBEAT = flags.DEFINE_integer("heartbeat_timeout", 100, "Multi-process job: seconds without a heartbeat after "
                                  "which a process counts as dead and the others stop.")
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
    from jsr.cli import report_user_error
    from jsr.train import distributed
    from jsr.train.loop import train

    try:
        cluster = distributed.cluster_from(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                                           _HEARTBEAT.value)
        distributed.initialize(cluster, _CONFIG.value.multihost)  # before JAX touches a device
    except distributed.ClusterError as e:
        return report_user_error(e)
    summary = train(_CONFIG.value, _WORKDIR.value, cluster)
    logging.info("finished: step %d, %s", summary["step"], summary["status"])
    print(f"training {summary['status']} at step {summary['step']}; workdir {_WORKDIR.value}")
    for path in summary["exported"]:
        print(f"exported {path}")


if __name__ == "__main__":
    from jsr.cli import run

    run(main)
