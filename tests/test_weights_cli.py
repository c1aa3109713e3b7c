"""``python -m jsr.weights``: whole-folder conversion both ways is lossless and PyTorch loads the result."""
import jax
import numpy as np
import pytest

from jsr.weights import __main__ as cli
from jsr.weights import load_text_encoder, load_unet, load_vae, native
from jsr.weights.tiny import write_tiny_sd


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    return write_tiny_sd(tmp_path_factory.mktemp("sd") / "tiny", seed=3)


def test_roundtrip_diffusers_jsr_diffusers(tiny_sd, tmp_path, capsys):
    assert cli.main(["to-jsr", str(tiny_sd), str(tmp_path / "jsr")]) == 0
    for comp in ("unet", "vae", "text_encoder"):
        assert native.is_native(tmp_path / "jsr" / comp)
    assert (tmp_path / "jsr" / "tokenizer" / "vocab.json").is_file()
    assert cli.main(["to-diffusers", str(tmp_path / "jsr"), str(tmp_path / "back")]) == 0
    for load, comp in ((load_unet, "unet"), (load_vae, "vae"), (load_text_encoder, "text_encoder")):
        _, a = load(tiny_sd / comp)
        _, b = load(tmp_path / "jsr" / comp)
        _, c = load(tmp_path / "back" / comp)
        jax.tree.map(np.testing.assert_array_equal, a, b)
        jax.tree.map(np.testing.assert_array_equal, a, c)
    cli.main(["info", str(tmp_path / "jsr")])
    out = capsys.readouterr().out
    assert "jsr-native" in out and "parameters" in out


def test_pytorch_loads_the_converted_folder(tiny_sd, tmp_path):
    diffusers = pytest.importorskip("diffusers")
    cli.main(["to-jsr", str(tiny_sd), str(tmp_path / "jsr")])
    cli.main(["to-diffusers", str(tmp_path / "jsr"), str(tmp_path / "back"), "--dtype", "float16"])
    from jsr.weights.io import read_safetensors

    stored = read_safetensors(tmp_path / "back" / "unet" / "diffusion_pytorch_model.safetensors")
    assert {str(v.dtype) for v in stored.values()} == {"float16"}
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(tmp_path / "back"), safety_checker=None)
    assert sum(p.numel() for p in pipe.unet.parameters()) == sum(v.size for v in stored.values())


def test_refuses_to_overwrite_and_non_sd_folders(tiny_sd, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    with pytest.raises(SystemExit, match="not empty"):
        cli.main(["to-jsr", str(tiny_sd), str(tmp_path / "full")])
    with pytest.raises(SystemExit, match="not an SD model folder"):
        cli.main(["info", str(tmp_path)])
