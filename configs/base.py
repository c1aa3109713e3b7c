"""Shared defaults of every jsr training config (big_vision style: ``get_config(arg)`` returns a ConfigDict).

Override anything on the command line: ``--config.optim.lr=1e-4 --config.data.path=/data/imgs``.
"""

import ml_collections

import jsr.methods
from jsr.data import pipeline
from jsr.train.sharding import DEFAULT_RULES
from jsr.sr.prompts import DEFAULT_NEGATIVE_PROMPT


def get_config(method: str = "osediff") -> ml_collections.ConfigDict:
    """Defaults shared by all methods plus ``method``'s own section (``c.<method>``, from
    ``jsr.methods.get(method).config()``)."""
    c = ml_collections.ConfigDict()
    m = jsr.methods.get(method)
    c.method = m.name
    c.seed = 0
    c.total_steps = 20_000
    c.multihost = ml_collections.config_dict.placeholder(bool)  # None: decide from the environment

    # The frozen base: a diffusers SD folder ("" = the embedded tiny random model, no weights needed).
    # remat: none | blocks | full, remat_policy: a jax.checkpoint_policies name (jsr.models.remat; README).
    c.model = ml_collections.ConfigDict(dict(
        path="", dtype="bfloat16", param_dtype="bfloat16", attention="auto", remat="blocks",
        remat_policy="nothing_saveable", tiny_seed=0))

    c.negative_prompt = DEFAULT_NEGATIVE_PROMPT
    c.loss = ml_collections.ConfigDict(dict(
        l2=1.0, lpips=2.0,                         # L_rec weights (OSEDiff, CTSR Eq. 1)
        lpips_vgg="", lpips_heads="",              # torchvision vgg16-397923af.pth + lpips weights/v0.1/vgg.pth
        vsd=1.0, vsd_t_min=20, vsd_t_max=980,      # OSEDiff VSD
        csd=1.0, csd_t_min=20, csd_t_max=500,      # PiSA-SR CSD
        cfg_scale=7.5))

    c.optim = ml_collections.ConfigDict(dict(
        lr=5e-5, weight_decay=1e-2, b1=0.9, b2=0.999, eps=1e-8, clip_norm=1.0, warmup_steps=0,
        schedule="constant", accum_steps=1))

    c.data = pipeline.default_config()
    c.data.batch_size = 16

    # -1: every device. rules: logical axis -> mesh axis (MaxText style), e.g.
    # --config.mesh.rules="(('batch', 'fsdp'), ('embed', None), ...)" to keep the base unsharded.
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, num_devices=-1, rules=DEFAULT_RULES))
    c.shard_frozen = True  # FSDP-shard the frozen base over the mesh's fsdp axis (rules in jsr.train.sharding)

    c.checkpoint = ml_collections.ConfigDict(dict(every=1000, keep=3, async_save=True))
    c.log = ml_collections.ConfigDict(dict(every=50, image_every=1000, images=4, profile=False, profile_step=10,
                                           profile_steps=5))
    c.max_nonfinite = 20  # consecutive steps with a non-finite update before the run stops
    # On a CPU: "optimized" (XLA's LLVM optimisations) or "fast" (off: ~2/3 of the compile time, steps ~2x slower;
    # the tiny configs' choice, which run a few compile-bound steps). Ignored on GPU and TPU.
    c.cpu_compile = "optimized"

    # The method's own section (read only by the method).
    section = m.config()
    if len(section):
        c[m.name] = section
    # Fault injection for the robustness tests: NaN batches at these steps; a simulated kill after a step (-1: off).
    c.debug = ml_collections.ConfigDict(dict(nan_steps=(), crash_after_step=-1))
    return c


def tiny(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Shrink a config to run on a laptop CPU in minutes: tiny random base, synthetic 64 px data, f32."""
    c.model.path = ""
    c.model.dtype = "float32"
    c.model.param_dtype = "float32"
    c.model.remat = "none"
    c.cpu_compile = "fast"
    c.total_steps = 6
    c.data.source = "synthetic"
    c.data.synthetic_images = 32
    c.data.synthetic_size = 80
    c.data.crop_size = 64
    c.data.batch_size = 2
    c.data.num_workers = 0
    c.data.prompt = "fixed"
    c.data.prompt_text = "a photo"
    c.checkpoint.every = 3
    c.checkpoint.async_save = False
    c.log.every = 1
    c.log.image_every = 3
    c.log.images = 2
    if "pisasr" in c:
        c.pisasr.pixel_steps = 3
    return c


def two_stage_arg(arg: str | None, file: str) -> tuple[int, bool]:
    """``(stage, tiny)`` from a two-stage method's config argument (``stage1``, ``stage2``, ``stage1-tiny``,
    ``stage2-tiny``; ``None`` is ``stage1``); ``file`` names the config in the error for anything else."""
    arg = arg or "stage1"
    stage, _, variant = arg.partition("-")
    if stage not in ("stage1", "stage2") or variant not in ("", "tiny"):
        raise ValueError(f"{file}: unknown variant {arg!r} (want stage1, stage2, stage1-tiny, stage2-tiny)")
    return int(stage[-1]), variant == "tiny"
