"""The stages on a published autoencoder and DiT checkpoints (autoencoder.kind=pretrained,
diffusion.init_from, `latentpipe export`), with real parts: tiny random diffusers models saved
with save_pretrained, the digits images in RGB.

End to end: prepare -> autoencoder (pretrained AutoencoderKL) -> encode -> diffusion (DiT) ->
sample -> export, and diffusers' DiTPipeline on the exported folder samples, with DDIM, the
latents latentpipe's ddim gives from the same noise and labels; a VQModel through encode and
diffusion; bad inputs refused before anything is trained."""

import functools
import io
import json
import shutil

import diffusers  # in the test extra: a missing install fails rather than skips
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline import artifacts, cli, config, manifest
from pipeline.config import ConfigError
from pipeline.data.stream import read_shard, sequential_batches
from pipeline.errors import LatentpipeError
from pipeline.interop import checkpoint_sha256, export_dit_transformer
from pipeline.manifest import sha256_file
from pipeline.sampling import ddpm_sigmas, ddpm_timesteps
from pipeline.sampling import sample as run_sampler
from stages import autoencoder, diffusion, encode, prepare, sample
from tests.interop.conftest import KL_CONFIG, VQ_CONFIG, randomise

DATA = [
    "data.source=digits",
    "data.limit=120",
    "data.resolution=8",
    "data.color=rgb",
    "data.shard_max_count=60",
    "data.workers=0",
]
DIT = [
    "diffusion.backbone=dit",
    "diffusion.dit.width=32",
    "diffusion.dit.depth=2",
    "diffusion.dit.num_heads=2",
    "diffusion.dit.time_embedding=diffusers",
    "diffusion.dit.mlp_norm_eps=1e-5",
    "diffusion.batch_size=16",
    "diffusion.num_workers=0",
    "diffusion.max_steps=3",
    "diffusion.warmup_steps=0",
    "diffusion.log_every=1",
    "diffusion.image_every=1000",
    "diffusion.checkpoint_every=1000",
]
STEPS = 6


def _cfg(root, weights, *extra):
    return config.load(
        overrides=[
            f"experiment.runs_dir={root}",
            *DATA,
            "autoencoder.kind=pretrained",
            f"autoencoder.pretrained={weights}",
            "autoencoder.lpips=none",
            "encode.batch_size=32",
            *DIT,
            *extra,
        ]
    )


def _save(model, folder):
    model.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def kl_vae(tmp_path_factory):
    model = randomise(diffusers.AutoencoderKL(**KL_CONFIG), seed=0)
    return model, _save(model, tmp_path_factory.mktemp("weights") / "vae")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, kl_vae):
    """The prepare stage's RGB digits (8 x 8), shared by the tests that copy it."""
    root = tmp_path_factory.mktemp("prepared")
    prepare.run(_cfg(root, kl_vae[1]))
    return root


def _with_prepared(prepared, root):
    shutil.copytree(prepared / "tiny" / "prepare", root / "tiny" / "prepare")
    return root


@pytest.fixture(scope="module")
def kl_run(tmp_path_factory, kl_vae, prepared):
    root = _with_prepared(prepared, tmp_path_factory.mktemp("kl"))
    cfg = _cfg(
        root,
        kl_vae[1],
        "diffusion.normalize=checkpoint",
        "diffusion.prediction=eps",
        "sample.method=ddim",
        "sample.grid=process",
        f"sample.steps={STEPS}",
        "sample.num_samples=4",
        "sample.batch_size=4",
        "sample.chunk_size=4",
        "sample.guidance_scale=1.0",
        "sample.grid_rows=2",
    )
    for stage in (autoencoder, encode, diffusion, sample):
        stage.run(cfg)
    return cfg


def _array(npy: bytes) -> torch.Tensor:
    return torch.from_numpy(np.load(io.BytesIO(npy), allow_pickle=False))


def _val_images(cfg, count=8):
    val = artifacts.PreparedShards.from_stage_dir(cfg).files("val")
    return next(iter(sequential_batches(str(val[0]), count)))


