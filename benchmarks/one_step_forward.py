"""Time the one-step SR forward at full SD-2.1-base size: jsr (jit, after warm-up) against diffusers PyTorch.

The forward is OSEDiff's: VAE encode of an HxW image, UNet at t=999 on the H/8 latent with a 77-token prompt
embedding, the x0 step, VAE decode. Both sides get the same random weights (diffusers' random init, saved and
loaded through jsr.weights), so the run also checks that they agree.

    python benchmarks/one_step_forward.py                     # 512 px, f32, 3 repeats, both frameworks
    python benchmarks/one_step_forward.py --size 1024 --dtype bfloat16 --torch-dtype float16   # on a GPU
    python benchmarks/one_step_forward.py --preset tiny --repeats 2                           # smoke run

Prints a table and writes JSON (``--out``, default benchmarks/results/one_step_forward-<backend>.json).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from _common import environment, write_result


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="sd21-base", help="model preset from jsr.models.presets")
    p.add_argument("--size", type=int, default=512, help="image side in pixels")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", default="float32", help="jsr compute dtype (float32 or bfloat16)")
    p.add_argument("--torch-dtype", default="float32", help="PyTorch dtype (float32, or float16 on a GPU)")
    p.add_argument("--attention", default="auto", help="jsr attention implementation")
    p.add_argument("--skip-torch", action="store_true", help="time jsr only")
    p.add_argument("--out", default=None, help="JSON output path")
    return p.parse_args()


def _time(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    args = _args()
    import torch
    from diffusers import AutoencoderKL as TorchVAE
    from diffusers import UNet2DConditionModel as TorchUNet

    from jsr.models.presets import preset
    from jsr.sr.schedule import DDPMSchedule, x0_from_output
    from jsr.weights import load_unet, load_vae

    cfg = preset(args.preset)
    strip = lambda d: {k: v for k, v in d.items() if not k.startswith("_")}  # noqa: E731
    torch.manual_seed(0)
    t0 = time.perf_counter()
    t_unet = TorchUNet(**strip(cfg["unet"])).eval()
    t_vae = TorchVAE(**strip(cfg["vae"])).eval()
    with tempfile.TemporaryDirectory() as tmp:
        t_unet.save_pretrained(Path(tmp) / "unet")
        t_vae.save_pretrained(Path(tmp) / "vae")
        dtype = jnp.dtype(args.dtype)
        unet, unet_params = load_unet(Path(tmp) / "unet", dtype=dtype, attention_impl=args.attention)
        vae, vae_params = load_vae(Path(tmp) / "vae", dtype=dtype, attention_impl=args.attention)
    print(f"models built and converted in {time.perf_counter() - t0:.1f} s")
    n_unet = sum(x.size for x in jax.tree.leaves(unet_params))
    n_vae = sum(x.size for x in jax.tree.leaves(vae_params))
    sf = float(cfg["vae"]["scaling_factor"])
    schedule = DDPMSchedule.from_config(cfg["scheduler"])
    width = cfg["unet"]["cross_attention_dim"]

    rng = np.random.default_rng(0)
    x_np = rng.uniform(-1, 1, (args.batch, args.size, args.size, 3)).astype(np.float32)
    c_np = rng.normal(size=(args.batch, 77, width)).astype(np.float32)

    @jax.jit
    def jsr_forward(unet_params, vae_params, x, c):
        mean, _ = vae.apply({"params": vae_params}, x.astype(dtype), method=vae.encode)
        z = mean * sf
        out = unet.apply({"params": unet_params}, z, jnp.full((x.shape[0],), 999.0), c.astype(dtype))
        z0 = x0_from_output(schedule, z, out, 999)
        return jnp.clip(vae.apply({"params": vae_params}, (z0 / sf).astype(dtype), method=vae.decode), -1, 1)

    x, c = jnp.asarray(x_np), jnp.asarray(c_np)
    t0 = time.perf_counter()
    y_jsr = np.asarray(jsr_forward(unet_params, vae_params, x, c).block_until_ready(), np.float32)
    compile_s = time.perf_counter() - t0
    jsr_times = _time(lambda: jsr_forward(unet_params, vae_params, x, c).block_until_ready(), args.repeats)

    result = {
        "benchmark": "one_step_forward", "preset": args.preset, "size": args.size, "batch": args.batch,
        **environment(), "unet_params": int(n_unet), "vae_params": int(n_vae),
        "jsr": {"dtype": args.dtype, "attention": args.attention, "compile_plus_first_s": compile_s,
                "times_s": jsr_times, "median_s": statistics.median(jsr_times)},
    }

    if not args.skip_torch:
        tdev = "cuda" if torch.cuda.is_available() else "cpu"
        tdtype = getattr(torch, args.torch_dtype)
        t_unet.to(tdev, tdtype)
        t_vae.to(tdev, tdtype)
        schedule_abar = float(np.asarray(schedule.alphas_cumprod)[999])
        xt = torch.from_numpy(x_np.transpose(0, 3, 1, 2).copy()).to(tdev, tdtype)
        ct = torch.from_numpy(c_np).to(tdev, tdtype)

        @torch.no_grad()
        def torch_forward():
            z = t_vae.encode(xt).latent_dist.mean * sf
            eps = t_unet(z, 999, ct).sample
            z0 = (z - (1 - schedule_abar) ** 0.5 * eps) / schedule_abar ** 0.5
            y = t_vae.decode(z0 / sf).sample.clamp(-1, 1)
            if tdev == "cuda":
                torch.cuda.synchronize()
            return y

        y_t = torch_forward().float().cpu().numpy().transpose(0, 2, 3, 1)
        torch_times = _time(torch_forward, args.repeats)
        rel = float(np.linalg.norm(y_jsr - y_t) / max(np.linalg.norm(y_t), 1e-12))
        result["torch"] = {"dtype": args.torch_dtype, "device": tdev, "version": torch.__version__,
                           "threads": torch.get_num_threads(), "times_s": torch_times,
                           "median_s": statistics.median(torch_times)}
        result["speedup_vs_torch"] = result["torch"]["median_s"] / result["jsr"]["median_s"]
        result["relative_l2_difference"] = rel

    print(f"\none-step SR forward, {args.preset}, {args.batch}x{args.size}x{args.size}, "
          f"{result['jax_backend']} ({result['jax_device']}), {os.cpu_count()} cores, {result['date']}")
    print(f"{'framework':<22}{'dtype':<10}{'median s':>10}{'runs s':>30}")
    print(f"{'jsr (jit)':<22}{args.dtype:<10}{result['jsr']['median_s']:>10.3f}"
          f"{', '.join(f'{t:.2f}' for t in jsr_times):>30}")
    if "torch" in result:
        tt = result["torch"]
        print(f"{'diffusers (PyTorch)':<22}{tt['dtype']:<10}{tt['median_s']:>10.3f}"
              f"{', '.join(f'{t:.2f}' for t in tt['times_s']):>30}")
        print(f"jsr is {result['speedup_vs_torch']:.2f}x PyTorch's speed "
              f"(outputs differ by relative L2 {result['relative_l2_difference']:.2e})")
    write_result(result, args.out or
                 f"benchmarks/results/one_step_forward-{result['jax_backend']}-{args.preset}-{args.size}.json")


if __name__ == "__main__":
    main()
