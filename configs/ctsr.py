"""CTSR (controllable one-step SR): stage 1 distils a realism and a fidelity teacher into one student; stage 2
learns the control flow between them. ``configs/ctsr.py:stage1``, ``:stage2``, ``:stage1-tiny``, ``:stage2-tiny``.

Stage 1 needs ``--config.ctsr.realism`` (an OSEDiff release .pkl / peft LoRA / jsr export folder) and
``--config.ctsr.fidelity`` (e.g. the export of a ``configs/fidelity.py`` run). Stage 2 needs
``--config.ctsr.stage1=<stage-1 workdir>/export/student``.
Paper hyper-parameters: rank 4, lr 5e-5, 20k steps per stage, g_time 5.5.
"""

from configs import base


def get_config(arg: str | None = None):
    stage, tiny = base.two_stage_arg(arg, "configs/ctsr.py")
    c = base.get_config("ctsr")
    c.ctsr.stage = stage
    c.total_steps = 20_000
    c.optim.lr = 5e-5
    if tiny:
        base.tiny(c)
    return c