def test_the_pretrained_autoencoder_is_published_measured_and_encodes_as_diffusers_does(kl_run, kl_vae):
    model, folder = kl_vae
    found = manifest.read(kl_run.stage_dir("autoencoder"))
    weights = folder / "diffusion_pytorch_model.safetensors"
    assert found["pretrained"]["weights_sha256"] == {weights.name: sha256_file(weights)}
    assert found["pretrained"]["scaling_factor"] == KL_CONFIG["scaling_factor"]  # read from config.json
    assert found["latent"] == {"channels": 4, "resolution": 4, "kind": "kl"}
    assert 0 < found["metrics"]["val_psnr"] < 100 and -1 <= found["metrics"]["val_ssim"] <= 1

    encoded = artifacts.EncodedLatents.from_stage_dir(kl_run)
    assert encoded.latent.checkpoint_scale == KL_CONFIG["scaling_factor"]
    assert encoded.latent.autoencoder_sha256 == sha256_file(weights)
    assert encoded.latent.scale != KL_CONFIG["scaling_factor"]  # the measured statistics stay beside it
    batch = _val_images(kl_run, count=1 << 20)
    stored = {s["__key__"]: s for s in read_shard(str(encoded.files("val")[0]))}
    with torch.no_grad():
        posterior = model.encode(batch["image"]).latent_dist
    mean = torch.stack([_array(stored[k]["mean.npy"]) for k in batch["key"]])
    logvar = torch.stack([_array(stored[k]["logvar.npy"]) for k in batch["key"]])
    torch.testing.assert_close(mean, posterior.mean, rtol=0, atol=1e-5)
    torch.testing.assert_close(logvar, posterior.logvar, rtol=0, atol=1e-5)

    space = encoded.latent_space("checkpoint")  # z * 0.3, the checkpoint's own scale
    torch.testing.assert_close(space.to_model(mean), mean * KL_CONFIG["scaling_factor"])


def test_a_changed_weights_file_is_refused_downstream(kl_vae, prepared, tmp_path):
    folder = shutil.copytree(kl_vae[1], tmp_path / "vae")
    cfg = _cfg(_with_prepared(prepared, tmp_path / "runs"), folder)
    autoencoder.run(cfg)
    artifacts.load_autoencoder(cfg, "cpu")  # the recorded weights: accepted
    state = load_file(folder / "diffusion_pytorch_model.safetensors")
    state["decoder.conv_out.bias"] += 1
    save_file(state, folder / "diffusion_pytorch_model.safetensors")
    with pytest.raises(LatentpipeError, match="are not the ones stage 'autoencoder' recorded"):
        artifacts.load_autoencoder(cfg, "cpu")


def test_export_gives_a_dit_pipeline_that_samples_our_ddim_latents(kl_run, tmp_path):
    out = tmp_path / "pipe"
    assert cli.main(["export", "--format", "diffusers", str(out), *_overrides(kl_run)]) == 0
    pipe = diffusers.DiTPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae.config.scaling_factor == float(torch.tensor(KL_CONFIG["scaling_factor"]))
    assert pipe.labels["7"] == 7  # id2label from the prepared classes
    seen = []  # the latents DiTPipeline hands the decoder (after dividing by scaling_factor)
    pipe.vae.post_quant_conv.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    labels = [3, 1, 7]
    with torch.no_grad():
        pipe(
            labels,
            guidance_scale=1.0,
            num_inference_steps=STEPS,
            output_type="pt",
            generator=torch.Generator().manual_seed(11),
        )

    trained = artifacts.load_trained(kl_run, "cpu")
    sigmas = ddpm_sigmas(trained.process, ddpm_timesteps(kl_run.diffusion.timesteps, STEPS))
    noise = torch.randn(len(labels), *trained.shape, generator=torch.Generator().manual_seed(11))
    denoiser = functools.partial(trained.denoiser, y=torch.tensor(labels))
    with torch.no_grad():  # VE frame: x = x_t / alpha = x_t * sqrt(1 + sigma^2)
        ours = run_sampler(denoiser, noise * (1 + sigmas[0] ** 2).sqrt(), sigmas, method="ddim")
    torch.testing.assert_close(seen[0], trained.space.from_model(ours), rtol=1e-6, atol=1e-4)
    assert ours.std() > 0.1

    reference = tmp_path / "dit.pt"
    # the DiT has diffusers' time convention, which the reference format cannot hold
    assert cli.main(["export", "--format", "dit", str(reference), *_overrides(kl_run)]) == 2
    assert not reference.exists()
    assert cli.main(["export", "--format", "diffusers", str(out), *_overrides(kl_run)]) == 2  # exists: refused
    vae_out = tmp_path / "vae"
    assert (
        cli.main(["export", "--format", "diffusers", "--part", "autoencoder", str(vae_out), *_overrides(kl_run)]) == 0
    )
    assert json.loads((vae_out / "config.json").read_text())["scaling_factor"] == KL_CONFIG["scaling_factor"]


