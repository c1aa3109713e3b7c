"""Export every method's full-size train step for a TPU v4-32 slice and one GPU, from this (CPU) host.

Each step is the one ``python train.py`` jits (``jsr.train.programs.build_program``: the method's setup, one
phase's updates, the loop's shardings), at SD-2.1-base size with the config's dtype, remat, crop and batch, over
abstract arguments only (no weight is materialised), lowered by ``jax.export`` for

    tpu-4x4     platform tpu, 16 devices, mesh data=4 fsdp=4            (v4-32: --config.mesh.data=4 fsdp=4)
    tpu-2x4x2   platform tpu, 16 devices, mesh data=2 fsdp=4 tensor=2
    cuda-1      platform cuda, one device

Per program and target it records: export success or the exact error, the serialized StableHLO size, XLA's
cost-analysis FLOPs of the unpartitioned step (every device together; ``cost_analysis`` of the lowered module,
no compilation for the target is possible here) per step and per image, and the bytes one device holds of the
trainable trees, optimizer state, frozen tree and batch under the step's shardings.

Attention: ``auto`` resolves as the target would (``jsr.train.programs.target_backend``). When that export
fails (cuDNN attention cannot be traced without a GPU; a Pallas kernel that needs the TPU compiler), the program
is exported again with the XLA attention path and the row says so (``attention_fallback``, ``first_error``).

A config batch that does not split over ``data`` x ``fsdp`` is raised to the next multiple (the loop would
refuse it), and the row keeps both (``config_batch``, ``batch``).

    python benchmarks/export_programs.py                                    # everything (tens of CPU-minutes)
    python benchmarks/export_programs.py --programs fidelity,ctsr1 --targets cuda-1
    python benchmarks/export_programs.py --preset tiny --size 64 --programs fidelity   # smoke run

Prints a table with projected step times and writes JSON (``--out``, default
``benchmarks/results/export_programs.json``) after every row.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from _common import TRAIN_PROGRAMS, environment, write_result

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # configs/ lives at the repo root

PROGRAMS = TRAIN_PROGRAMS

# target -> (platform, (data, fsdp, tensor)).
TARGETS = {
    "tpu-4x4": ("tpu", (4, 4, 1)),
    "tpu-2x4x2": ("tpu", (2, 4, 2)),
    "cuda-1": ("cuda", (1, 1, 1)),
}

# Dense bf16 peaks per device (TFLOP/s) for the projected step times: TPU v4 chip, H100/H200 SXM.
PEAKS = {"tpu": ("TPU v4", 275.0), "cuda": ("H100/H200", 989.0)}
MFUS = (0.45, 0.60)
# Attention kernels exported as the XLA path when the target's own cannot be (jsr.train.programs.target_backend).
FALLBACK = ("cudnn", "splash")


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--programs", default=",".join(PROGRAMS), help=f"comma-separated subset of {list(PROGRAMS)}")
    p.add_argument("--targets", default=",".join(TARGETS), help=f"comma-separated subset of {list(TARGETS)}")
    p.add_argument("--preset", default="sd21-base", help="architecture of the abstract base (jsr.models.presets)")
    p.add_argument("--size", type=int, default=None, help="crop side in pixels (default: the config's, 512)")
    p.add_argument("--batch", type=int, default=None, help="global batch (default: the config's)")
    p.add_argument("--out", default=None, help="JSON output path")
    return p.parse_args()


def program_config(key: str, files: dict[str, str], size: int | None = None, preset: str = "sd21-base"):
    """The config of program ``key`` as the user trains it, pointed at the stand-in files (``files``: the
    ``stand_in_files`` folders plus ``stage1``)."""
    module, variant, _ = PROGRAMS[key]
    c = importlib.import_module(f"configs.{module}").get_config(variant)
    c.model.path = f"<abstract {preset}>"
    if size:
        c.data.crop_size = size
    if module == "ctsr" and variant == "stage2":
        c.ctsr.stage1 = files["stage1"]
    if module == "rcod":
        c.rcod.vision = files["vit_l14"]
    if module == "codsr" and variant == "stage1":
        c.codsr.disc_backbone = files["vit_b16"]
    return c


def projections(row: dict[str, Any]) -> dict[str, float]:
    """Projected seconds per step at each MFU of :data:`MFUS` on the target's devices (FLOPs / devices / peak)."""
    name, tflops = PEAKS[row["platform"]]
    n = row["nr_devices"]
    return {f"{name} @{int(m * 100)}%": row["flops"] / (n * tflops * 1e12 * m) for m in MFUS}


