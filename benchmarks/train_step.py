"""Time one training step of every method: step time, images/s, XLA's FLOP count and model-FLOPs utilisation.

The base is a random SD folder of the chosen architecture (``jsr.weights.tiny.write_tiny_sd``; full SD-2.1-base by
default) with random stand-in teachers, LPIPS trunk and stage-1 model, so nothing needs downloading. Each step is
the jitted train step the loop runs (``jsr.train.step.make_train_step`` over ``jsr.methods.get(name).setup``), on one
device, after a warm-up call that compiles it.

    python benchmarks/train_step.py                                  # SD-2.1-base, 512 crops, bf16, every method
    python benchmarks/train_step.py --size 128 --dtype float32       # the reduced CPU run of BENCHMARKS.md
    python benchmarks/train_step.py --preset tiny --size 64 --methods fidelity,ctsr1     # smoke run

FLOPs are XLA's ``cost_analysis()`` of the compiled step (every update of the step, forward and backward,
including rematerialisation when ``--remat`` is on); MFU = FLOPs / step time / peak. The peak is ``--peak-tflops``
when given, else the device kind's dense bf16 (or f32) datasheet figure for known GPUs/TPUs, else (CPU) the
measured throughput of a large matmul in the compute dtype, labelled as such.

Every step is built and lowered first, the programs compile side by side in threads, then each is timed alone
(under ``$JSR_BENCH_LOCK`` when set). Prints a table and writes JSON (``--out``, default
``benchmarks/results/train_step-<backend>.json``) after every method, so a run stopped part-way keeps its rows.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from _common import TRAIN_PROGRAMS, compile_in_order, device_lock, environment, program_bytes, write_result

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # configs/ lives at the repo root

# The train steps measured here (RCOD and CODSR need their vision towers prepared: not timed yet).
METHODS = {k: TRAIN_PROGRAMS[k] for k in ("osediff", "fidelity", "pisa-pix", "pisa-sem", "ctsr1", "ctsr2", "fidesr")}

# Dense datasheet peaks in TFLOP/s per device (bf16, f32): H100 SXM, H200, A100, TPU v4/v5e/v5p chips.
PEAK_TFLOPS = {
    "H100": (989.0, 67.0), "H200": (989.0, 67.0), "A100": (312.0, 19.5),
    "TPU v4": (275.0, 275.0 / 2), "TPU v5 lite": (197.0, 197.0 / 2), "TPU v5": (459.0, 459.0 / 2),
}


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="sd21-base", help="architecture of the random base (jsr.models.presets)")
    p.add_argument("--size", type=int, default=512, help="HQ/LQ crop side in pixels")
    p.add_argument("--batch", type=int, default=1, help="images per step")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {list(METHODS)}")
    p.add_argument("--steps", type=int, default=3, help="timed steps per method (after one compiling call)")
    p.add_argument("--dtype", default="bfloat16", help="compute and frozen-parameter dtype")
    p.add_argument("--remat", action="store_true", help="gradient checkpointing in the UNet/VAE blocks")
    p.add_argument("--attention", default="auto")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for the MFU column")
    p.add_argument("--base-writer", default="jax", choices=("jax", "torch"),
                   help="how the random base is made: jsr's jitted init (one program; at full size ptxas failed on "
                        "it on an H200) or diffusers/transformers' own random init on the host")
    p.add_argument("--model-dir", default=None, help="where the random base is written (default: a temp dir)")
    p.add_argument("--compile-workers", type=int, default=None,
                   help="programs compiled at once (default: all; 1 on a small host)")
    p.add_argument("--out", default=None, help="JSON output path")
    return p.parse_args()


def _peak(dtype: jnp.dtype, override: float | None) -> tuple[float, str]:
    if override:
        return override * 1e12, "given"
    kind = jax.devices()[0].device_kind
    for name, (bf16, f32) in PEAK_TFLOPS.items():
        if name.lower() in kind.lower():
            return (bf16 if dtype == jnp.bfloat16 else f32) * 1e12, f"datasheet ({kind})"
    n = 2048
    a = jnp.ones((n, n), dtype)
    mm = jax.jit(lambda x: x @ x)
    mm(a).block_until_ready()
    start = time.perf_counter()
    for _ in range(5):
        out = mm(a)
    out.block_until_ready()
    return 5 * 2 * n ** 3 / (time.perf_counter() - start), f"measured {n}^3 matmul ({kind})"


def _config(key: str, args: argparse.Namespace, model_dir: Path, stage1_dir: Path):
    import importlib

    module, variant, _ = METHODS[key]
    c = importlib.import_module(f"configs.{module}").get_config(variant)
    c.model.path = str(model_dir)
    c.model.dtype = c.model.param_dtype = args.dtype
    c.model.remat = "blocks" if args.remat else "none"
    c.model.attention = args.attention
    c.data.batch_size = args.batch
    c.data.crop_size = args.size
    if module == "ctsr" and variant == "stage2":
        c.ctsr.stage1 = str(stage1_dir)
    return c


def _write_stage1(base, folder: Path) -> Path:
    """A random non-zero OSEDiff-layout LoRA pair as a jsr export folder (CTSR stage 2's frozen stage-1 model)."""
    from jsr.methods.common import random_lora
    from jsr.models import lora as L
    from jsr.weights.peft import save_peft_lora

    rng = jax.random.key(5)
    save_peft_lora(random_lora(rng, base.unet_params, L.OSEDIFF_UNET), folder / "unet")
    save_peft_lora(random_lora(jax.random.fold_in(rng, 1), base.vae_params, L.OSEDIFF_VAE), folder / "vae")
    return folder


def _write_random_sd_torch(folder: Path, preset_name: str, seed: int = 0) -> Path:
    """A random SD folder of ``preset_name`` made by diffusers/transformers' own initialisers (host CPU), in the
    layout ``load_base`` reads; marked as jsr-random (``_jsr_preset``) so stand-in teachers are allowed."""
    import json

    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from jsr.models.presets import preset
    from jsr.weights.tiny import write_tokenizer

    if (folder / "model_index.json").is_file():
        return folder
    cfg = preset(preset_name)
    strip = lambda d: {k: v for k, v in d.items() if not k.startswith("_")}  # noqa: E731
    torch.manual_seed(seed)
    UNet2DConditionModel(**strip(cfg["unet"])).save_pretrained(folder / "unet")
    AutoencoderKL(**strip(cfg["vae"])).save_pretrained(folder / "vae")
    te = {k: v for k, v in cfg["text_encoder"].items() if k not in ("architectures", "model_type")}
    CLIPTextModel(CLIPTextConfig(**te)).save_pretrained(folder / "text_encoder")
    write_tokenizer(folder / "tokenizer", cfg["text_encoder"]["max_position_embeddings"])
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(cfg["scheduler"]))
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline",
                                                          "_jsr_preset": preset_name, "_jsr_seed": seed}))
    return folder


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per computation
        cost = cost[0] if cost else {}
    return float(cost.get("flops", float("nan"))) if cost else float("nan")


