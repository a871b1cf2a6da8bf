"""Pretrained autoencoders through latentpipe's adapter equal diffusers' own modules: from a
save_pretrained folder, and from the LDM-format checkpoint of the same weights (whose key
mapping is checked against diffusers' own convert_ldm_vae_checkpoint)."""

import argparse
import json

import diffusers  # in the test extra: a missing install fails rather than skips
import pytest
import torch
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from safetensors.torch import load_file, save_file

from pipeline.autoencoder.kl import DiagonalGaussian
from pipeline.errors import LatentpipeError
from pipeline.interop import (
    PretrainedKL,
    PretrainedVQ,
    ldm,
    load_pretrained_autoencoder,
)
from pipeline.latents import LatentSpace
from pipeline.manifest import sha256_file

from .conftest import KL_CONFIG, images, randomise

TOL = dict(rtol=0, atol=1e-5)


def _assert_kl_equal(ours: PretrainedKL, theirs, x: torch.Tensor) -> None:
    with torch.no_grad():
        posterior = ours.encode(x)
        reference = theirs.encode(x).latent_dist
        assert isinstance(posterior, DiagonalGaussian)
        torch.testing.assert_close(posterior.mean, reference.mean, **TOL)
        torch.testing.assert_close(posterior.logvar, reference.logvar, **TOL)
        torch.testing.assert_close(ours.decode(posterior.mean), theirs.decode(reference.mean).sample, **TOL)


def _assert_vq_equal(ours: PretrainedVQ, theirs, x: torch.Tensor) -> None:
    with torch.no_grad():
        codes = ours.encode(x)
        h = theirs.encode(x).latents
        quantized, _, (_, _, indices) = theirs.quantize(h)
        assert torch.equal(codes.indices.flatten(), indices)
        assert codes.indices.unique().numel() > 1  # a test that could tell codes apart
        torch.testing.assert_close(codes.z_q, quantized, **TOL)
        torch.testing.assert_close(ours.decode_indices(codes.indices), theirs.decode(h).sample, **TOL)
        torch.testing.assert_close(ours.decode(codes.z_q), theirs.decode(h).sample, **TOL)


def test_kl_folder_encodes_and_decodes_as_diffusers(kl_folder):
    model, folder = kl_folder
    ours = load_pretrained_autoencoder(folder)
    assert isinstance(ours, PretrainedKL)
    assert (ours.factor, ours.image_channels, ours.latent_channels) == (2, 3, 4)
    assert ours.scaling_factor == KL_CONFIG["scaling_factor"]  # the checkpoint's own, read from config.json
    weights = folder / "diffusion_pytorch_model.safetensors"
    assert ours.weights == {weights.name: sha256_file(weights)}
    _assert_kl_equal(ours, model, images())


def test_vq_folder_encodes_codes_and_decodes_as_diffusers(vq_folder):
    model, folder = vq_folder
    ours = load_pretrained_autoencoder(folder)
    assert isinstance(ours, PretrainedVQ)
    assert (ours.factor, ours.latent_channels, ours.codebook.num_codes) == (4, 3, 32)
    torch.testing.assert_close(ours.codebook.table, model.quantize.embedding.weight, rtol=0, atol=0)
    _assert_vq_equal(ours, model, images())


@pytest.mark.parametrize("kind", ["kl", "vq"])
def test_ldm_keys_match_diffusers_own_conversion(kl_folder, vq_folder, kind):
    model = (kl_folder if kind == "kl" else vq_folder)[0]
    levels = len(model.config.block_out_channels)
    ldm_state = ldm.from_diffusers(model.state_dict(), levels)
    theirs = convert_ldm_vae_checkpoint(dict(ldm_state), dict(model.config))
    ours = ldm.to_diffusers(ldm_state, model.state_dict(), levels)
    shared = set(theirs)  # diffusers' script converts the encoder/decoder, not the quantizer
    assert shared <= set(ours) and len(shared) > 0.9 * len(ours)
    for name in shared:
        assert torch.equal(ours[name], theirs[name]), name


