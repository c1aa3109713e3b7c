"""The training loop: ``train(config, workdir)`` (what ``python train.py`` runs).

One process per host. Per step: next batch from the Grain iterator (host), prompt embeddings from the cache
(host), batch placed on the mesh, one jitted step with declared shardings and the state donated. The host reads
the previous step's metrics after dispatching the current one, so that read never stalls the device.

Workdir layout: ``config.json`` (the resolved config), ``checkpoints/`` (Orbax: state + data iterator),
``tensorboard/`` (event files), ``export/<group>/{unet,vae}/`` (peft safetensors of the trained LoRAs, written at
the end), ``profile/`` (optional trace).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from jsr.data import make_iterator, shard_batch
from jsr.models import common
from jsr.sr.base import load_base
from jsr.train import methods, sharding
from jsr.train.checkpoint import Checkpointer, PreemptionWatch
from jsr.train.step import TrainState, init_state, make_train_step
from jsr.train.writers import Profiler, ProgressReporter, create_writer


class NonFiniteLossError(RuntimeError):
    """The run produced non-finite losses or gradients for too many consecutive steps."""


def _frozen_shardings(frozen: dict, base, mesh, shard: bool) -> Any:
    rep = sharding.replicated(mesh)
    out = jax.tree.map(lambda _: rep, frozen)
    if shard:
        out["unet"] = sharding.tree_shardings(frozen["unet"], common.logical_axes(base.models.unet), mesh)
        out["vae"] = sharding.tree_shardings(frozen["vae"], common.logical_axes(base.models.vae), mesh)
    return out


def _export(state: TrainState, setup: methods.MethodSetup, workdir: Path) -> list[Path]:
    from jsr.weights.peft import save_peft_lora

    written = []
    params = jax.device_get(state.params)
    for group in setup.export_groups:
        for model, lora in params[group].items():
            written.append(save_peft_lora(lora, workdir / "export" / group / model))
    return written


def train(config, workdir: str | os.PathLike) -> dict[str, Any]:
    """Run (or resume) the training ``config`` describes in ``workdir``.

    Returns a summary: ``{"step", "status" ("done"|"preempted"), "metrics" (last step, floats), "exported"}``.
    Raises :class:`NonFiniteLossError` when ``config.max_nonfinite`` consecutive steps were non-finite.
    """
    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    sharding.maybe_initialize_distributed(config.multihost)
    if jax.process_index() == 0:
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")
    mesh_cfg = dict(config.mesh)
    n = mesh_cfg.pop("num_devices", -1)
    mesh = sharding.make_mesh(**mesh_cfg, devices=None if n in (-1, None) else jax.devices()[:n])
    logging.info("mesh %s over %d devices (%s)", dict(mesh.shape), jax.device_count(), jax.default_backend())

    t0 = time.perf_counter()
    base = load_base(config.model.path, dtype=jnp.dtype(config.model.dtype),
                     param_dtype=jnp.dtype(config.model.param_dtype), attention=config.model.attention,
                     remat=config.model.remat, tiny_seed=config.model.tiny_seed)
    logging.info("base model from %s loaded in %.1f s", base.path, time.perf_counter() - t0)
    rng = jax.random.key(config.seed)
    setup = methods.build(config, base, jax.random.fold_in(rng, 1))

    rep = sharding.replicated(mesh)
    frozen_sh = _frozen_shardings(setup.frozen, base, mesh, config.shard_frozen)
    frozen = jax.device_put(setup.frozen, frozen_sh)
    state = init_state(setup.params, setup.all_updates, config.seed)
    state_sh = jax.tree.map(lambda _: rep, state)
    state = jax.device_put(state, state_sh)

    ckpt = Checkpointer(workdir / "checkpoints", keep=config.checkpoint.keep, every=config.checkpoint.every,
                        async_save=config.checkpoint.async_save)
    data_cfg = config.data.to_dict()
    data_cfg["seed"] = config.data.seed if config.data.seed else config.seed
    it = make_iterator(data_cfg)
    if ckpt.latest_step() is not None:
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
        state, data_state = ckpt.restore(abstract)
        it.set_state(data_state)
        logging.info("resumed from step %d", int(state.step))

    batch_keys = ("hq", "lq", "c")
    batch_sh = {k: sharding.batch_sharding(mesh, 4 if k != "c" else 3) for k in batch_keys}
    step_fns: dict[int, Any] = {}

    def step_fn(phase: int, updates):
        if phase not in step_fns:
            step_fns[phase] = jax.jit(make_train_step(updates, config.optim.accum_steps),
                                      in_shardings=(state_sh, frozen_sh, batch_sh), out_shardings=(state_sh, rep),
                                      donate_argnums=0)
        return step_fns[phase]

    preview = jax.jit(setup.preview, out_shardings=rep)
    writer = create_writer(workdir / "tensorboard")
    if jax.process_index() == 0:
        writer.write_hparams({k: str(v) for k, v in _flat(config.to_dict()).items()})
    total = int(config.total_steps)
    progress = ProgressReporter(writer, total, every=config.log.every, batch_size=config.data.batch_size)
    profiler = Profiler(workdir / "profile", config.log.profile_step, config.log.profile_steps, config.log.profile)
    step = int(state.step)
    pending: tuple[int, Any] | None = None
    last: dict[str, float] = {}
    status = "done"

    def report(s: int, metrics: Any) -> dict[str, float]:
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        for k, v in m.items():
            if k.endswith("/skipped") and v:
                logging.warning("step %d: non-finite %s loss or gradients; update not applied", s,
                                k.rsplit("/", 1)[0])
        if s % config.log.every == 0 or s == total:
            writer.write_scalars(s, m)
        return m

    with PreemptionWatch() as watch:
        while step < total:
            batch = next(it)
            if step in tuple(config.debug.nan_steps):
                batch = dict(batch, hq=np.full_like(batch["hq"], np.nan))
            host = {"hq": batch["hq"], "lq": batch["lq"], "c": np.asarray(base.prompts(list(batch["prompt"])))}
            device_batch = shard_batch(host, mesh)
            phase, updates = setup.updates_at(step)
            profiler(step)
            state, metrics = step_fn(phase, updates)(state, frozen, device_batch)
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
                n = int(config.log.images)
                x_lq = device_batch["lq"][:n] * 2 - 1
                sr = (preview(state.params, frozen, x_lq, device_batch["c"][:n]) + 1) / 2
                writer.write_images(step, {"lq_sr_hq": np.concatenate(
                    [np.asarray(device_batch["lq"][:n]), np.asarray(sr), np.asarray(device_batch["hq"][:n])], 2)})
            if ckpt.should_save(step):  # the iterator state is only read when a checkpoint is written
                ckpt.save(step, state, it.get_state())
            if step == config.debug.sigterm_at_step:
                os.kill(os.getpid(), signal.SIGTERM)  # exercises the real handler, as a preempted VM would
            if step == config.debug.crash_after_step:
                ckpt.wait()
                raise SystemExit(f"debug.crash_after_step={step}: simulated crash")
            if watch.requested or ckpt.reached_preemption(step):
                ckpt.save(step, state, it.get_state(), force=True)
                status = "preempted"
                logging.warning("preempted at step %d: checkpoint saved, exiting", step)
                break
    if pending is not None:
        last = report(*pending)
    exported: list[Path] = []
    if status == "done":
        ckpt.save(step, state, it.get_state(), force=True)
        if jax.process_index() == 0:
            exported = _export(state, setup, workdir)
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

