"""CODSR's building blocks against independent references: the LQ-guided SFT (a PyTorch twin written here), its
zero initialisation through the UNet hook, the region-adaptive weight map and ``z_hat`` (NumPy references on
hand-made images), the vision-aided discriminator's heads and GAN losses, and the text-matching losses (token/area
and pixel BCE, against a NumPy transcription of the release's ``get_grounding_loss_by_list`` on hand-made maps).

Everything runs eagerly on tiny shapes (no compiled UNet graph), so the file costs seconds.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jsr.models import sft as S
from tests.helpers import randomise_torch, rel_error


# ---------------------------------------------------------------------------------------------------------------
# LQ-guided SFT


def _torch_sft(in_channels: int, channels: int):
    """The release's ``SFTLayer`` (two heads, conv 3x3 -> SiLU -> zero-initialised conv 3x3), written in torch."""
    import torch.nn as tnn

    class SFTLayer(tnn.Module):
        def __init__(self):
            super().__init__()
            for head in ("scale", "shift"):
                setattr(self, f"SFT_{head}_conv0", tnn.Conv2d(in_channels, channels, 3, padding=1))
                conv1 = tnn.Conv2d(channels, channels, 3, padding=1)
                tnn.init.zeros_(conv1.weight)
                tnn.init.zeros_(conv1.bias)
                setattr(self, f"SFT_{head}_conv1", conv1)

        def forward(self, cond):
            act = tnn.SiLU()
            return (self.SFT_scale_conv1(act(self.SFT_scale_conv0(cond))),
                    self.SFT_shift_conv1(act(self.SFT_shift_conv0(cond))))

    return SFTLayer()


def test_pixel_unshuffle_is_torchs():
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(0).normal(size=(2, 3, 16, 24)).astype(np.float32)
    want = torch.nn.PixelUnshuffle(8)(torch.from_numpy(x)).numpy().transpose(0, 2, 3, 1)
    got = S.pixel_unshuffle(jnp.asarray(x.transpose(0, 2, 3, 1)), 8)
    np.testing.assert_array_equal(np.asarray(got), want)
    with pytest.raises(ValueError, match="not a multiple of 8"):
        S.pixel_unshuffle(jnp.zeros((1, 12, 16, 3)), 8)


def test_sft_matches_a_torch_twin_both_ways():
    torch = pytest.importorskip("torch")
    twin = randomise_torch(_torch_sft(192, 24), seed=3).eval()  # its zero-initialised convs too
    params = S.sft_from_torch(twin.state_dict())
    assert S.sft_config_of(params) == S.SFTConfig(channels=24)
    x = np.random.default_rng(1).uniform(-1, 1, (2, 32, 40, 3)).astype(np.float32)
    with torch.no_grad():
        cond = torch.nn.PixelUnshuffle(8)(torch.from_numpy(x.transpose(0, 3, 1, 2)))
        want = [t.numpy().transpose(0, 2, 3, 1) for t in twin(cond)]
    got = S.sft_apply(params, jnp.asarray(x))
    for g, w in zip(got, want):
        assert g.shape == (2, 4, 5, 24) and rel_error(g, w) < 1e-5, rel_error(g, w)
    # Divided by k (the timestep's eps -> x0 coefficient), per sample.
    k = jnp.asarray([0.5, 2.0])
    scale, shift = S.sft_modulation(params, jnp.asarray(x), k)
    np.testing.assert_allclose(np.asarray(scale), want[0] / np.array([0.5, 2.0])[:, None, None, None], rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(np.asarray(shift), want[1] / np.array([0.5, 2.0])[:, None, None, None], rtol=1e-5,
                               atol=1e-6)
    # Back to the release's names and layouts: the twin loads it strictly.
    state = S.sft_to_torch(params)
    assert sorted(state) == sorted(twin.state_dict())
    twin.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)


