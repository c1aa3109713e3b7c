"""``python -m jsr.weights``: convert whole SD folders between diffusers and jsr's native format, inspect them.

    python -m jsr.weights to-jsr stable-diffusion-2-1-base sd21-jsr [--dtype bfloat16]
    python -m jsr.weights to-diffusers sd21-jsr sd21-roundtrip
    python -m jsr.weights info stable-diffusion-2-1-base
    python -m jsr.weights write-tiny tiny-sd          # the embedded tiny random model, diffusers layout
    python -m jsr.weights export-lora osediff.pkl osediff-peft     # any LoRA file -> peft/diffusers folders
    python -m jsr.weights merge stable-diffusion-2-1-base osediff.pkl sd21-osediff [--weight unet_sem=0.5]

The native format keeps each component's ``config.json`` and stores the Flax parameters as an Orbax checkpoint
(``params/``), which restores straight onto a device mesh. ``tokenizer/``, ``scheduler/`` and ``model_index.json``
are copied as they are.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

from jsr.models.lora import LoRAMismatchError
from jsr.weights import native
from jsr.weights.convert import CheckpointMismatchError
from jsr.weights.io import CorruptFileError
from jsr.weights.peft import PeftFormatError

COMPONENTS = {
    "unet": ("jsr.weights.unet", "load_unet", "save_unet"),
    "vae": ("jsr.weights.vae", "load_vae", "save_vae"),
    "text_encoder": ("jsr.weights.clip_text", "load_text_encoder", "save_text_encoder"),
}
COPIED = ("tokenizer", "scheduler", "model_index.json", "feature_extractor")
# Errors that mean "this input file or folder is wrong", reported as one `error: ...` line with exit code 2.
_INPUT_ERRORS = (CorruptFileError, CheckpointMismatchError, PeftFormatError, LoRAMismatchError, FileNotFoundError)


def _functions(component: str):
    import importlib

    mod, load, save = COMPONENTS[component]
    m = importlib.import_module(mod)
    return getattr(m, load), getattr(m, save)


def _components(src: Path) -> list[str]:
    found = [c for c in COMPONENTS if (src / c / "config.json").is_file()]
    if not found:
        raise SystemExit(f"{src}: no unet/, vae/ or text_encoder/ with a config.json: not an SD model folder")
    return found


def _copy_rest(src: Path, dst: Path) -> None:
    for name in COPIED:
        if (src / name).is_dir():
            shutil.copytree(src / name, dst / name, dirs_exist_ok=True)
        elif (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def _count(params) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(params))


def to_jsr(src: Path, dst: Path, dtype) -> None:
    """diffusers/transformers folder -> jsr native folder."""
    if dst.exists() and any(dst.iterdir()):
        raise SystemExit(f"{dst}: exists and is not empty; choose a new folder")
    for comp in _components(src):
        load, _ = _functions(comp)
        module, params = load(src / comp, dtype=dtype)
        native.write_native(dst / comp, params, module.config.to_diffusers() if hasattr(module.config, "to_diffusers")
                            else module.config.to_transformers())
        print(f"{comp}: {_count(params) / 1e6:.1f}M parameters -> {dst / comp}")
    _copy_rest(src, dst)


def to_diffusers(src: Path, dst: Path, dtype) -> None:
    """jsr native (or diffusers) folder -> diffusers/transformers folder loadable by ``from_pretrained``."""
    if dst.exists() and any(dst.iterdir()):
        raise SystemExit(f"{dst}: exists and is not empty; choose a new folder")
    for comp in _components(src):
        load, save = _functions(comp)
        module, params = load(src / comp)
        save(module, params, dst / comp, dtype=dtype)
        print(f"{comp}: {_count(params) / 1e6:.1f}M parameters -> {dst / comp}")
    _copy_rest(src, dst)


def info(src: Path) -> None:
    """Print each component's format, parameter count and dtypes."""
    for comp in _components(src):
        load, _ = _functions(comp)
        module, params = load(src / comp)
        dtypes = sorted({str(x.dtype) for x in jax.tree.leaves(params)})
        fmt = "jsr-native" if native.is_native(src / comp) else "diffusers/transformers"
        print(f"{comp:<13} {fmt:<23} {_count(params):>13,d} parameters  {', '.join(dtypes)}")


def export_lora(src: Path, dst: Path, prefix: str | None) -> None:
    """Any LoRA file ``jsr.weights.load_peft_lora`` reads (OSEDiff/PiSA-SR release, peft/diffusers file or folder)
    -> one peft/diffusers folder per LoRA, ``dst/<name>/`` (``adapter_model.safetensors``, ``adapter_config.json``,
    ``base_overrides.safetensors`` for fully trained tensors)."""
    from jsr.weights import io
    from jsr.weights.peft import OVERRIDES_WEIGHTS, load_peft_lora, overrides_state_dict, save_peft_lora

    for name, lora in load_peft_lora(src).items():
        if not lora.paths():  # fully trained tensors only (kept apart when a file has several LoRAs)
            io.write_safetensors(dst / name / OVERRIDES_WEIGHTS, overrides_state_dict(lora), metadata={"format": "pt"})
            print(f"{name}: fully trained tensors only -> {dst / name / OVERRIDES_WEIGHTS}")
            continue
        file = save_peft_lora(lora, dst / name, prefix=prefix)
        print(f"{name}: {len(lora.paths())} LoRA layers, rank {lora.rank}, alpha {lora.alpha:g} -> {file}")


