"""Benchmark a one-step SR model and write the CTSR paper's tables: ``python evaluate.py --dataset=... --out=DIR``.

    python evaluate.py --model=/models/sd21-base --lora=/ckpt/ctsr2/export --t=0,0.2,0.4,0.6,0.8,1 \\
      --dataset=RealSR:lq=/data/RealSR/test_LR,hq=/data/RealSR/test_HR \\
      --lpips=/w/vgg16-397923af.pth,/w/lpips_vgg.pth --dists=/w/vgg16-397923af.pth,/w/DISTS_weights.pt \\
      --fid_inception=/w/pt_inception-2015-12-05-6726825d.pth --niqe=/w/niqe_pris_params.npz --out=results/ctsr

Datasets are paired LQ/HQ folders (matched by file stem) or HQ folders degraded on the fly with a fixed seed
(``--dataset=DIV2K-Val:hq=DIR,crop=512,seed=0``). Without ``--model`` the embedded tiny random SD model runs (a
smoke test). Metric weights not given are looked for where PyTorch packages keep them (``python -m jsr.metrics
files`` lists them; one line per metric is printed first). Writes ``results.md``/``.csv``/``.json``,
``fidelity_realism.png`` (or, with no realism metric, ``fidelity_t.png``: PSNR and SSIM against the swept knob),
``samples_<dataset>.png`` and the SR images into ``--out``; see :mod:`jsr.eval` for the protocol.

Every knob of every registered method (:mod:`jsr.methods`) is a flag ``--<knob>`` (the same names as
``python -m jsr.infer``); a comma-separated list sweeps it (one knob at a time), and a method whose knob declares a
default sweep (CTSR's ``t``) is swept over it when the knob is not given.
"""

import sys
from pathlib import Path

from absl import app, flags

import jsr.methods

_MODEL = flags.DEFINE_string("model", "", "Base SD folder (diffusers layout); '' or 'tiny' = the embedded tiny "
                             "random model (smoke test).")
_LORA = flags.DEFINE_multi_string("lora", [], "Model files, [ROLE=]PATH (repeatable): a jsr export (its manifest "
                                  "names the method), a release file (.pkl), or a peft LoRA; e.g. "
                                  "control=ctsr2/export/control.")
_METHOD = flags.DEFINE_enum("method", "auto", ["auto", *jsr.methods.names()], "Method (auto: from the files).")
_LABEL = flags.DEFINE_string("label", None, "Model name in the tables (default: the method's, e.g. CTSR).")
_NO_MODEL = flags.DEFINE_bool("no_model", False, "Measure only the --compare folders.")
_PROMPT = flags.DEFINE_string("prompt", "", "Text prompt of the UNet.")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Compute dtype (default bf16 on GPU/TPU, "
                           "f32 on CPU).")
_ATTENTION = flags.DEFINE_string("attention", "auto", "Attention implementation (jsr.models.attention).")
_DEVICES = flags.DEFINE_string("devices", "auto", "Local devices to restore on, data parallel (same-size images, "
                               "or each call's tiles, split over them; the parameters replicated): auto = all of them "
                               "on GPU/TPU, 1 on CPU; all; or a count.")
_KNOBS = {k.name: flags.DEFINE_list(k.name, None, k.describe() + "; a comma list sweeps it.")
          for k in jsr.methods.all_knobs().values()}
_COLOR_FIX = flags.DEFINE_enum("color_fix", "adain", ["adain", "wavelet", "none"], "Colour fix.")
_LATENT_TILE = flags.DEFINE_integer("latent_tile", 96, "UNet tile in latent pixels.")
_LATENT_OVERLAP = flags.DEFINE_integer("latent_overlap", 32, "UNet tile overlap in latent pixels.")
_VAE_TILE = flags.DEFINE_integer("vae_tile", 1024, "VAE tile in output pixels (0: never tile).")
_VAE_OVERLAP = flags.DEFINE_integer("vae_overlap", 176,  # RestoreOptions' default
                                    "VAE tile overlap in output pixels (half of it is each tile's context).")
_UPSCALE = flags.DEFINE_integer("upscale", 4, "Output size / LQ size.")
_MAX_MEMORY = flags.DEFINE_string("max_memory", "0", "Host memory to plan each image size against (e.g. 8G; 0: no "
                                  "budget), as python -m jsr.infer --max_memory.")
_SPILL_DIR = flags.DEFINE_string("spill_dir", "", "Where --max_memory spills tile carries (default: the temp folder).")
_MAX_DEVICE_MEMORY = flags.DEFINE_string("max_device_memory", "0", "Device memory one call may use (e.g. 6G; 0: the "
                                         "GPU/TPU's free memory, none on CPU): smaller tiles when a call would "
                                         "not fit, as python -m jsr.infer --max_device_memory.")

