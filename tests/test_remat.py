"""Rematerialisation as config (``config.model.remat`` = none | blocks | full, ``remat_policy``): the same
parameter trees and gradients in every mode, less memory in XLA's analysis of the compiled gradient, clear errors.

The compiled programs are a generator-shaped gradient on one-level models (VAE encoder -> UNet with a down, mid
and up block, each with attention), so the three compilations stay short; the loop's train step is the same code.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jsr.models import common
from jsr.models import remat as remat_lib
from jsr.weights.unet import unet_from_config
from jsr.weights.vae import vae_from_config
from tests.helpers import rel_error

UNET = dict(in_channels=4, out_channels=4, block_out_channels=[16], down_block_types=["CrossAttnDownBlock2D"],
            up_block_types=["CrossAttnUpBlock2D"], layers_per_block=1, attention_head_dim=[2],
            cross_attention_dim=8, norm_num_groups=4, use_linear_projection=True)
VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[8, 16], layers_per_block=1,
           down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2, norm_num_groups=4)
MODES = ("none", "blocks", "full")


def _models():
    return unet_from_config(UNET), vae_from_config(VAE)


def _problem(batch: int = 2, size: int = 32):
    """(params, loss(params, mode)): ``mean(|z - U(z)|^2)`` with ``z`` the VAE encoder's posterior mean of
    ``batch`` random ``size``-px images; gradients reach every UNet and VAE-encoder parameter."""
    unet, vae = _models()
    rng = np.random.default_rng(0)
    rand = lambda m: jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape) * 0.3, jnp.float32),  # noqa: E731
                                  common.abstract_params(m))
    params = (rand(unet), rand(vae))
    x = jnp.asarray(rng.uniform(-1, 1, size=(batch, size, size, 3)), jnp.float32)
    ctx = jnp.asarray(rng.normal(size=(batch, 3, 8)), jnp.float32)

    def loss(p, mode):
        u, v = unet.clone(remat=mode), vae.clone(remat=mode)
        z, _ = v.apply({"params": p[1]}, x, method="encode")
        return jnp.mean(jnp.square(z - u.apply({"params": p[0]}, z, jnp.full((batch,), 321.5), ctx)))

    return params, loss


@pytest.fixture(scope="module")
def compiled():
    """mode -> (XLA temp bytes, (loss, grads)) of the jitted value_and_grad, compiled as the train loop compiles
    its step (``jsr.models.remat.compiler_options``)."""
    params, loss = _problem()
    out = {}
    for mode in MODES:
        fn = jax.jit(jax.value_and_grad(lambda p, m=mode: loss(p, m)))
        exe = fn.lower(params).compile(compiler_options=remat_lib.compiler_options(mode, "cpu"))
        out[mode] = (exe.memory_analysis().temp_size_in_bytes, exe(params))
    return out


def test_gradients_are_the_same_in_every_mode(compiled):
    """Not bit-identical: with remat XLA fuses the recomputed forward differently (other f32 summation orders);
    measured max |diff| 1-2e-7 on gradients of order 1e-1 (2026-11-30), so relative L2 error < 1e-6."""
    ref_loss, ref_grads = compiled["none"][1]
    flat = lambda g: np.concatenate([np.ravel(a) for a in jax.tree.leaves(g)])  # noqa: E731
    # Every UNet and encoder parameter takes part (the decoder's are unused here, hence zero).
    assert all(np.any(g != 0) for g in jax.tree.leaves((ref_grads[0], ref_grads[1]["encoder"])))
    for mode in ("blocks", "full"):
        loss, grads = compiled[mode][1]
        assert rel_error(loss, ref_loss) < 1e-6
        assert jax.tree.structure(grads) == jax.tree.structure(ref_grads)
        assert rel_error(flat(grads), flat(ref_grads)) < 1e-6, mode


def test_blocks_need_less_memory(compiled):
    """XLA's buffer assignment of the compiled gradient (temp bytes, batch 2 at 32 px, 2026-11-30): none
    25.6 MB, blocks 11.1 MB (the attention scores of one block live at a time), full 20.8 MB (one network's
    activations at a time: here the UNet's). Without ``compiler_options`` XLA:CPU merges the recomputation back
    into the forward pass and ``blocks`` took more (``jsr.models.remat._CPU_KEEP_REMAT``)."""
    none, blocks, full = (compiled[m][0] for m in MODES)
    assert blocks < 0.6 * none, (none, blocks)
    assert full < 0.9 * none, (none, full)


def test_parameter_trees_do_not_depend_on_remat():
    """Checkpoints and weight conversion are unaffected: the same names and shapes in every mode (UNet, and the
    whole VAE: encoder and decoder)."""
    for module in _models():
        trees = [jax.tree.map(lambda a: (a.shape, a.dtype), common.abstract_params(module.clone(remat=m)))
                 for m in MODES]
        assert trees[0] == trees[1] == trees[2]


def test_policy_reaches_the_checkpoints():
    """``remat_policy`` is the policy of every checkpoint the mode creates (read off the gradient's jaxpr)."""
    params, loss = _problem(batch=1, size=16)
    unet, _ = _models()
    ctx = jnp.zeros((1, 3, 8))
    z = jnp.zeros((1, 2, 2, 4))
    for mode, count in (("blocks", 3), ("full", 1)):
        m = unet.clone(remat=mode, remat_policy="dots_saveable")
        text = str(jax.make_jaxpr(jax.grad(lambda p: jnp.sum(m.apply({"params": p}, z, 1.0, ctx))))(params[0]))
        assert text.count("policy=DotsSaveable(") == count, mode  # how jax 0.10 prints dots_saveable
    plain = str(jax.make_jaxpr(lambda p: unet.apply({"params": p}, z, 1.0, ctx))(params[0]))
    assert "checkpoint" not in plain and "remat" not in plain


def test_modes_policies_and_errors():
    assert remat_lib.remat_mode(True) == "blocks" and remat_lib.remat_mode(False) == "none"
    assert remat_lib.remat_mode("Full") == "full" and remat_lib.remat_mode(None) == "none"
    with pytest.raises(remat_lib.RematConfigError, match="choose one of none, blocks, full"):
        remat_lib.remat_mode("layers")
    names = remat_lib.policy_names()
    assert {"nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable"} <= set(names)
    assert "save_only_these_names" not in names  # a policy factory, not a policy
    assert remat_lib.checkpoint_policy("dots_saveable") is jax.checkpoint_policies.dots_saveable
    assert remat_lib.checkpoint_policy(None) is None
    with pytest.raises(remat_lib.RematConfigError, match="remat_policy='dots'.*dots_saveable"):
        remat_lib.checkpoint_policy("dots")
    assert remat_lib.compiler_options("none", "cpu") is None and remat_lib.compiler_options("blocks", "tpu") is None
    assert remat_lib.compiler_options("blocks", "cpu") == {"xla_disable_hlo_passes": "cse_barrier_expander"}


def test_config_fields_and_one_line_error(capsys):
    """``config.model.remat``/``remat_policy``: full-size configs rematerialise blocks, tiny ones do not; a bad
    value is a user error (``train.py`` prints one line and exits 2)."""
    from configs import fidelity
    from jsr.cli import guard
    from jsr.train import loop

    assert loop.remat_setting(fidelity.get_config()) == ("blocks", "nothing_saveable")
    c = fidelity.get_config("tiny")
    assert loop.remat_setting(c) == ("none", "nothing_saveable")
    c.model.remat_policy = "no_such_policy"
    assert guard(lambda: loop.remat_setting(c))() == 2
    err = capsys.readouterr().err
    assert err.startswith("error: remat_policy='no_such_policy'") and err.count("\n") == 1