def prepare_method(key: str, args, base, model_dir: Path, stage1_dir: Path) -> dict:
    """Build one method's train step and lower it (tracing only); returns what :func:`run_method` needs."""
    from jsr.train.loop import build
    from jsr.train.step import init_state, make_train_step

    config = _config(key, args, model_dir, stage1_dir)
    _, setup = build(config, base, jax.random.key(1))
    updates = setup.phases[METHODS[key][2]][1]
    state = init_state(setup.params, setup.all_updates, 0)
    rng = np.random.default_rng(0)
    shape = (args.batch, args.size, args.size, 3)
    batch = {"hq": jnp.asarray(rng.uniform(size=shape), jnp.float32),
             "lq": jnp.asarray(rng.uniform(size=shape), jnp.float32),
             "c": jnp.asarray(base.prompts(["a photo"] * args.batch))}
    step = jax.jit(make_train_step(updates, config.optim.accum_steps), donate_argnums=0)
    trainable = sum(x.size for u in updates for x in jax.tree.leaves(setup.params[u.group]))
    return {"lowered": step.lower(state, setup.frozen, batch), "state": state, "frozen": setup.frozen,
            "batch": batch, "updates": [u.group for u in updates], "trainable": int(trainable)}


def run_method(key: str, prep: dict, compiled, compile_s: float, steps: int) -> dict:
    """Time one compiled train step (after a warm-up call); returns the JSON row."""
    state, frozen, batch = prep["state"], prep["frozen"], prep["batch"]
    with device_lock():
        state, m = compiled(state, frozen, batch)  # warm-up (first-run allocation)
        jax.block_until_ready(m)
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            state, m = compiled(state, frozen, batch)
            jax.block_until_ready(m)
            times.append(time.perf_counter() - start)
    losses = {k: float(v) for k, v in jax.device_get(m).items() if k.endswith("/loss")}
    mem = None
    try:
        stats = jax.devices()[0].memory_stats() or {}
        mem = stats.get("peak_bytes_in_use")
    except Exception:  # noqa: BLE001 - not every backend reports memory
        pass
    n = prep["batch"]["hq"].shape[0]
    return {"method": key, "updates": prep["updates"], "compile_s": compile_s,
            "step_s": statistics.median(times), "step_s_all": times,
            "images_per_s": n / statistics.median(times), "flops": _flops(compiled),
            "trainable_params": prep["trainable"], "losses": losses, "process_peak_bytes": mem,
            "program_bytes": program_bytes(compiled)}