@pytest.mark.parametrize("kind", ["kl", "vq"])
@pytest.mark.parametrize("container", ["ckpt", "safetensors"])
def test_ldm_checkpoint_file_equals_the_diffusers_model(kl_folder, vq_folder, tmp_path, kind, container):
    model = (kl_folder if kind == "kl" else vq_folder)[0]
    ldm_state = ldm.from_diffusers(model.state_dict(), len(model.config.block_out_channels))
    full = {f"first_stage_model.{k}": v.contiguous() for k, v in ldm_state.items()}
    full["model.diffusion_model.out.0.weight"] = torch.ones(4)  # the rest of an LDM checkpoint is not read
    full["scale_factor"] = torch.tensor(0.25)
    path = tmp_path / f"ldm.{container}"
    if container == "ckpt":
        torch.save({"state_dict": full, "global_step": 10}, path)
    else:
        save_file(full, path)
    ours = load_pretrained_autoencoder(path)
    assert ours.kind == kind and ours.scaling_factor == 0.25
    assert ours.weights == {path.name: sha256_file(path)}
    (_assert_kl_equal if kind == "kl" else _assert_vq_equal)(ours, model, images())


def test_ldm_first_stage_file_without_scale_takes_the_given_one(kl_folder, tmp_path):
    model, _ = kl_folder
    path = tmp_path / "kl-f2.safetensors"
    save_file({k: v.contiguous() for k, v in ldm.from_diffusers(model.state_dict(), 2).items()}, path)
    assert load_pretrained_autoencoder(path).scaling_factor is None
    assert load_pretrained_autoencoder(path, scaling_factor=0.5).scaling_factor == 0.5


# -- bad input: clear errors before any work -------------------------------------------------------


def test_missing_path_is_named(tmp_path):
    with pytest.raises(LatentpipeError, match="does not exist: expected a diffusers AutoencoderKL/VQModel folder"):
        load_pretrained_autoencoder(tmp_path / "nowhere")


def test_a_unet_folder_is_refused_naming_the_expected_classes(tmp_path):
    unet = diffusers.UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D",) * 2,
        up_block_types=("UpBlock2D",) * 2,
        norm_num_groups=4,
        layers_per_block=1,
    )
    unet.save_pretrained(tmp_path / "unet")
    with pytest.raises(
        LatentpipeError, match="holds a diffusers UNet2DModel, not an autoencoder: expected AutoencoderKL or VQModel"
    ):
        load_pretrained_autoencoder(tmp_path / "unet")


def test_folder_with_missing_keys_names_them(kl_folder):
    _, folder = kl_folder
    weights = folder / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    del state["decoder.conv_out.weight"]
    save_file(state, weights)
    with pytest.raises(LatentpipeError, match="lacks 1 key.*decoder.conv_out.weight"):
        load_pretrained_autoencoder(folder)


def test_ldm_checkpoint_with_missing_keys_names_them(kl_folder, tmp_path):
    model, _ = kl_folder
    state = {f"first_stage_model.{k}": v.contiguous() for k, v in ldm.from_diffusers(model.state_dict(), 2).items()}
    del state["first_stage_model.decoder.up.0.block.1.conv2.bias"]
    del state["first_stage_model.encoder.mid.attn_1.q.bias"]
    save_file(state, tmp_path / "broken.safetensors")
    with pytest.raises(
        LatentpipeError,
        match=r"lacks 2 key\(s\).*first_stage_model.decoder.up.0.block.1.conv2.bias, "
        r"first_stage_model.encoder.mid.attn_1.q.bias",
    ):
        load_pretrained_autoencoder(tmp_path / "broken.safetensors")