def test_fresh_sft_is_zero_and_leaves_the_unet_unchanged():
    """A fresh SFT's modulation is exactly zero, and the UNet hook turns a zero modulation into ``conv_in``'s own
    output bit for bit, so the UNet's output is unchanged (the whole UNet with zero modulation against the plain
    one, and the hook against diffusers: ``tests/test_unet_hooks.py``)."""
    from jsr.models.presets import TINY_UNET
    from jsr.models.unet import _modulate

    cfg = S.SFTConfig(channels=TINY_UNET["block_out_channels"][0])
    params = S.init_sft_params(jax.random.key(0), cfg)
    for head in S.HEADS:
        assert all(not np.asarray(v).any() for v in jax.tree.leaves(params[f"SFT_{head}_conv1"]))
        assert np.asarray(params[f"SFT_{head}_conv0"]["kernel"]).std() > 0  # only the second convs are zero
    x = jnp.asarray(np.random.default_rng(2).uniform(-1, 1, (2, 64, 48, 3)), jnp.float32)
    scale, shift = S.sft_modulation(params, x, jnp.asarray([0.7, 0.2]))
    assert scale.shape == shift.shape == (2, 8, 6, 32)
    assert not np.asarray(scale).any() and not np.asarray(shift).any()
    h = jnp.asarray(np.random.default_rng(3).normal(size=(2, 8, 6, 32)), jnp.float32)
    np.testing.assert_array_equal(np.asarray(_modulate(h, (scale, shift))), np.asarray(h))
    moved = S.sft_modulation(jax.tree.map(lambda a: a + 0.05, params), x, 0.7)
    assert np.abs(np.asarray(_modulate(h, moved) - h)).max() > 1e-3  # a trained SFT moves it


# ---------------------------------------------------------------------------------------------------------------
# Region-adaptive activation


def _np_weight_map(x_pm1: np.ndarray, latent_hw) -> np.ndarray:
    """NumPy transcription of the release's inference path, loops and all: luma of ``x * 0.5 + 0.5``, Sobel L1 with
    replicate padding, 16 x 16 patch means after replicate-padding bottom/right, the piecewise weight, each patch
    repeated to 2 x 2 latents, cropped. [B, H, W, 3] in [-1, 1] -> [B, h, w]."""
    x = x_pm1.astype(np.float64) * 0.5 + 0.5
    g = 0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2]
    kx = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], np.float64)
    ky = np.array([[-1, -2, -1], [0, 0, 0], [1, 2, 1]], np.float64)
    b, h, w = g.shape
    out = []
    for n in range(b):
        p = np.pad(g[n], 1, mode="edge")
        grad = np.zeros((h, w))
        for y in range(h):
            for x_ in range(w):
                win = p[y:y + 3, x_:x_ + 3]
                grad[y, x_] = abs((win * kx).sum()) + abs((win * ky).sum())
        grad = np.pad(grad, ((0, -h % 16), (0, -w % 16)), mode="edge")
        ph, pw = grad.shape[0] // 16, grad.shape[1] // 16
        wmap = np.zeros((ph, pw))
        for i in range(ph):
            for j in range(pw):
                m = grad[16 * i:16 * i + 16, 16 * j:16 * j + 16].mean()
                wmap[i, j] = 0.3 if m <= 0.15 else (7.0 * (m - 0.15) + 0.3 if m <= 0.25 else 1.0)
        out.append(np.kron(wmap, np.ones((2, 2)))[:latent_hw[0], :latent_hw[1]])
    return np.stack(out)