def export_one(key: str, target: str, bases: dict, files: dict, args,
               xla_flops: dict[int, float] | None = None) -> dict[str, Any]:
    """One row: build ``key`` for ``target`` and export it; when that fails, once more with the XLA attention
    path in place of cuDNN / Pallas splash (``attention_fallback``; the first error stays in ``first_error``).
    ``xla_flops``: FLOPs of the same step with XLA attention by global batch, when known (a step whose kernels
    XLA cannot count takes them from there; another batch size is traced afresh)."""
    from jsr.train import programs as P
    from jsr.train.loop import remat_setting, with_remat

    platform, sizes = TARGETS[target]
    config = program_config(key, files, args.size, args.preset)
    ways = sizes[0] * sizes[1]
    config_batch = int(args.batch or config.data.batch_size)
    batch = -(-config_batch // ways) * ways
    row: dict[str, Any] = {"program": key, "target": target, "platform": platform,
                           "mesh": dict(zip(("data", "fsdp", "tensor"), sizes)), "config_batch": config_batch,
                           "batch": batch, "size": int(config.data.crop_size), "dtype": config.model.dtype,
                           "param_dtype": config.model.param_dtype, "remat": remat_setting(config)[0],
                           "remat_policy": remat_setting(config)[1], "attention": config.model.attention}
    key_b = (config.model.attention, config.model.dtype, config.model.param_dtype, remat_setting(config))
    program = None
    try:
        t0 = time.perf_counter()
        if key_b not in bases:
            bases.clear()  # one base at a time
            bases[key_b] = with_remat(P.abstract_base(args.preset, dtype=jnp.dtype(config.model.dtype),
                                                      param_dtype=jnp.dtype(config.model.param_dtype),
                                                      attention=config.model.attention, folder=files["base"]),
                                      *remat_setting(config))
        program = P.build_program(config, bases[key_b], P.abstract_mesh(*sizes), PROGRAMS[key][2], batch)
        row.update(build_s=time.perf_counter() - t0, groups=program.groups, device_bytes=program.device_bytes(),
                   global_bytes=program.global_bytes())
        for avoid in ((), FALLBACK):
            t0 = time.perf_counter()
            try:
                out = P.export_program(program, platform, avoid=avoid, xla_flops=(xla_flops or {}).get(batch))
            except Exception as e:  # noqa: BLE001 - the exact error is the result
                row.setdefault("first_error", f"{type(e).__name__}: {str(e)[:3000]}")
                row["error"] = f"{type(e).__name__}: {str(e)[:3000]}"
                row["failed_after_s"] = time.perf_counter() - t0
                print(f"{key} {target} (avoiding {avoid or 'nothing'}): {row['error'][:300]}", flush=True)
                continue
            out.pop("exported")
            row.pop("error", None)
            row.update(out, flops_per_image=out["flops"] / batch)
            if avoid:
                row["attention_fallback"] = "xla in place of " + "/".join(avoid)
            row["projected_step_s"] = projections(row)
            break
    except Exception as e:  # noqa: BLE001 - building the step failed: that is the row
        row["error"] = f"build: {type(e).__name__}: {str(e)[:3000]}"
    finally:
        program = None
        jax.clear_caches()
        gc.collect()
    return row


def export_rows(key: str, targets: list[str], bases: dict, files: dict, args):
    """Yield program ``key``'s row for each target. XLA counts no FLOPs inside the splash kernels, so a TPU row's
    count is that of the same step lowered for TPU with XLA attention (``flops_source``): the first TPU row of a
    global batch lowers it, the next one at that batch (the other mesh) reuses it. Counts are not shared across
    platforms: the cuda and tpu lowerings of one step count up to ~10 % apart (measured: FiDeSR 11.70 vs 10.96
    TFLOP per image at batch 8 both). Each row is printed as it is done."""
    xla_flops: dict[tuple[str, int], float] = {}
    for target in targets:
        platform = TARGETS[target][0]
        row = export_one(key, target, bases, files, args,
                         {b: f for (p, b), f in xla_flops.items() if p == platform})
        if "error" not in row and (not row["kernel_calls"] or row["flops_source"] == "this step with XLA attention"):
            xla_flops[(platform, row["batch"])] = row["flops"]
        print(describe(row), flush=True)
        yield row


def describe(row: dict[str, Any]) -> str:
    """One log line of a row."""
    if "error" in row:
        return f"{row['program']:9s} {row['target']:10s} FAILED {row['error'][:300]}"
    return (f"{row['program']:9s} {row['target']:10s} {row['stablehlo_bytes'] / 2**20:6.2f} MiB  "
            f"{row['flops'] / 1e12:8.2f} TFLOP/step  {row['flops_per_image'] / 1e12:6.3f} TFLOP/img  "
            f"{row['device_bytes']['total'] / 2**30:5.2f} GiB/dev  attention {row['attention_calls']}  "
            f"(export {row['export_s']:.0f} s, lower {row['lower_s']:.0f} s)")


def table(rows: list[dict[str, Any]]) -> str:
    """The Markdown table of BENCHMARKS.md."""
    head = ("| program | target | batch | export | StableHLO MiB | TFLOP/step | TFLOP/image | trainable+opt "
            "MiB/dev | frozen MiB/dev | step s @45 / 60 % MFU |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['program']} | {r['target']} | {r['batch']} | FAILED: {r['error'][:120]} "
                         "| | | | | | |")
            continue
        note = " (XLA attn.)" if r.get("attention_fallback") else ""
        d = r["device_bytes"]
        proj = " / ".join(f"{v:.3f}" for v in r["projected_step_s"].values())
        lines.append(f"| {r['program']} | {r['target']} | {r['batch']} | ok{note} | "
                     f"{r['stablehlo_bytes'] / 2**20:.2f} | {r['flops'] / 1e12:.2f} | "
                     f"{r['flops_per_image'] / 1e12:.3f} | {(d['trainable'] + d['optimizer']) / 2**20:.1f} | "
                     f"{d['frozen'] / 2**20:.1f} | {proj} |")
    return "\n".join(lines)


def main() -> None:
    args = _args()
    from jsr.train import programs as P

    keys = [k.strip() for k in args.programs.split(",") if k.strip()]
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    bad = [k for k in keys if k not in PROGRAMS] + [t for t in targets if t not in TARGETS]
    if bad:
        raise SystemExit(f"unknown programs/targets {bad}; programs: {list(PROGRAMS)}, targets: {list(TARGETS)}")
    out = args.out or Path(__file__).parent / "results" / "export_programs.json"
    result = {"benchmark": "export_programs", **environment(), "preset": args.preset, "peaks_tflops": PEAKS,
              "rows": []}
    with tempfile.TemporaryDirectory() as tmp, P.stand_in_files(tmp) as files:
        files = dict(files, base=str(Path(tmp) / "base"))
        base = P.abstract_base(args.preset, folder=files["base"])
        files["stage1"] = str(P.write_stage1_standin(base, Path(tmp) / "stage1"))
        bases: dict = {}
        for key in keys:
            for row in export_rows(key, targets, bases, files, args):
                result["rows"].append(row)
                write_result(result, out)
    print(table(result["rows"]))


if __name__ == "__main__":
    main()
