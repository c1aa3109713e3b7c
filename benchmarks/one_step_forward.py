"""Time the one-step SR forward at full SD-2.1-base size, per method, against diffusers PyTorch where it applies.

Cases are ``method:size:batch:dtype``:

``osediff``  OSEDiff's forward: VAE encode of an HxW image, UNet at t=999 on the H/8 latent with a 77-token prompt
             embedding, the x0 step, VAE decode. The same forward is timed in diffusers (PyTorch) with the same
             random weights (diffusers' init, converted through ``jsr.weights``), so the run also checks parity.
``fidesr``   FiDeSR's inference (``jsr.methods.get("fidesr").forward``): VAE encode, UNet at t=1, the LRRB on
             ``[z_L, eps_hat]``, LFIM at the release gains (0.2 / 0.3; FFT filters and the LQ detail map), decode.
``rcod``     RCOD's: CLIP ViT-L/14 vision on the LQ resized to 224 px (257 tokens), the ``Linear(1024, 1024)``
             visual-prompt projection as the UNet's context, UNet at the code 249 with the release's fixed
             ``abar = 0.7537`` x0 step, VAE encode/decode. Random ViT-L/14 weights (Flax init).

Text encoders are excluded everywhere (OSEDiff's prompt embedding is an input; RCOD has none). LoRAs are taken as
merged into the base (inference merges them), so every case runs base-sized convolutions and matmuls.

A ``float32`` case runs at full matmul precision (``jax.default_matmul_precision("highest")``; TF32 off in
PyTorch): it is the reference the ``bfloat16`` case of the same method/size/batch is compared with (relative L2 of
the decoded images). A ``bfloat16`` case is compared with PyTorch in ``--torch-half`` (float16 by default) on a
GPU; on a CPU PyTorch runs float32 cases only.

    python benchmarks/one_step_forward.py                                  # 512 px, f32, osediff, CPU
    python benchmarks/one_step_forward.py --cases osediff:512:1:bfloat16,osediff:512:8:bfloat16,osediff:1024:1:bfloat16,osediff:512:1:float32 --repeats 20   # GPU
    python benchmarks/one_step_forward.py --preset tiny --cases osediff:64:1:float32,fidesr:64:1:float32,rcod:64:1:float32   # smoke

All programs are lowered first and compiled in parallel threads; each is timed as soon as it and those before it
are compiled, one at a time (under
``$JSR_BENCH_LOCK`` when set, so a benchmark beside this one never times at the same moment). Prints a table and
writes JSON (``--out``) after every case, so a run stopped part-way keeps what it measured.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from _common import compile_in_order, device_lock, environment, program_bytes, write_result

METHODS = ("osediff", "fidesr", "rcod")
RCOD_ABAR = 0.7537  # RCOD's released x0 step uses this fixed abar whatever the code (DESIGN.md)
RCOD_CODE = 249.0


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="sd21-base", help="model preset from jsr.models.presets")
    p.add_argument("--cases", default="osediff:512:1:float32",
                   help="comma-separated method:size:batch:dtype (methods: " + ", ".join(METHODS) + ")")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per case (after 2 warm-up runs)")
    p.add_argument("--torch-half", default="float16", help="PyTorch dtype for a bfloat16 case on a GPU")
    p.add_argument("--attention", default="auto", help="jsr attention implementation")
    p.add_argument("--skip-torch", action="store_true", help="time jsr only")
    p.add_argument("--compile-workers", type=int, default=None, help="programs compiled at once (default: all)")
    p.add_argument("--out", default=None, help="JSON output path")
    return p.parse_args()


def _parse_cases(spec: str) -> list[tuple[str, int, int, str]]:
    cases = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        parts = item.split(":")
        if len(parts) != 4 or parts[0] not in METHODS:
            raise SystemExit(f"bad case {item!r}: want method:size:batch:dtype with method in {METHODS}")
        cases.append((parts[0], int(parts[1]), int(parts[2]), str(jnp.dtype(parts[3]))))
    return cases


def _time(fn: Callable[[], Any], repeats: int, warmup: int = 2) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def _vit_l14():
    from jsr.models.clip_vision import CLIPVisionConfig

    # openai/clip-vit-large-patch14's vision tower (RCOD's encoder).
    return CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                            patch_size=14, image_size=224, projection_dim=768)


def _rcod_parts(width: int, dtype: jnp.dtype, attention: str, preset: str):
    """A random CLIP vision encoder (ViT-L/14; tiny for the tiny preset) and a projection to ``width``."""
    from flax import linen as nn

    from jsr.models.clip_vision import CLIPVisionConfig, CLIPVisionModel

    cfg = _vit_l14() if preset != "tiny" else CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, patch_size=16,
        image_size=64)
    model = CLIPVisionModel(cfg, dtype=dtype, attention_impl=attention)
    params = jax.jit(lambda k: nn.meta.unbox(model.init(k, *model.example_inputs())["params"]))(jax.random.key(3))
    k1, _ = jax.random.split(jax.random.key(4))
    proj = {"kernel": jax.random.normal(k1, (cfg.hidden_size, width), jnp.float32) / np.sqrt(cfg.hidden_size),
            "bias": jnp.zeros((width,), jnp.float32)}
    return model, params, proj


def _forwards(models, schedule, sf: float, rcod, attention: str) -> dict[str, Callable]:
    """The jsr forward of each method: ``f(unet_params, vae_params, extra, x, c) -> image`` in [-1, 1]."""
    from jsr.methods import get as get_method
    from jsr.models.clip_vision import clip_preprocess
    from jsr.sr.schedule import x0_from_output

    unet, vae = models.unet, models.vae
    fidesr = get_method("fidesr")
    fidesr_knobs = fidesr.knob_values()

    def encode(vae_params, x):
        mean, _ = vae.apply({"params": vae_params}, x.astype(unet.dtype), method=vae.encode)
        return mean.astype(jnp.float32) * sf

    def decode(vae_params, z):
        return jnp.clip(vae.apply({"params": vae_params}, (z / sf).astype(unet.dtype), method=vae.decode), -1, 1)

    def osediff(unet_params, vae_params, extra, x, c):
        z = encode(vae_params, x)
        out = unet.apply({"params": unet_params}, z, jnp.full((x.shape[0],), 999.0), c.astype(unet.dtype))
        return decode(vae_params, x0_from_output(schedule, z, out, 999))

    def fidesr_fwd(unet_params, vae_params, extra, x, c):
        z = encode(vae_params, x)
        return decode(vae_params, fidesr.forward(models, unet_params, {"lrrb": extra}, z, c, fidesr_knobs, x_lq=x))

    def rcod_fwd(unet_params, vae_params, extra, x, c):
        vision, vision_params = rcod[0], extra["vision"]
        pixels = clip_preprocess((x + 1) / 2, vision.config.image_size, mode="release")
        tokens = vision.apply({"params": vision_params}, pixels.astype(vision.dtype)).last_hidden_state
        ctx = tokens.astype(jnp.float32) @ extra["proj"]["kernel"] + extra["proj"]["bias"]
        z = encode(vae_params, x)
        eps = unet.apply({"params": unet_params}, z, jnp.full((x.shape[0],), RCOD_CODE), ctx.astype(unet.dtype))
        z0 = (z - np.sqrt(1 - RCOD_ABAR) * eps.astype(jnp.float32)) / np.sqrt(RCOD_ABAR)
        return decode(vae_params, z0)

    return {"osediff": osediff, "fidesr": fidesr_fwd, "rcod": rcod_fwd}


def main() -> None:
    args = _args()
    cases = _parse_cases(args.cases)
    import torch
    from diffusers import AutoencoderKL as TorchVAE
    from diffusers import UNet2DConditionModel as TorchUNet

    from jsr.models.lrrb import LRRBConfig, init_lrrb_params
    from jsr.models.presets import preset
    from jsr.sr.generator import SDModels
    from jsr.sr.schedule import DDPMSchedule
    from jsr.weights import load_unet, load_vae

    cfg = preset(args.preset)
    strip = lambda d: {k: v for k, v in d.items() if not k.startswith("_")}  # noqa: E731
    torch.manual_seed(0)
    t0 = time.perf_counter()
    t_unet = TorchUNet(**strip(cfg["unet"])).eval()
    t_vae = TorchVAE(**strip(cfg["vae"])).eval()
    dtypes = sorted({d for _, _, _, d in cases})
    sf = float(cfg["vae"]["scaling_factor"])
    schedule = DDPMSchedule.from_config(cfg["scheduler"])
    width = cfg["unet"]["cross_attention_dim"]
    per_dtype: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        t_unet.save_pretrained(Path(tmp) / "unet")
        t_vae.save_pretrained(Path(tmp) / "vae")
        for d in dtypes:
            unet, unet_params = load_unet(Path(tmp) / "unet", dtype=jnp.dtype(d), attention_impl=args.attention)
            vae, vae_params = load_vae(Path(tmp) / "vae", dtype=jnp.dtype(d), attention_impl=args.attention)
            models = SDModels(unet=unet, vae=vae, schedule=schedule, scaling_factor=sf)
            rcod = _rcod_parts(width, jnp.dtype(d), args.attention, args.preset) if any(
                m == "rcod" and dd == d for m, _, _, dd in cases) else None
            per_dtype[d] = (models, unet_params, vae_params, rcod, _forwards(models, schedule, sf, rcod,
                                                                              args.attention))
    print(f"models built and converted in {time.perf_counter() - t0:.1f} s ({jax.default_backend()}, "
          f"{jax.devices()[0].device_kind})", flush=True)
    lrrb_cfg = LRRBConfig(in_channels=2 * cfg["unet"]["in_channels"])
    lrrb_params = init_lrrb_params(jax.random.key(2), lrrb_cfg)

    rng = np.random.default_rng(0)
    inputs: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
    for _, size, batch, _ in cases:
        if (size, batch) not in inputs:
            inputs[size, batch] = (rng.uniform(-1, 1, (batch, size, size, 3)).astype(np.float32),
                                   rng.normal(size=(batch, 77, width)).astype(np.float32))

    lowered, calls = {}, {}
    for method, size, batch, d in cases:
        name = f"{method}:{size}:{batch}:{d}"
        models, unet_params, vae_params, rcod, fwd = per_dtype[d]
        extra = {"osediff": None, "fidesr": lrrb_params,
                 "rcod": None if rcod is None else {"vision": rcod[1], "proj": rcod[2]}}[method]
        x, c = (jnp.asarray(a) for a in inputs[size, batch])
        precision = "highest" if d == "float32" else None
        with jax.default_matmul_precision(precision):
            lowered[name] = jax.jit(fwd[method]).lower(unet_params, vae_params, extra, x, c)
        calls[name] = (unet_params, vae_params, extra, x, c)
    print(f"lowered {len(lowered)} programs; compiling in parallel", flush=True)

    result = {"benchmark": "one_step_forward", "preset": args.preset, **environment(),
              "attention": args.attention, "unet_params": int(sum(x.size for x in jax.tree.leaves(
                  per_dtype[dtypes[0]][1]))), "rows": []}
    out_path = args.out or f"benchmarks/results/one_step_forward-{result['jax_backend']}-{args.preset}.json"
    tdev = "cuda" if torch.cuda.is_available() else "cpu"
    if tdev == "cuda":  # the float32 reference runs at full precision on both sides
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    outputs: dict[str, np.ndarray] = {}
    for name, prog, compile_s in compile_in_order(lowered, args.compile_workers):
        method, size, batch, d = name.split(":")
        size, batch = int(size), int(batch)
        row: dict[str, Any] = {"case": name, "method": method, "size": size, "batch": batch, "dtype": d,
                               "compile_s": compile_s}
        if isinstance(prog, Exception):
            row["error"] = f"{type(prog).__name__}: {str(prog)[:2000]}"
            result["rows"].append(row)
            print(f"{name}: compile failed: {row['error'][:300]}", flush=True)
            write_result(result, out_path)
            continue
        a = calls[name]
        row["program_bytes"] = program_bytes(prog)
        try:
            with device_lock():
                y = np.asarray(prog(*a).block_until_ready(), np.float32)
                times = _time(lambda: prog(*a).block_until_ready(), args.repeats)
        except Exception as e:  # noqa: BLE001 - e.g. out of memory: record it and go on
            row["error"] = f"{type(e).__name__}: {str(e)[:2000]}"
            result["rows"].append(row)
            print(f"{name}: run failed: {row['error'][:300]}", flush=True)
            write_result(result, out_path)
            continue
        outputs[name] = y
        row.update(times_s=times, median_s=statistics.median(times),
                   images_per_s=batch / statistics.median(times))
        ref = f"{method}:{size}:{batch}:float32"
        if d != "float32" and ref in outputs:
            row["rel_l2_vs_float32"] = float(np.linalg.norm(y - outputs[ref]) / np.linalg.norm(outputs[ref]))
        torch_dtype = "float32" if d == "float32" else (args.torch_half if tdev == "cuda" else None)
        if method == "osediff" and not args.skip_torch and torch_dtype:
            row["torch"] = _torch_case(t_unet, t_vae, schedule, sf, inputs[size, batch], tdev, torch_dtype,
                                       args.repeats, torch)
            row["speedup_vs_torch"] = row["torch"]["median_s"] / row["median_s"]
            row["rel_l2_vs_torch"] = float(np.linalg.norm(y - row["torch"].pop("_y")) / np.linalg.norm(y))
        result["rows"].append(row)
        _print_row(row)
        write_result(result, out_path)
    for name, y in outputs.items():  # the f32 reference may come after its bf16 case
        m, s, b, d = name.split(":")
        ref = f"{m}:{s}:{b}:float32"
        row = next(r for r in result["rows"] if r["case"] == name)
        if d != "float32" and ref in outputs and "rel_l2_vs_float32" not in row:
            row["rel_l2_vs_float32"] = float(np.linalg.norm(y - outputs[ref]) / np.linalg.norm(outputs[ref]))
            print(f"{name}: relative L2 to float32 {row['rel_l2_vs_float32']:.2e}")
    write_result(result, out_path)


def _torch_case(t_unet, t_vae, schedule, sf, arrays, tdev, torch_dtype, repeats, torch) -> dict[str, Any]:
    """diffusers' OSEDiff forward on the same inputs: times and the output (``_y``, NHWC float32)."""
    import copy

    x_np, c_np = arrays
    tdtype = getattr(torch, torch_dtype)
    # Copies: casting the float32 originals in place would round the weights of every later case.
    t_unet = copy.deepcopy(t_unet).to(tdev, tdtype)
    t_vae = copy.deepcopy(t_vae).to(tdev, tdtype)
    abar = float(np.asarray(schedule.alphas_cumprod)[999])
    xt = torch.from_numpy(x_np.transpose(0, 3, 1, 2).copy()).to(tdev, tdtype)
    ct = torch.from_numpy(c_np).to(tdev, tdtype)

    @torch.no_grad()
    def forward():
        z = t_vae.encode(xt).latent_dist.mean * sf
        eps = t_unet(z, 999, ct).sample
        z0 = (z - (1 - abar) ** 0.5 * eps) / abar ** 0.5
        y = t_vae.decode(z0 / sf).sample.clamp(-1, 1)
        if tdev == "cuda":
            torch.cuda.synchronize()
        return y

    with device_lock():
        y = forward().float().cpu().numpy().transpose(0, 2, 3, 1)
        times = _time(forward, repeats)
    return {"dtype": torch_dtype, "device": tdev, "version": torch.__version__, "threads": torch.get_num_threads(),
            "times_s": times, "median_s": statistics.median(times), "_y": y}


def _print_row(row: dict[str, Any]) -> None:
    line = (f"{row['case']:<28} jsr {1000 * row['median_s']:9.1f} ms  {row['images_per_s']:7.2f} img/s"
            f"  (compile {row['compile_s']:.0f} s)")
    if "torch" in row:
        line += (f" | diffusers {row['torch']['dtype']} {1000 * row['torch']['median_s']:9.1f} ms:"
                 f" jsr {row['speedup_vs_torch']:.2f}x, rel. L2 {row['rel_l2_vs_torch']:.1e}")
    if "rel_l2_vs_float32" in row:
        line += f" | vs f32 {row['rel_l2_vs_float32']:.1e}"
    print(line, flush=True)


if __name__ == "__main__":
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    main()