def _parse_weights(items: list[str]) -> dict[str, float]:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--weight {item!r}: expected NAME=VALUE, e.g. unet_sem=0.5")
        out[name] = float(value)
    return out


def merge(src: Path, loras: list[Path], dst: Path, dtype, weights: dict[str, float]) -> None:
    """SD folder + LoRA files -> diffusers SD folder with every LoRA folded into its model's weights.

    A LoRA named ``unet*``/``vae*`` goes to that component; one named otherwise (a plain peft file) to whichever
    component it fits. Several LoRAs on one component are stacked exactly with their ``--weight`` (default 1).
    """
    from jsr.models import lora as lora_lib
    from jsr.weights.peft import load_peft_lora

    if dst.exists() and any(dst.iterdir()):
        raise SystemExit(f"{dst}: exists and is not empty; choose a new folder")
    loaded = {comp: _functions(comp)[0](src / comp) for comp in _components(src)}
    per_comp: dict[str, list] = {}
    used = set()
    for path in loras:
        for name, lora in load_peft_lora(path).items():
            comp = next((c for c in loaded if name == c or name.startswith(c + "_")), None)
            for c in ("unet", "vae") if comp is None else ():
                if c not in loaded:
                    continue
                try:
                    lora_lib.check(lora, loaded[c][1])
                except lora_lib.LoRAMismatchError:
                    continue
                comp = c
                break
            if comp is None:
                raise SystemExit(f"{path}: LoRA {name!r} fits no component of {src}")
            per_comp.setdefault(comp, []).append((lora, weights.get(name, 1.0)))
            used.add(name)
            print(f"{path}: {name} -> {comp} (weight {weights.get(name, 1.0):g})")
    unknown = sorted(set(weights) - used)
    if unknown:
        raise SystemExit(f"--weight names {unknown} match no LoRA (loaded: {sorted(used)})")
    for comp, (module, params) in loaded.items():
        if comp in per_comp:
            lora = lora_lib.stack(per_comp[comp], params)
            params = lora_lib.merge(params, lora)
        _functions(comp)[1](module, params, dst / comp, dtype=dtype)
        print(f"{comp}: {_count(params) / 1e6:.1f}M parameters -> {dst / comp}")
    _copy_rest(src, dst)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jsr.weights", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_ in (("to-jsr", "diffusers SD folder -> jsr native folder"),
                        ("to-diffusers", "jsr native folder -> diffusers SD folder")):
        s = sub.add_parser(name, help=help_)
        s.add_argument("src", type=Path)
        s.add_argument("dst", type=Path)
        s.add_argument("--dtype", default=None, help="cast parameters (float32, bfloat16, float16)")
    s = sub.add_parser("info", help="parameter counts and formats of an SD folder")
    s.add_argument("src", type=Path)
    s = sub.add_parser("write-tiny", help="write the embedded tiny random SD model (diffusers layout)")
    s.add_argument("dst", type=Path)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--preset", default="tiny", help="architecture (jsr.models.presets): tiny, sd21-base (random "
                   "weights at full size, for benchmarks)")
    s = sub.add_parser("export-lora", help="LoRA file (OSEDiff/PiSA-SR release, peft) -> peft/diffusers folders")
    s.add_argument("src", type=Path)
    s.add_argument("dst", type=Path)
    s.add_argument("--prefix", default=None, help="key prefix, e.g. unet for pipeline.load_lora_weights")
    s = sub.add_parser("merge", help="fold LoRA files into an SD folder's weights -> diffusers SD folder")
    s.add_argument("src", type=Path)
    s.add_argument("loras", type=Path, nargs="+")
    s.add_argument("dst", type=Path)
    s.add_argument("--weight", action="append", default=[], help="NAME=W: weight of one LoRA (default 1)")
    s.add_argument("--dtype", default=None, help="cast parameters (float32, bfloat16, float16)")
    args = p.parse_args(argv)
    dtype = jnp.dtype(args.dtype) if getattr(args, "dtype", None) else None
    try:
        _run(args, dtype)
    except _INPUT_ERRORS as e:
        # A damaged or mismatched input file: one line naming it, no traceback, argparse's exit code for bad input.
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    return 0


def _run(args: argparse.Namespace, dtype) -> None:
    """Dispatch one parsed command."""
    if args.command == "to-jsr":
        to_jsr(args.src, args.dst, dtype)
    elif args.command == "to-diffusers":
        to_diffusers(args.src, args.dst, dtype)
    elif args.command == "info":
        info(args.src)
    elif args.command == "export-lora":
        export_lora(args.src, args.dst, args.prefix)
    elif args.command == "merge":
        merge(args.src, args.loras, args.dst, dtype, _parse_weights(args.weight))
    elif args.command == "write-tiny":
        from jsr.weights.tiny import write_tiny_sd

        print(write_tiny_sd(args.dst, seed=args.seed, preset_name=args.preset))


if __name__ == "__main__":
    sys.exit(main())