def _overrides(cfg):
    """The key=value arguments that give ``cfg`` back (its non-default values)."""
    default, wanted = config.to_dict(config.Config()), config.to_dict(cfg)
    pairs = []

    def walk(a, b, prefix):
        for key, value in b.items():
            if isinstance(value, dict):
                walk(a[key], value, f"{prefix}{key}.")
            elif a[key] != value:
                pairs.append(f"{prefix}{key}={json.dumps(value)}")

    walk(default, wanted, "")
    return pairs


def test_init_from_fine_tunes_and_samples_from_a_dit_checkpoint(kl_run, tmp_path):
    root = tmp_path / "runs"
    for stage in ("prepare", "autoencoder", "encode"):
        shutil.copytree(kl_run.stage_dir(stage), root / "tiny" / stage)
    start = tmp_path / "start"
    trained = artifacts.load_trained(kl_run, "cpu")
    export_dit_transformer(trained.denoiser.net, start)
    cfg = config.load(
        overrides=[
            *_overrides(kl_run),
            f"experiment.runs_dir={root}",
            f"diffusion.init_from={start}",
            "diffusion.learning_rate=1e-12",
            "diffusion.max_steps=1",
        ]
    )
    diffusion.run(cfg)
    found = manifest.read(cfg.stage_dir("diffusion"))
    assert found["denoiser"]["init_from"] == {"path": str(start), "sha256": checkpoint_sha256(start)}
    tuned = load_file(cfg.stage_dir("diffusion") / artifacts.TrainedDenoiser.WEIGHTS_FILE)
    for name, value in trained.denoiser.net.state_dict().items():  # one step at lr 1e-12: the checkpoint's weights
        torch.testing.assert_close(tuned[name], value, rtol=0, atol=1e-6)
    sample.run(cfg)
    images, _ = artifacts.Samples.from_stage_dir(cfg).arrays()
    assert images.shape == (4, 8, 8, 3)

    wider = [f"experiment.runs_dir={tmp_path / 'other'}", "diffusion.dit.width=48", "diffusion.dit.num_heads=2"]
    other = config.load(overrides=[*_overrides(cfg), *wider])
    for stage in ("prepare", "autoencoder", "encode"):
        shutil.copytree(kl_run.stage_dir(stage), other.stage_dir(stage))
    with pytest.raises(LatentpipeError, match=r"has shape .* needs"):
        diffusion.run(other)
    assert not (other.stage_dir("diffusion") / "checkpoints").exists()  # refused before any training step


@pytest.fixture(scope="module")
def vq_vae(tmp_path_factory):
    torch.manual_seed(0)
    model = randomise(diffusers.VQModel(**VQ_CONFIG), seed=1)
    with torch.no_grad():  # codes spread like the encoder's outputs, so that several are used
        model.quantize.embedding.weight.mul_(5.0)
    return model, _save(model, tmp_path_factory.mktemp("weights") / "vqvae")