def test_level_attention_that_diffusers_cannot_hold_is_refused(kl_folder, tmp_path):
    model, _ = kl_folder
    state = {k: v.contiguous() for k, v in ldm.from_diffusers(model.state_dict(), 2).items()}
    state["encoder.down.1.attn.0.q.weight"] = torch.zeros(64, 64, 1, 1)
    save_file(state, tmp_path / "taming.safetensors")
    with pytest.raises(LatentpipeError, match="encoder.down.1.attn.0.q.weight: attention inside the resolution levels"):
        load_pretrained_autoencoder(tmp_path / "taming.safetensors")


def test_pickled_objects_are_never_unpickled(kl_folder, tmp_path):
    model, _ = kl_folder
    path = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": ldm.from_diffusers(model.state_dict(), 2), "hparams": argparse.Namespace(lr=1)}, path)
    with pytest.raises(LatentpipeError, match="cannot be read with weights-only loading"):
        load_pretrained_autoencoder(path)


def test_image_check_says_the_fix(kl_folder):
    ours = load_pretrained_autoencoder(kl_folder[1])
    ours.check_images(3, 32)
    with pytest.raises(
        LatentpipeError,
        match=r"3-channel images, the data has 1 \(set data.color=rgb\); its "
        r"downsampling factor 2 does not divide the image side 31 "
        r"\(set data.resolution to a multiple of 2, e.g. 30\)",
    ):
        ours.check_images(1, 31)


def test_describe_is_the_manifest_entry(kl_folder):
    ours = load_pretrained_autoencoder(kl_folder[1])
    entry = ours.describe()
    assert entry["class"] == "AutoencoderKL" and entry["scaling_factor"] == 0.3
    json.dumps(entry)  # goes into manifest.json as is


def test_scaling_factor_is_never_assumed_for_a_folder(kl_folder):
    with pytest.raises(LatentpipeError, match="has its own scaling_factor"):
        load_pretrained_autoencoder(kl_folder[1], scaling_factor=0.18215)


def test_randomised_models_are_not_trivially_equal(kl_folder):
    """The equalities above could fail: another random autoencoder encodes differently."""
    _, folder = kl_folder
    other = randomise(diffusers.AutoencoderKL(**KL_CONFIG), seed=9)
    ours = load_pretrained_autoencoder(folder)
    with torch.no_grad():
        assert (ours.encode(images()).mean - other.encode(images()).latent_dist.mean).abs().max() > 1e-2


def test_without_diffusers_the_error_says_how_to_install(kl_folder, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "diffusers", None)  # what an absent package looks like
    with pytest.raises(LatentpipeError, match=r"pip install 'latentpipe\[pretrained\]'"):
        load_pretrained_autoencoder(kl_folder[1])


def test_adapters_fit_the_latent_space_that_diffusion_and_sampling_use(kl_folder, vq_folder):
    """What the encode stage stores (codes, or posterior mean/logvar) goes through LatentSpace to the
    model's space and back to the adapter's decoder as for latentpipe's own autoencoders."""
    x = images()
    kl_model, vq_model = kl_folder[0], vq_folder[0]
    kl, vq = load_pretrained_autoencoder(kl_folder[1]), load_pretrained_autoencoder(vq_folder[1])
    with torch.no_grad():
        posterior = kl.encode(x)
        space = LatentSpace("kl", "scale", torch.zeros(4), torch.full((4,), kl.scaling_factor), None)
        model_space = space.from_batch({"mean": posterior.mean, "logvar": posterior.logvar}, sample_posterior=False)
        torch.testing.assert_close(
            kl.decode(space.to_decoder(model_space, snap=False)),
            kl_model.decode(kl_model.encode(x).latent_dist.mean).sample,
            **TOL,
        )

        codes = vq.encode(x)
        space = LatentSpace("vq", "scale", torch.zeros(3), torch.full((3,), 0.5), vq.codebook.table)
        generated = space.from_batch({"codes": codes.indices.to(torch.int16)}) + 0.01  # near the codes
        snapped = space.to_decoder(generated, snap=True)
        assert torch.equal(snapped, codes.z_q)
        torch.testing.assert_close(vq.decode(snapped), vq_model.decode(vq_model.encode(x).latents).sample, **TOL)