_DATASET = flags.DEFINE_multi_string("dataset", [], "Test set (repeatable): NAME:hq=DIR[,lq=DIR][,strip=REGEX]"
                                     "[,seed=N][,crop=N][,degradation=PRESET]. With lq: paired folders; without: "
                                     "HQ images degraded on the fly (Real-ESRGAN, fixed seed). Or a prepared TFDS "
                                     "set: tfds:realsr|drealsr|div2k_val[,data_dir=DIR] (python -m "
                                     "jsr.data.testsets).")
_TFDS_DATA_DIR = flags.DEFINE_string("tfds_data_dir", "", "TFDS data folder of the tfds: datasets without data_dir= "
                                     "(default: TFDS's, ~/tensorflow_datasets).")
_COMPARE = flags.DEFINE_multi_string("compare", [], "Another method's SR images (repeatable): LABEL=DIR, "
                                     "{dataset} in DIR replaced by each dataset name.")
_MAX_IMAGES = flags.DEFINE_integer("max_images", 0, "Use the first N images of each dataset (0: all).")

_FOUND = " Default: the files found where PyTorch packages keep them (python -m jsr.metrics files); none: skip."
_LPIPS = flags.DEFINE_list("lpips", [], "LPIPS-VGG weight files (vgg16-397923af.pth,lpips vgg.pth)." + _FOUND)
_DISTS = flags.DEFINE_list("dists", [], "DISTS weight files (vgg16-397923af.pth,DISTS weights.pt)." + _FOUND)
_INCEPTION = flags.DEFINE_string("fid_inception", "", "pytorch-fid's pt_inception-2015-12-05-6726825d.pth (FID)."
                                 + _FOUND)
_NIQE = flags.DEFINE_string("niqe", "", "NIQE pristine parameters (niqe_pris_params.npz or modelparameters.mat)."
                            + _FOUND)
_PYIQA = flags.DEFINE_list("pyiqa", ["auto"], "MUSIQ/MANIQA/CLIPIQA via pyiqa: auto (those available), none, "
                           "or names.")
_PYIQA_DEVICE = flags.DEFINE_string("pyiqa_device", "cpu", "Torch device for pyiqa.")
_CROP_BORDER = flags.DEFINE_integer("crop_border", 0, "Pixels dropped from each edge for PSNR/SSIM.")
_FID_BATCH = flags.DEFINE_integer("fid_batch", 50, "Images per Inception call.")
_FID_DIMS = flags.DEFINE_enum("fid_dims", "2048", ["64", "192", "768", "2048"], "Inception features for FID "
                              "(2048: the standard FID; fewer as pytorch-fid's --dims).")

_OUT = flags.DEFINE_string("out", None, "Output folder (tables, plot, samples, SR images).")
_SAVE_IMAGES = flags.DEFINE_bool("save_images", True, "Write every SR image (and degraded LQ/HQ).")
_SAMPLES = flags.DEFINE_integer("num_samples", 4, "Images per sample grid (0: none).")
_SAMPLE_CROP = flags.DEFINE_integer("sample_crop", 256, "Sample crop side in output pixels.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Progress bars.")
flags.mark_flags_as_required(["out"])



def _knob_flags():
    """``(fixed knobs, (swept knob, values) or None)`` from the knob flags."""
    known = jsr.methods.all_knobs()
    fixed, swept = {}, []
    for name, flag in _KNOBS.items():
        if flag.value is None:
            continue
        if not flag.value:
            raise ValueError(f"--{name}: no values given")
        values = [known[name].parse(v) for v in flag.value]
        if len(values) == 1:
            fixed[name] = values[0]
        else:
            swept.append((name, values))
    if len(swept) > 1:
        raise ValueError(f"sweep one knob at a time, got {', '.join('--' + n for n, _ in swept)}")
    return fixed, (swept[0] if swept else None)


def _size_flag(flag) -> int:
    """A size flag's bytes (``8G``, ``512M``...); a bad value is a ValueError naming the flag."""
    from jsr.infer import parse_bytes

    try:
        return parse_bytes(flag.value)
    except Exception as e:  # noqa: BLE001 - argparse's error type: reported as a bad flag value
        raise ValueError(f"--{flag.name}: {e}") from None