def main() -> None:
    args = _args()
    from jsr.cli import cpu_compile_defaults

    cpu_compile_defaults()  # as train.py: XLA:CPU's fast-compile preset (JSR_XLA_CPU_PRESET=default opts out)
    from jsr.sr.base import load_base
    from jsr.weights.tiny import write_tiny_sd

    keys = [k.strip() for k in args.methods.split(",") if k.strip()]
    unknown = [k for k in keys if k not in METHODS]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; known: {list(METHODS)}")
    dtype = jnp.dtype(args.dtype)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.model_dir) if args.model_dir else Path(tmp) / f"random-{args.preset}"
        t0 = time.perf_counter()
        if args.base_writer == "torch":
            _write_random_sd_torch(model_dir, args.preset)
        else:
            write_tiny_sd(model_dir, seed=0, preset_name=args.preset)
        base = load_base(model_dir, dtype=dtype, attention=args.attention, remat=args.remat)
        stage1_dir = _write_stage1(base, Path(tmp) / "stage1")
        print(f"random {args.preset} base written and loaded in {time.perf_counter() - t0:.1f} s "
              f"({jax.default_backend()}, {jax.devices()[0].device_kind})", flush=True)
        peak, peak_src = _peak(dtype, args.peak_tflops)
        print(f"peak {peak / 1e12:.2f} TFLOP/s ({peak_src})", flush=True)
        result = {
            "benchmark": "train_step", **environment(), "preset": args.preset, "size": args.size,
            "batch": args.batch, "dtype": args.dtype, "remat": args.remat, "attention": args.attention,
            "peak_flops": peak, "peak_source": peak_src, "rows": [],
        }
        out = args.out or Path(__file__).parent / "results" / f"train_step-{jax.default_backend()}.json"
        preps, lowered = {}, {}
        for key in keys:
            t0 = time.perf_counter()
            try:
                preps[key] = prepare_method(key, args, base, model_dir, stage1_dir)
                lowered[key] = preps[key]["lowered"]
                print(f"{key}: built and lowered in {time.perf_counter() - t0:.0f} s", flush=True)
            except Exception as e:  # noqa: BLE001 - one method failing must not lose the others' rows
                result["rows"].append({"method": key, "error": f"{type(e).__name__}: {str(e)[:2000]}"})
                print(f"{key}: FAILED to build: {type(e).__name__}: {str(e)[:300]}", flush=True)
        # Compiling is host work: the programs compile side by side (--compile-workers), then run one by one.
        for key, prog, compile_s in compile_in_order(lowered, args.compile_workers):
            preps[key]["lowered"] = lowered[key] = None
            if isinstance(prog, Exception):
                row = {"method": key, "error": f"compile: {type(prog).__name__}: {str(prog)[:2000]}"}
            else:
                try:
                    row = run_method(key, preps[key], prog, compile_s, args.steps)
                    row["mfu"] = row["flops"] / row["step_s"] / peak
                    print(f"{key:9s} step {row['step_s']:8.3f} s  {row['images_per_s']:7.3f} img/s  "
                          f"{row['flops'] / 1e9:10.4g} GFLOP  MFU {100 * row['mfu']:5.1f} %  "
                          f"(compile {row['compile_s']:.0f} s)", flush=True)
                except Exception as e:  # noqa: BLE001 - e.g. out of memory
                    row = {"method": key, "error": f"run: {type(e).__name__}: {str(e)[:2000]}"}
            if "error" in row:
                print(f"{key}: {row['error'][:300]}", flush=True)
            result["rows"].append(row)
            preps[key] = prog = None  # frees the method's state and program before the next one runs
            write_result(result, out)


if __name__ == "__main__":
    main()
