"""Per-image noun masks for text-matching training (CODSR stage 2): which pixels of an HQ image each noun of its
caption names.

Layout, beside the HQ image ``photo.png`` (either form; made offline with any grounding/segmentation model, e.g.
Grounded-SAM2 as CODSR does, on the *HQ* image at its full size)::

    photo.png
    photo.nouns.json        {"caption": "dog, sofa, living room",          (optional: the image's prompt)
                             "nouns": [{"word": "dog", "mask": "photo.dog.png"},
                                       {"word": "sofa", "mask": "masks/photo_sofa.png"}]}
    photo.dog.png ...       one greyscale mask per noun, the image's size, white (> 50 %) = the noun's pixels

    photo.png
    photo.nouns/            the folder form: one mask per noun, named by the noun
        dog.png             ("living_room.png" is the noun "living room")
        sofa.png
        caption.txt         (optional: the image's prompt)

Mask paths in the JSON are relative to the JSON's folder. A caption given here replaces the image's prompt from
``data.prompt`` (the nouns must occur in the prompt the model sees: a noun absent from it gets no matching term).
Images without either form are trained without the matching terms (:func:`attach` gives them no nouns). At most
``data.max_nouns`` nouns per image are kept (the first ones; the folder form in sorted order).

In the pipeline (``data.noun_masks=True``): :func:`attach` reads them after the image is decoded; the crop and
flip cut image and masks together (``jsr.data.pipeline``); batches carry ``masks`` [B, S, S, K] uint8 in {0, 1}
and ``nouns`` [B, K] strings ("" = no noun in that slot).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from jsr.data.images import IMAGE_EXTENSIONS, read_image

JSON_SUFFIX = ".nouns.json"
FOLDER_SUFFIX = ".nouns"
CAPTION_FILE = "caption.txt"


class NounMaskError(ValueError):
    """A noun-mask sidecar jsr cannot use (bad JSON, missing or mis-sized mask); the message names the file."""


def find_sidecar(image_path: str | os.PathLike) -> Path | None:
    """The noun-mask JSON or folder of ``image_path`` (``photo.nouns.json`` / ``photo.nouns/``), or None."""
    p = Path(image_path)
    stem = p.with_suffix("")
    for cand in (Path(f"{stem}{JSON_SUFFIX}"), Path(f"{stem}{FOLDER_SUFFIX}")):
        if cand.exists():
            return cand
    return None


def _mask(path: Path, hw: tuple[int, int]) -> np.ndarray:
    if not path.is_file():
        raise NounMaskError(f"{path}: noun mask file not found")
    try:
        m = read_image(path)[..., 0]  # greyscale files come replicated to 3 channels
    except Exception as e:  # noqa: BLE001 - any decoder error names the file
        raise NounMaskError(f"{path}: unreadable noun mask ({type(e).__name__}: {e})") from None
    if m.shape != tuple(hw):
        raise NounMaskError(f"{path}: noun mask is {m.shape[0]}x{m.shape[1]}, its image {hw[0]}x{hw[1]}")
    return (m > 0.5).astype(np.uint8)


def read_noun_masks(image_path: str | os.PathLike, hw: tuple[int, int],
                    max_nouns: int) -> tuple[str | None, list[str], list[np.ndarray]]:
    """``(caption or None, nouns, masks)`` of an image of size ``hw`` (``[]`` without a sidecar); masks [H, W]
    uint8 in {0, 1}. Raises :class:`NounMaskError` naming the file for a damaged sidecar."""
    side = find_sidecar(image_path)
    if side is None:
        return None, [], []
    caption: str | None = None
    entries: list[tuple[str, Path]] = []
    if side.is_dir():
        cap = side / CAPTION_FILE
        if cap.is_file():
            caption = cap.read_text(encoding="utf-8").strip()
        for f in sorted(side.iterdir()):
            if f.suffix.lower() in IMAGE_EXTENSIONS:
                entries.append((f.stem.replace("_", " "), f))
    else:
        try:
            spec = json.loads(side.read_text(encoding="utf-8"))
            if not isinstance(spec, dict) or not isinstance(spec.get("nouns", []), list):
                raise ValueError("want an object with a 'nouns' list")
            caption = spec.get("caption")
            for item in spec.get("nouns", []):
                entries.append((str(item["word"]), side.parent / str(item["mask"])))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise NounMaskError(f"{side}: not a noun-mask file ({type(e).__name__}: {e}); want "
                                '{"caption": ..., "nouns": [{"word": ..., "mask": ...}, ...]}') from None
    entries = [(w.strip(), p) for w, p in entries if w.strip()][:max_nouns]
    return caption, [w for w, _ in entries], [_mask(p, hw) for _, p in entries]


def attach(record: dict, example: dict, max_nouns: int) -> dict:
    """``example`` (a decoded record: ``image`` [H, W, 3], ``prompt``) with ``masks`` [H, W, max_nouns] uint8 and
    ``nouns`` (``max_nouns`` strings, "" for empty slots); the sidecar's caption, if any, becomes the prompt.
    Records without a file path (synthetic, TFDS) get no nouns."""
    hw = example["image"].shape[:2]
    path = record.get("path")
    caption, nouns, masks = read_noun_masks(path, hw, max_nouns) if path else (None, [], [])
    stack = np.zeros(hw + (max_nouns,), np.uint8)
    for i, m in enumerate(masks):
        stack[..., i] = m
    out = dict(example, masks=stack, nouns=list(nouns) + [""] * (max_nouns - len(nouns)))
    if caption is not None:
        out["prompt"] = str(caption)
    return out


def mask_files(roots: Sequence[str | os.PathLike]) -> set[str]:
    """Every mask image of a noun sidecar under ``roots``: the images inside ``*.nouns/`` folders and the files
    the ``*.nouns.json`` files name (resolved paths)."""
    out: set[str] = set()
    for root in roots:
        for side in Path(root).rglob(f"*{JSON_SUFFIX}"):
            try:
                spec = json.loads(side.read_text(encoding="utf-8"))
                out.update(str((side.parent / str(n["mask"])).resolve()) for n in spec.get("nouns", []))
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                continue  # a damaged sidecar is reported when its image is read
    return out


def without_mask_files(source: Any) -> Any:
    """``source`` (a :class:`jsr.data.sources.FolderSource`) without the noun sidecars' mask images, which sit in
    the same folders but are not training images. Raises ValueError when nothing else is left."""
    masks = mask_files(source.roots)
    keep = [p for p in source.paths if not Path(p).parent.name.endswith(FOLDER_SUFFIX)
            and not (masks and str(Path(p).resolve()) in masks)]
    if not keep:
        raise ValueError(f"{', '.join(map(str, source.roots))}: every image there is a noun mask; no training images")
    source.paths = keep
    return source


def split_crop(stacked: np.ndarray, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """The image and the masks of a crop of ``concatenate([image, masks], -1)`` (cut together so that they stay
    aligned): ``(stacked[..., :channels], stacked[..., channels:] as uint8)``."""
    return np.ascontiguousarray(stacked[..., :channels]), np.ascontiguousarray(stacked[..., channels:]).astype(np.uint8)


def collate(examples: Sequence[dict]) -> dict[str, Any]:
    """The batch entries of the noun masks: ``masks`` [B, S, S, K] uint8 and ``nouns`` [B, K] strings, or ``{}``
    when the examples carry none."""
    if not examples or "masks" not in examples[0]:
        return {}
    return {"masks": np.stack([e["masks"] for e in examples]),
            "nouns": np.asarray([e["nouns"] for e in examples], dtype=np.str_)}
