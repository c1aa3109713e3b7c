"""The training loop: ``train(config, workdir)`` (what ``python train.py`` runs).

One process per host. Per step: next batch from the Grain iterator (host), prompt embeddings from the cache
(host), batch placed on the mesh, one jitted step with declared shardings and the state donated. The host reads
the previous step's metrics after dispatching the current one, so that read never stalls the device.

Several processes (``jsr.train.distributed``): each loads the rows of every global batch that its devices hold
(``jsr.data.process_share``), so the job trains on the single-process stream whatever the process count; a stop
request (SIGTERM) on any process is agreed at the step boundary, so all stop at the same step with one checkpoint;
checkpoints carry every process's data state and resume on another process count.

The method (``config.method``) comes from the registry (:mod:`jsr.methods`): its ``setup`` gives the trainable
trees, the phases of updates, the frozen extras and what to export; its ``forward`` makes the preview images. The
loop knows no method by name.

Workdir layout: ``config.json`` (the resolved config), ``checkpoints/`` (Orbax: state + data iterator),
``tensorboard/`` (event files), ``export/<group>/`` (the trained trees: peft LoRAs, module safetensors, and the
``jsr_export.json`` manifest; written at the end), ``profile/`` (optional trace).
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

import jsr.methods
from jsr.console import compiling, notice
from jsr.data import make_iterator, process_share, shard_batch
from jsr.data.pipeline import DataStarvationError
from jsr.methods.api import Method, TrainSetup, split_knobs
from jsr.methods.export import write_export
from jsr.models import common
from jsr.models import remat as remat_lib
from jsr.sr import generator
from jsr.sr.base import load_base
from jsr.sr.prompts import drop_prompts
from jsr.train import distributed, program_cache, sharding
from jsr.train.checkpoint import Checkpointer, Preempted, PreemptionWatch
from jsr.train.step import TrainState, init_state, make_train_step
from jsr.train.writers import BackgroundWriter, Profiler, ProgressReporter


class NonFiniteLossError(RuntimeError):
    """The run produced non-finite losses or gradients for too many consecutive steps."""


# Within one process, runs of the same config on the same base reuse the jitted step (and so XLA's in-memory
# executable) instead of rebuilding closures that only hit the persistent cache: resuming in-process, tests.
_STEPS: dict[tuple, Any] = {}
_BASES: dict[tuple, Any] = {}
_CALLED: set[tuple] = set()  # (run key, phase) of the steps already called (compiled) in this process
# Config fields that never reach the compiled step.
_NOT_IN_STEP = ("checkpoint", "log", "debug", "seed", "max_nonfinite", "multihost")


def remat_setting(config) -> tuple[str, str | None]:
    """``(mode, policy)`` of ``config.model.remat`` / ``remat_policy`` (``jsr.models.remat``), checked: raises
    :class:`jsr.models.remat.RematConfigError` naming the valid modes or policies."""
    m = config.model
    mode = remat_lib.remat_mode(m.remat)
    policy = m.get("remat_policy") or None
    remat_lib.checkpoint_policy(policy)
    return mode, policy


def with_remat(base, mode: str, policy: str | None):
    """``base`` whose UNet and VAE rematerialise in ``mode`` with ``policy`` (the training base; parameters and
    forward values are unchanged, so the same parameter trees serve inference)."""
    models = dataclasses.replace(base.models, unet=base.models.unet.clone(remat=mode, remat_policy=policy),
                                 vae=base.models.vae.clone(remat=mode, remat_policy=policy))
    return dataclasses.replace(base, models=models)


def _base(config) -> Any:
    m = config.model
    mode, policy = remat_setting(config)
    key = (m.path, m.dtype, m.param_dtype, m.attention, mode, policy, int(m.tiny_seed))
    if key not in _BASES:
        _BASES.clear()  # one base per process at a time: a full-size base is GBs
        base = load_base(m.path, dtype=jnp.dtype(m.dtype), param_dtype=jnp.dtype(m.param_dtype),
                         attention=m.attention, tiny_seed=m.tiny_seed)
        _BASES[key] = with_remat(base, mode, policy)
    return _BASES[key]


def _run_key(config, base) -> tuple:
    """What the compiled step depends on: the config (less logging/checkpoint/seed fields), the base, devices."""
    d = config.to_dict()
    for k in _NOT_IN_STEP:
        d.pop(k, None)
    d.get("data", {}).pop("seed", None)
    import json

    return (json.dumps(d, sort_keys=True, default=str), id(base.models), tuple(map(str, jax.devices())))


def _program_description(config, base) -> str:
    """What a traced step or preview depends on besides its arguments and jsr's code, for the on-disk program
    cache (jsr.train.program_cache): the run key's config, the seed, the base's architecture and schedule."""
    import hashlib

    schedule = hashlib.sha256(b"".join(np.asarray(x).tobytes() for x in jax.tree.leaves(base.models.schedule)))
    return "\n".join([_run_key(config, base)[0], f"seed={config.seed}", repr(base.models.unet), repr(base.models.vae),
                      f"scaling={base.models.scaling_factor}", f"schedule={schedule.hexdigest()}",
                      f"random_weights={getattr(base, 'random_weights', None)}"])


def build(config, base, rng: jax.Array) -> tuple[Method, TrainSetup]:
    """``(method, setup)``: the registered method ``config.method`` and its training setup on ``base``."""
    method = jsr.methods.get(config.method)
    return method, method.setup(config, base, rng)


def _frozen_shardings(frozen: dict, base, mesh, shard: bool,
                      rules: Any = sharding.DEFAULT_RULES, axes: Any = None) -> Any:
    """Shardings of a method's frozen tree: the base ``unet``/``vae`` and the entries ``axes`` names
    (``TrainSetup.frozen_axes``: a frozen vision encoder...) by ``rules`` when ``shard``; the rest replicated."""
    rep = sharding.replicated(mesh)
    out = jax.tree.map(lambda _: rep, frozen)
    if shard and mesh.size > 1:  # (one device: every rule gives that device; skip tracing the models' axes, ~2 s)
        out["unet"] = sharding.tree_shardings(frozen["unet"], common.logical_axes(base.models.unet), mesh, rules)
        out["vae"] = sharding.tree_shardings(frozen["vae"], common.logical_axes(base.models.vae), mesh, rules)
        for key, logical in (axes or {}).items():
            out[key] = sharding.tree_shardings(frozen[key], logical, mesh, rules)
    return out


# config.cpu_compile="fast" on a CPU: LLVM's optimisation off for the step and the preview. Measured on the 2-core
# machine (2026-11-30), the README's first command (CTSR stage 1, tiny): the step's compile 115 -> 78 s, the
# preview's 28 -> 12 s, the step itself 2.0 -> 1.1 steps/s. The tiny configs use it (a few steps, compile-bound).
CPU_FAST_COMPILE_OPTIONS = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
CPU_COMPILE_MODES = ("optimized", "fast")


def compiler_options(config) -> dict[str, Any] | None:
    """XLA options for the loop's programs: the remat mode's (``jsr.models.remat.compiler_options``) and, on a
    CPU with ``config.cpu_compile == "fast"``, :data:`CPU_FAST_COMPILE_OPTIONS`; None when there are none."""
    opts = dict(remat_lib.compiler_options(remat_setting(config)[0]) or {})
    mode = config.get("cpu_compile", "optimized")
    if mode not in CPU_COMPILE_MODES:
        raise ValueError(f"cpu_compile must be one of {', '.join(CPU_COMPILE_MODES)}, got {mode!r}")
    if mode == "fast" and jax.default_backend() == "cpu":
        opts.update(CPU_FAST_COMPILE_OPTIONS)
    return opts or None


def _step_and_jit_args(updates, config, mesh, rules: Any, in_shardings: Any, out_shardings: Any
                       ) -> tuple[Any, dict[str, Any]]:
    return make_train_step(updates, config.optim.accum_steps, mesh, rules), dict(
        in_shardings=in_shardings, out_shardings=out_shardings, donate_argnums=0,
        compiler_options=compiler_options(config))


def jit_step(updates, config, mesh, rules: Any, in_shardings: Any, out_shardings: Any):
    """The jitted train step of ``updates`` as the loop runs it: traced with ``mesh`` in context (the attention
    dispatch sees it: ``auto`` takes splash per shard on a multi-chip TPU) and the models' activations
    constrained by ``rules`` (``jsr.train.step``), the state donated, and on CPU compiled so that the
    rematerialisation ``config.model.remat`` asks for survives (``jsr.models.remat.compiler_options``)."""
    fn, kwargs = _step_and_jit_args(updates, config, mesh, rules, in_shardings, out_shardings)
    return jax.jit(fn, **kwargs)


def cached_step(updates, config, mesh, rules: Any, in_shardings: Any, out_shardings: Any, *, name: str,
                description: str) -> program_cache.CachedProgram:
    """:func:`jit_step` with its trace kept on disk (``jsr.train.program_cache``): a rerun of the same run skips
    tracing, most of a warm start on a CPU. ``description``: :func:`_program_description`."""
    fn, kwargs = _step_and_jit_args(updates, config, mesh, rules, in_shardings, out_shardings)
    return program_cache.cached_jit(fn, name=name, description=description, **kwargs)


def step_prompts(prompts: list[str], null_ratio: float, seed: int, step: int) -> list[str]:
    """The prompts a step trains on: each replaced by ``""`` with probability ``null_ratio`` (PiSA-SR and FiDeSR
    train with 0.5: the model also learns to restore without a prompt). Drawn from ``(seed, step)``, so a resumed
    run drops the same ones."""
    if not null_ratio:
        return prompts
    return drop_prompts(prompts, null_ratio, np.random.default_rng([seed, step]))


def make_preview(method: Method, models: Any):
    """``preview(params, frozen, x_lq [-1, 1], c) -> x_sr [-1, 1]``: the method's own one-step forward (at its
    ``preview_knobs``) between the VAE encode and decode, on a training state."""
    traced, static = split_knobs(method, method.knob_values(method.preview_knobs))

    def preview(params, frozen, x_lq, c):
        trees = method.inference_trees(params, frozen)
        c = method.context(models, trees, x_lq, c, {**traced, **dict(static)})
        z = generator.encode(models, frozen["vae"], x_lq, method.encoder_lora(trees))
        extra = {"x_lq": x_lq} if method.uses_image else {}
        z = method.forward(models, frozen["unet"], trees, z, c, {**traced, **dict(static)}, **extra)
        return generator.decode(models, frozen["vae"], z)

    return preview


def train(config, workdir: str | os.PathLike, cluster: distributed.Cluster | None = None) -> dict[str, Any]:
    """Run (or resume) the training ``config`` describes in ``workdir``.

    ``cluster``: this process's place in a multi-process job (``train.py``'s flags; default: the environment),
    joined when ``config.multihost`` allows (see :func:`jsr.train.distributed.initialize`).

    Returns a summary: ``{"step", "status" ("done"|"preempted"), "metrics" (last step, floats), "exported"}``.
    Raises :class:`NonFiniteLossError` when ``config.max_nonfinite`` consecutive steps were non-finite.
    """
    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    distributed.initialize(cluster, config.multihost)
    if jax.process_index() == 0:
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")
        logging.info("config written to %s", workdir / "config.json")
    mesh_cfg = dict(config.mesh)
    n = mesh_cfg.pop("num_devices", -1)
    rules = sharding.parse_rules(mesh_cfg.pop("rules", sharding.DEFAULT_RULES))
    mesh = sharding.make_mesh(**mesh_cfg, devices=None if n in (-1, None) else jax.devices()[:n])
    logging.info("mesh %s over %d devices (%s)", dict(mesh.shape), jax.device_count(), jax.default_backend())

    t0 = time.perf_counter()
    base = _base(config)
    logging.info("base model from %s loaded in %.1f s", base.path, time.perf_counter() - t0)
    rng = jax.random.key(config.seed)
    method, setup = build(config, base, jax.random.fold_in(rng, 1))
    n_train = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(setup.params))
    logging.info("method %s: %s trainable parameters in groups %s", method.name, f"{n_train:,}",
                 ", ".join(setup.params))

    rep = sharding.replicated(mesh)
    distributed.barrier("setup")  # the processes meet before their first collective (jsr.train.distributed)
    frozen_sh = _frozen_shardings(setup.frozen, base, mesh, config.shard_frozen, rules, setup.frozen_axes)
    frozen = distributed.device_put(setup.frozen, frozen_sh)
    state = init_state(setup.params, setup.all_updates, config.seed)
    state_sh = jax.tree.map(lambda _: rep, state)
    state = distributed.device_put(state, state_sh)

    ckpt = Checkpointer(workdir / "checkpoints", keep=config.checkpoint.keep, every=config.checkpoint.every,
                        async_save=config.checkpoint.async_save)
    data_cfg = config.data.to_dict()
    data_cfg["seed"] = config.data.seed if config.data.seed else config.seed
    global_batch = int(config.data.batch_size)
    # Each process loads the rows of every global batch its devices hold (where shard_batch puts them).
    all_rows = distributed.batch_rows(sharding.batch_sharding(mesh, 1), global_batch)
    rows = all_rows[jax.process_index()]
    if jax.process_count() > 1:
        logging.info("data: global batch %d, rows per process %s", global_batch, distributed.describe(all_rows))
        it = make_iterator(data_cfg, rows=rows)
    else:
        it = make_iterator(data_cfg)

    def data_state() -> dict:  # every process's iterator state (a collective on several processes)
        return process_share.pack(distributed.gather_json(it.get_state()), all_rows, global_batch)

    if ckpt.latest_step() is not None:
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
        state, saved_data = ckpt.restore(abstract)
        it.set_state(process_share.reshard_states(saved_data, rows, global_batch, it.get_state(),
                                                  jax.process_index(), all_rows))
        logging.info("resumed from step %d", int(state.step))

    batch_keys = ("hq", "lq", "c")
    batch_sh = {k: sharding.batch_sharding(mesh, 4 if k != "c" else 3) for k in batch_keys}
    run_key = _run_key(config, base)
    described = _program_description(config, base)

    def step_fn(phase: int, updates):
        key = (run_key, phase)
        if key not in _STEPS:
            _STEPS[key] = cached_step(updates, config, mesh, rules, (state_sh, frozen_sh, batch_sh),
                                      (state_sh, rep), name=f"{method.name}-step{phase}", description=described)
        return _STEPS[key]

    def ready(fn, name: str, *args) -> None:
        """Several processes: compile ``fn`` for ``args`` (or load it), then meet the others, so that its first
        run starts together (jsr.train.distributed: CPU collectives wait 30 s for a late process)."""
        if jax.process_count() > 1:
            fn.lower(*args).compile()
            distributed.barrier(name)

    preview = program_cache.cached_jit(make_preview(method, base.models), name=f"{method.name}-preview",
                                       description=described, out_shardings=rep,
                                       compiler_options=compiler_options(config))
    # The preview's first rows, on every device: a batch row lives on one process only.
    head = jax.jit(lambda x: x[:int(config.log.images)], out_shardings=rep)
    null_ratio = float(config.data.get("null_prompt_ratio", 0.0))
    writer = BackgroundWriter(workdir / "tensorboard", hparams={k: str(v) for k, v in _flat(
        config.to_dict()).items()} if jax.process_index() == 0 else None)
    total = int(config.total_steps)
    progress = ProgressReporter(writer, total, every=config.log.every, batch_size=config.data.batch_size)
    profiler = Profiler(workdir / "profile", config.log.profile_step, config.log.profile_steps, config.log.profile)
    step = int(state.step)
    pending: tuple[int, Any] | None = None
    last: dict[str, float] = {}
    status = "done"
    previewed = False

    def report(s: int, metrics: Any) -> dict[str, float]:
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        for k, v in m.items():
            if k.endswith("/skipped") and v:
                logging.warning("step %d: non-finite %s loss or gradients; update not applied", s,
                                k.rsplit("/", 1)[0])
        if s % config.log.every == 0 or s == total:
            writer.write_scalars(s, m)
        return m

    def checkpoint_early_stop(why: str) -> None:
        # A stop inside the data wait: the state is the last step's; the data state is the last batch's only
        # when a prefetch thread owned the iterator (DataIterator.interrupt_safe), else resuming from the newest
        # checkpoint is the exact stream.
        newest = ckpt.latest_step() or 0
        if step <= newest:
            return
        if jax.process_count() > 1:
            # Saving is collective and the other processes are inside the next step, waiting for this one: stop
            # without it (they stop when this process has gone: jsr.train.distributed).
            logging.warning("%s: step %d not checkpointed (one process of %d cannot save alone); a resume starts "
                            "from step %d", why, step, jax.process_count(), newest)
        elif getattr(it, "interrupt_safe", False):
            ckpt.save(step, state, data_state(), force=True)
        else:
            logging.warning("%s: step %d not checkpointed (the input pipeline was stopped mid-batch with "
                            "data.prefetch_batches=0); a resume starts from step %d", why, step, newest)

    with PreemptionWatch() as watch:
        while step < total:
            try:
                with watch.waiting():  # SIGTERM while no batch comes (stalled or starving input): stop anyway
                    batch = next(it)
            except Preempted:
                checkpoint_early_stop("preempted while waiting for data")
                status = "preempted"
                logging.warning("preempted at step %d while waiting for data, exiting", step)
                break
            except DataStarvationError:
                checkpoint_early_stop("no usable training data")
                ckpt.close()
                it.close()
                raise
            if step in tuple(config.debug.nan_steps):
                batch = dict(batch, hq=np.full_like(batch["hq"], np.nan))
            prompts = step_prompts(list(batch["prompt"]), null_ratio, config.seed, step)
            host = {"hq": batch["hq"], "lq": batch["lq"], "c": np.asarray(base.prompts(prompts))}
            if setup.host_batch is not None:  # a method's own per-example arrays (CODSR's noun masks)
                for k, v in setup.host_batch(batch, prompts).items():
                    host[k] = v
                    batch_sh.setdefault(k, sharding.batch_sharding(mesh, np.ndim(v)))
            device_batch = shard_batch(host, mesh)
            phase, updates = setup.updates_at(step)
            profiler(step)
            first_call = (run_key, phase) not in _CALLED
            if first_call:  # the call compiles (or reads the persistent cache): minutes on a CPU, say so
                compiling("the train step" + (f" of phase {phase}" if len(setup.phases) > 1 else ""))
                t_compile = time.perf_counter()
                ready(step_fn(phase, updates), f"train step {phase}", state, frozen, device_batch)
            state, metrics = step_fn(phase, updates)(state, frozen, device_batch)
            if first_call:
                _CALLED.add((run_key, phase))
                notice(f"train step ready in {time.perf_counter() - t_compile:.0f} s; training to step {total}")
            step += 1
            if pending is not None:  # the previous step's metrics: ready by now, so reading them never stalls
                last = report(*pending)
                if last["nonfinite_steps"] >= config.max_nonfinite:
                    raise NonFiniteLossError(
                        f"step {pending[0]}: {int(last['nonfinite_steps'])} consecutive steps had non-finite "
                        f"losses or gradients (limit max_nonfinite={config.max_nonfinite}); the last good "
                        f"checkpoint is in {ckpt.directory}")
            pending = (step, metrics)
            progress(step)
            if config.log.image_every and step % config.log.image_every == 0:
                lq, hq, c = (head(device_batch[k]) for k in ("lq", "hq", "c"))
                if not previewed:
                    compiling("the preview images' forward pass")
                    ready(preview, "preview", state.params, frozen, lq * 2 - 1, c)
                    previewed = True
                sr = (preview(state.params, frozen, lq * 2 - 1, c) + 1) / 2
                writer.write_images(step, {"lq_sr_hq": np.concatenate(
                    [np.asarray(lq), np.asarray(sr), np.asarray(hq)], 2)})
            if ckpt.should_save(step):  # the iterator state is only read when a checkpoint is written
                ckpt.save(step, state, data_state())
            if step == config.debug.crash_after_step:
                ckpt.wait()
                raise SystemExit(f"debug.crash_after_step={step}: simulated crash")
            # A signal reaches one process (a pod's hosts are preempted one by one): all agree on it here, at the
            # same step, so they save one checkpoint together.
            if distributed.any_process(watch.requested) or ckpt.reached_preemption(step):
                ckpt.save(step, state, data_state(), force=True)
                status = "preempted"
                logging.warning("preempted at step %d: checkpoint saved, exiting", step)
                break
    if pending is not None:
        last = report(*pending)
    exported: list[Path] = []
    if status == "done":
        ckpt.save(step, state, data_state(), force=True)
        if jax.process_index() == 0:
            exported = write_export(workdir / "export", method.name, setup, jax.device_get(state.params), base)
            for p in exported:
                logging.info("exported %s", p)
    ckpt.close()
    writer.flush()
    it.close()
    return {"step": step, "status": status, "metrics": last, "exported": [str(p) for p in exported],
            "state": state}


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out