def test_a_vq_model_goes_through_encode_and_diffusion(vq_vae, prepared, tmp_path):
    model, folder = vq_vae
    cfg = _cfg(_with_prepared(prepared, tmp_path), folder, "diffusion.dit.patch_size=1", "diffusion.max_steps=2")
    for stage in (autoencoder, encode, diffusion):
        stage.run(cfg)
    found = manifest.read(cfg.stage_dir("autoencoder"))
    assert found["latent"] == {"channels": 3, "resolution": 2, "kind": "vq"}
    assert "val_codebook_usage" in found["metrics"]
    encoded = artifacts.EncodedLatents.from_stage_dir(cfg)
    assert encoded.latent.fields == ("codes", "codes_flip")
    torch.testing.assert_close(encoded.codebook(), model.quantize.embedding.weight.detach(), rtol=0, atol=0)
    batch = _val_images(cfg, count=1 << 20)
    stored = {s["__key__"]: s for s in read_shard(str(encoded.files("val")[0]))}
    with torch.no_grad():
        _, _, (_, _, indices) = model.quantize(model.encode(batch["image"]).latents)
    codes = torch.stack([_array(stored[k]["codes.npy"]) for k in batch["key"]])
    assert (codes.long() == indices.view(len(codes), 2, 2)).all()
    assert manifest.read(cfg.stage_dir("diffusion"))["status"] == "complete"


# -- bad inputs: each refused with what was expected, before any training --------------------------


def _refused(prepared, tmp_path, weights, *extra):
    cfg = _cfg(_with_prepared(prepared, tmp_path / "runs"), weights, *extra)
    with pytest.raises(LatentpipeError) as error:
        autoencoder.run(cfg)
    assert (manifest.read(cfg.stage_dir("autoencoder")) or {}).get("status") != "complete"
    return str(error.value)


def test_a_missing_path_is_refused(prepared, tmp_path):
    message = _refused(prepared, tmp_path, tmp_path / "nowhere")
    assert "does not exist: expected a diffusers AutoencoderKL/VQModel folder" in message
    assert "never downloaded" in message


def test_a_unet_folder_is_refused(prepared, tmp_path):
    unet = diffusers.UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 32),
        down_block_types=("DownBlock2D",) * 2,
        up_block_types=("UpBlock2D",) * 2,
        layers_per_block=1,
        norm_num_groups=32,
    )
    message = _refused(prepared, tmp_path, _save(unet, tmp_path / "unet"))
    assert "holds a diffusers UNet2DModel, not an autoencoder: expected AutoencoderKL or VQModel" in message


def test_missing_keys_are_named(prepared, kl_vae, tmp_path):
    folder = shutil.copytree(kl_vae[1], tmp_path / "vae")
    state = load_file(folder / "diffusion_pytorch_model.safetensors")
    del state["decoder.conv_out.weight"]
    save_file(state, folder / "diffusion_pytorch_model.safetensors")
    assert "lacks 1 key(s) its config.json needs: decoder.conv_out.weight" in _refused(prepared, tmp_path, folder)


@pytest.mark.parametrize(
    "data,fix",
    [
        ("data.color=gray", "set data.color=rgb"),
        ("data.resolution=9", "set data.resolution to a multiple of 2, e.g. 8"),
    ],
)
def test_images_the_autoencoder_cannot_take_are_refused_with_the_fix(kl_vae, tmp_path, data, fix):
    cfg = _cfg(tmp_path, kl_vae[1], data)
    prepare.run(cfg)
    with pytest.raises(LatentpipeError, match="cannot encode these images") as error:
        autoencoder.run(cfg)
    assert fix in str(error.value)


def test_config_needs_a_path_and_a_dit_for_checkpoints():
    with pytest.raises(ConfigError, match="autoencoder.pretrained"):
        config.load(overrides=["autoencoder.kind=pretrained"])
    with pytest.raises(ConfigError, match="autoencoder.pretrained"):
        config.load(overrides=["autoencoder.pretrained=/models/vae"])
    with pytest.raises(ConfigError, match="diffusion.init_from"):
        config.load(overrides=["diffusion.backbone=unet", "diffusion.init_from=/models/dit.pt"])