def _setup():
    """Datasets, metrics and model from the flags; the inputs are checked before the (slow) model load."""
    import jsr.eval as ev
    from jsr.eval.datasets import open_dataset
    from jsr.methods.restorer import check_options, load_restorer
    from jsr.sr.data_parallel import describe as describe_devices
    from jsr.sr.data_parallel import select_devices
    from jsr.sr.infer import RestoreOptions

    specs = [ev.parse_dataset(s) for s in _DATASET.value]
    compare = [ev.parse_compare(s) for s in _COMPARE.value]
    datasets = [open_dataset(s, scale=_UPSCALE.value, max_images=_MAX_IMAGES.value,
                             tfds_data_dir=_TFDS_DATA_DIR.value or None) for s in specs]
    ev.check_inputs(datasets, compare, _UPSCALE.value)
    fixed, sweep = _knob_flags()
    options = RestoreOptions(knobs=fixed, color_fix=_COLOR_FIX.value, latent_tile=_LATENT_TILE.value,
                             latent_overlap=_LATENT_OVERLAP.value, vae_tile=_VAE_TILE.value,
                             vae_overlap=_VAE_OVERLAP.value, max_memory=_size_flag(_MAX_MEMORY), spill_dir=_SPILL_DIR.value,
                             max_device_memory=_size_flag(_MAX_DEVICE_MEMORY))
    suite = ev.load_metrics(lpips=_LPIPS.value, dists=_DISTS.value, inception=_INCEPTION.value, niqe=_NIQE.value,
                            pyiqa=_PYIQA.value, crop_border=_CROP_BORDER.value, fid_batch=_FID_BATCH.value,
                            fid_dims=int(_FID_DIMS.value), pyiqa_device=_PYIQA_DEVICE.value)
    print("metric weights (python -m jsr.metrics files: where each is looked for):", file=sys.stderr)
    print("\n".join(ev.weights_summary(suite)), file=sys.stderr, flush=True)
    restorer = None
    if not _NO_MODEL.value:
        devices = select_devices(_DEVICES.value)
        print(describe_devices(devices), file=sys.stderr, flush=True)
        restorer = load_restorer(_MODEL.value, _LORA.value, method=_METHOD.value, dtype=_DTYPE.value,
                                 prompt=_PROMPT.value, attention_impl=_ATTENTION.value, devices=devices)
        from jsr.sr.speed import speed_log

        restorer.speed = speed_log()  # time estimates in the plan line of large images, from earlier runs
        restorer.plan_temporaries = True  # large images' plans count XLA's working memory
        if sweep is None:  # a knob with a default sweep (CTSR's t) that the model honours and nobody set
            method = jsr.methods.get(restorer.method)
            for k in method.knobs:
                if k.sweep and k.name in restorer.knobs and k.name not in fixed:
                    sweep = (k.name, list(k.sweep))
                    break
        # A knob out of range, a sweep on a model without it, or a knob it ignores: refused here, where main
        # reports it as an error (raised in ev.evaluate it would be a traceback).
        runs = [options] if sweep is None else [options.with_knobs(**{sweep[0]: v}) for v in sweep[1]]
        for opts in runs:
            check_options(restorer, opts)
    elif not compare:
        raise ValueError("--no_model needs --compare folders to measure")
    return datasets, compare, suite, restorer, sweep, options


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not _DATASET.value:
        raise app.UsageError("give at least one --dataset=NAME:hq=DIR[,lq=DIR]")
    import jsr.eval as ev

    try:
        datasets, compare, suite, restorer, sweep, options = _setup()
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    meta = {name: flags.FLAGS[name].value for name in (
        "model", "lora", "method", "prompt", "dtype", "dataset", "compare", "max_images", "lpips", "dists",
        "fid_inception", "niqe", "pyiqa", "crop_border", "fid_dims", "upscale", "devices")}
    meta["knobs"] = {name: flag.value for name, flag in _KNOBS.items() if flag.value is not None}
    report = ev.evaluate(datasets, _OUT.value, restorer=restorer, suite=suite,
                         t_values=None if sweep is None else sweep[1], sweep_knob="t" if sweep is None else sweep[0],
                         options=options,
                         label=_LABEL.value, compare=compare, upscale=_UPSCALE.value, save_images=_SAVE_IMAGES.value,
                         num_samples=_SAMPLES.value, sample_crop=_SAMPLE_CROP.value, progress=_PROGRESS.value,
                         meta=meta)
    files = ev.write_outputs(report, _OUT.value)
    written = ev.load_report(files["json"])
    print(ev.markdown_tables(written))
    if written.get("plot_missing"):
        plotted = " and ".join(ev.COLUMN[k].title for k in written.get("plot_t_metrics", []))
        instead = (f"; drew {Path(written['plot_t']).name} ({plotted} against {written['model'].get('sweep') or 't'})"
                   " instead" if written.get("plot_t") else "")
        print(f"plot: fidelity_realism.png not drawn: {written['plot_missing']}{instead}")
    for kind, path in files.items():
        print(f"{kind}: {path}")
    for name, path in report["samples"].items():
        print(f"samples ({name}): {path}")
    return 0


if __name__ == "__main__":
    from jsr.cli import run

    run(main)