def _hand_made(h=40, w=56):
    """Three grey images [3, h, w, 3] in [-1, 1]: flat; a horizontal ramp of slope 0.025 / px (interior Sobel
    L1 = 8 x 0.025 = 0.2, the middle regime) with a vertical step edge; flat left half + strong texture right."""
    flat = np.full((h, w), 0.4)
    ramp = np.tile(np.arange(w) * 0.025, (h, 1)) % 1.0
    ramp[:, 44:] += 0.5 * (np.arange(h) >= 20)[:, None]
    rng = np.random.default_rng(0)
    mixed = np.where(np.arange(w)[None, :] < w // 2, 0.5, rng.uniform(0, 1, (h, w)))
    imgs = np.stack([flat, np.clip(ramp, 0, 1), mixed])
    return np.repeat(imgs[..., None], 3, axis=-1) * 2 - 1


def test_region_weight_against_numpy_on_hand_made_images():
    from jsr.sr import region_prior as R

    x = _hand_made()
    got = np.asarray(R.region_weight(jnp.asarray(x, jnp.float32), (5, 7)))
    want = _np_weight_map(x, (5, 7))
    assert got.shape == (3, 5, 7, 1)
    np.testing.assert_allclose(got[..., 0], want, atol=2e-5)
    assert np.all(got[0] == np.float32(0.3))  # flat: the floor everywhere
    assert np.all(got[2, :, :2] == np.float32(0.3)) and np.all(got[2, :, -2:] == 1.0)  # mixed: both ends
    # The ramp's first interior patch (rows/cols 16..31, no padding or wrap inside): m = 0.2 -> 0.3 + 7 x 0.05.
    np.testing.assert_allclose(got[1, 2, 2, 0], 0.65, atol=1e-5)
    # The ramp image (its edge, its wrap-around jump, its borders) has all three regimes.
    assert np.any(got[1] == np.float32(0.3)) and np.any(got[1] == 1.0) and np.any((got[1] > 0.3) & (got[1] < 1))
    # Whole multiples of 16 need no padding: the same function, exact patch grid.
    x16 = x[:, :32, :48]
    np.testing.assert_allclose(np.asarray(R.region_weight(jnp.asarray(x16, jnp.float32), (4, 6)))[..., 0],
                               _np_weight_map(x16, (4, 6)), atol=2e-5)
    with pytest.raises(ValueError, match="fewer than"):
        R.region_weight(jnp.asarray(x16, jnp.float32), (5, 6))


def test_z_hat_and_activation_against_a_reference():
    from jsr.sr import region_prior as R
    from jsr.sr.schedule import DDPMSchedule
    from jsr.models.presets import SD21_BASE_SCHEDULER

    s = DDPMSchedule.from_config(SD21_BASE_SCHEDULER)
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2  # scaled_linear, in float64
    abar = np.cumprod(1 - betas)
    rng = np.random.default_rng(5)
    z_l, n, eps_hat = (rng.normal(size=(2, 3, 4, 4)) for _ in range(3))
    w = rng.uniform(0.3, 1.0, (2, 3, 4, 1))
    t = np.array([50, 250])
    z_t, eps_a = R.activate(s, jnp.asarray(z_l), jnp.asarray(n), jnp.asarray(w), jnp.asarray(t))
    a = abar[t][:, None, None, None]
    np.testing.assert_allclose(np.asarray(eps_a), w * n, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(z_t), np.sqrt(a) * z_l + np.sqrt(1 - a) * w * n, rtol=1e-5, atol=1e-6)
    k = R.timestep_coeff(s, jnp.asarray(t))
    np.testing.assert_allclose(np.asarray(k), np.sqrt(1 - abar[t]) / np.sqrt(abar[t]), rtol=1e-5)
    z_hat = R.denoise(jnp.asarray(z_l), eps_a, jnp.asarray(eps_hat), k)
    np.testing.assert_allclose(np.asarray(z_hat), z_l + np.sqrt(1 - a) / np.sqrt(a) * (w * n - eps_hat), rtol=1e-5,
                               atol=1e-5)
    # ... which is the x0 read-out of z_t.
    x0 = (np.asarray(z_t, np.float64) - np.sqrt(1 - a) * eps_hat) / np.sqrt(a)
    np.testing.assert_allclose(np.asarray(z_hat), x0, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Text matching


def _torch_grounding(probs, positions, masks, size):
    """The release's path for one image, in torch: per noun, ``probs[:, pos].mean(-1)`` reshaped to the grid,
    ``F.interpolate`` bilinear (align_corners=False) to ``size``, then ``get_grounding_loss_by_list``:
    token (1 - sum(A M) / sum(A))^2 and ``nn.BCELoss`` per mask with sum > 0.1, both averaged over those masks."""
    import torch
    import torch.nn.functional as F

    q = probs.shape[0]
    h = int(round(q ** 0.5))
    token = pixel = 0.0
    n = 0
    for pos, m in zip(positions, masks):
        if not pos or m.sum() <= 0.1:
            continue
        heat = torch.from_numpy(probs[:, pos].mean(-1).astype(np.float32)).reshape(1, 1, h, q // h)
        a = F.interpolate(heat, size=size, mode="bilinear", align_corners=False)[0]
        mt = torch.from_numpy(m.astype(np.float32))[None]
        act = (a * mt).reshape(1, -1).sum(-1) / a.reshape(1, -1).sum(-1)
        token += float((1.0 - act.mean()) ** 2)
        pixel += float(torch.nn.BCELoss()(a, mt))
        n += 1
    return token / max(n, 1), pixel / max(n, 1), n


def test_matching_losses_against_the_release_path_on_hand_made_maps():
    pytest.importorskip("torch")
    from jsr.sr import text_matching as tm

    rng = np.random.default_rng(0)
    b, q, length, k, t, size = 2, 16, 7, 3, 2, (12, 12)
    logits = rng.normal(size=(b, q, length))
    logits[0, :8, 2] += 4.0  # token 2 looks at the top half of image 0
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    probs[1, 3, 5] = 1.0  # an exact 1: log(1 - a) = -inf, clamped at -100 as torch's BCELoss does
    probs[1, 3, :5] = probs[1, 3, 6:] = 0.0
    masks = np.zeros((b, *size, k), np.uint8)
    masks[0, :6, :, 0] = 1          # matches token 2's top half
    masks[0, 6:, 3:9, 1] = 1
    masks[1, 2:10, 2:10, 0] = 1
    masks[1, :, :, 2] = 0           # an empty mask: no term
    positions = [[[2], [4, 5], []], [[5, 1], [0], [3]]]  # image 0, noun 2: not in the prompt
    tokens = np.zeros((b, k, t), np.int32)
    weights = np.zeros((b, k, t), np.float32)
    for i in range(b):
        for j in range(k):
            p = positions[i][j]
            tokens[i, j, :len(p)] = p
            weights[i, j, :len(p)] = 1.0 / len(p) if p else 0.0
    maps = tm.noun_maps(jnp.asarray(probs, jnp.float32), jnp.asarray(tokens), jnp.asarray(weights), size)
    tok, bce, n = tm.matching_losses(maps, jnp.asarray(masks), jnp.asarray(weights))
    ref = [_torch_grounding(probs[i], positions[i], np.moveaxis(masks[i], -1, 0), size) for i in range(b)]
    count = sum(r[2] for r in ref)
    assert int(n) == count == 3
    np.testing.assert_allclose(float(tok), sum(r[0] * r[2] for r in ref) / count, rtol=1e-5)
    np.testing.assert_allclose(float(bce), sum(r[1] * r[2] for r in ref) / count, rtol=1e-5)
    # The gradient is finite (the clamped logs and the skipped pairs leave no NaN behind).
    g = jax.grad(lambda p: sum(tm.matching_losses(tm.noun_maps(p, tokens, weights, size), masks, weights)[:2]))(
        jnp.asarray(probs, jnp.float32))
    assert np.all(np.isfinite(np.asarray(g))) and np.abs(np.asarray(g)).max() > 0
    # Nothing to match: both losses 0, count 0.
    zero = tm.matching_losses(maps, jnp.zeros_like(jnp.asarray(masks)), jnp.asarray(weights))
    assert [float(v) for v in zero] == [0.0, 0.0, 0.0]


def test_noun_token_positions_with_the_tiny_tokenizer(tmp_path):
    pytest.importorskip("transformers")
    from jsr.models.clip_text import Tokenizer
    from jsr.sr import text_matching as tm
    from jsr.weights.tiny import write_tokenizer

    tok = Tokenizer(write_tokenizer(tmp_path / "tokenizer"))
    prompts = ["a dog on a red sofa, dog", "", "a cat"]
    nouns = np.array([["dog", "red sofa", "tree"], ["dog", "", ""], ["cat", "", ""]])
    tokens, weights = tm.noun_token_table(tok, prompts, nouns, max_tokens=4)
    ids = tok(prompts)
    dog = tok.tokenizer("dog", add_special_tokens=False)["input_ids"]
    n = min(len(dog), 4)  # the first occurrence's run leads the positions (at most 4 kept)
    assert list(ids[0][tokens[0, 0, :n]]) == dog[:n] and np.isclose(weights[0, 0].sum(), 1.0)
    assert weights[0, 1].sum() > 0  # a two-word noun found as a run
    assert weights[0, 2].sum() == 0 and weights[1].sum() == 0  # absent noun; dropped prompt
    assert weights[2, 0].sum() > 0
    assert tm.token_positions([5, 1, 2, 9, 1, 2], [1, 2], 8) == [1, 2, 4, 5]
    assert tm.token_positions([5, 1, 2], [7], 8) == []


# ---------------------------------------------------------------------------------------------------------------
# Noun masks in the data pipeline


def _mask_folder(tmp_path):
    """Three images: a JSON sidecar (red square = "box", caption given), a folder sidecar (blue band =
    "blue band"), none. Masks are exactly where the colours are, so crops/flips can be checked."""
    from PIL import Image

    img = np.zeros((48, 40, 3), np.uint8)
    img[5:25, 8:30, 0] = 255
    Image.fromarray(img).save(tmp_path / "a.png")
    Image.fromarray((img[..., 0] > 0).astype(np.uint8) * 255).save(tmp_path / "a.box.png")
    (tmp_path / "a.nouns.json").write_text('{"caption": "a box", "nouns": [{"word": "box", "mask": "a.box.png"}]}')
    img2 = np.zeros((48, 40, 3), np.uint8)
    img2[:, 30:, 2] = 255
    Image.fromarray(img2).save(tmp_path / "b.png")
    (tmp_path / "b.nouns").mkdir()
    Image.fromarray((img2[..., 2] > 0).astype(np.uint8) * 255).save(tmp_path / "b.nouns" / "blue_band.png")
    Image.fromarray(np.full((48, 40, 3), 90, np.uint8)).save(tmp_path / "c.png")


def test_noun_masks_read_and_travel_with_the_crop(tmp_path):
    from jsr.data import make_iterator, noun_masks

    _mask_folder(tmp_path)
    cap, nouns, masks = noun_masks.read_noun_masks(tmp_path / "a.png", (48, 40), 4)
    assert cap == "a box" and nouns == ["box"] and masks[0].sum() == 20 * 22
    assert noun_masks.read_noun_masks(tmp_path / "b.png", (48, 40), 4)[1] == ["blue band"]
    assert noun_masks.read_noun_masks(tmp_path / "c.png", (48, 40), 4) == (None, [], [])
    with pytest.raises(noun_masks.NounMaskError, match="is 48x40, its image 40x40"):
        noun_masks.read_noun_masks(tmp_path / "a.png", (40, 40), 4)

    cfg = dict(source="folder", path=str(tmp_path), prompt="fixed", prompt_text="a photo", crop_size=32,
               batch_size=3, shuffle=False, noun_masks=True, max_nouns=2, prefetch_batches=0,
               degradation=dict(scale=4))
    it = make_iterator(cfg, process_index=0, process_count=1)
    batch = next(it)
    it.close()
    assert batch["masks"].shape == (3, 32, 32, 2) and batch["masks"].dtype == np.uint8
    assert [list(n) for n in batch["nouns"]] == [["box", ""], ["blue band", ""], ["", ""]]
    assert list(batch["prompt"]) == ["a box", "a photo", "a photo"]
    # The masks are still exactly the coloured pixels after the random crop and flip.
    np.testing.assert_array_equal(batch["masks"][0, ..., 0], (batch["hq"][0, ..., 0] > 0.5).astype(np.uint8))
    np.testing.assert_array_equal(batch["masks"][1, ..., 0], (batch["hq"][1, ..., 2] > 0.5).astype(np.uint8))
    assert not batch["masks"][2].any() and not batch["masks"][..., 1].any()
    # Off (the default): the same images, crops and flips, no mask entries.
    it = make_iterator({**cfg, "noun_masks": False}, process_index=0, process_count=1)
    plain = next(it)
    it.close()
    assert "masks" not in plain
    np.testing.assert_array_equal(plain["hq"], batch["hq"])
