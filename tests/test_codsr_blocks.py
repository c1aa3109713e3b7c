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
