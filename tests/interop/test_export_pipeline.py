"""A DiT on a pretrained AutoencoderKL exported as a DiTPipeline folder samples, with diffusers'
DDIM, the latents latentpipe's ``ddim`` sampler gives from the same initial noise and labels;
what diffusers cannot represent is refused before anything is written."""

import functools
import json

import diffusers  # in the test extra: a missing install fails rather than skips
import pytest
import torch

from pipeline.diffusion import DDPM, Denoiser
from pipeline.errors import LatentpipeError
from pipeline.interop import (
    checkpoint_sha256,
    export_autoencoder_kl,
    export_dit_pipeline,
    load_dit,
    load_pretrained_autoencoder,
    scheduler_config,
)
from pipeline.latents import LatentSpace
from pipeline.manifest import sha256_file
from pipeline.networks import build_denoiser
from pipeline.sampling import ddpm_sigmas, ddpm_timesteps, sample

from .conftest import randomise

C, SIZE, CLASSES, T = 4, 4, 10, 1000
SCALE = 0.7


def _dit(learn_sigma: bool, time_embedding: str = "diffusers"):
    return randomise(
        build_denoiser(
            "dit",
            in_channels=C,
            input_size=SIZE,
            patch_size=2,
            width=32,
            depth=2,
            num_heads=2,
            num_classes=CLASSES,
            learn_sigma=learn_sigma,
            time_embedding=time_embedding,
            mlp_norm_eps=1e-5,
        ),
        seed=7,
        scale=0.1,
    )


def _latents(scale: float = SCALE) -> LatentSpace:
    return LatentSpace("kl", "scale", torch.zeros(C), torch.full((C,), scale), None)


def _ours(net, process, prediction, noise_seed, labels, steps):
    """latentpipe's ddim from the noise DiTPipeline draws with the same generator (x_T ~ N(0, I))."""
    sigmas = ddpm_sigmas(process, ddpm_timesteps(T, steps))
    x_t = torch.randn(len(labels), C, SIZE, SIZE, generator=torch.Generator().manual_seed(noise_seed))

    def prediction_only(x, t, y):
        return net(x, t, y)[:, :C]

    denoiser = functools.partial(Denoiser(prediction_only, process, prediction), y=torch.tensor(labels))
    with torch.no_grad():
        return sample(denoiser, x_t * (1 + sigmas[0] ** 2).sqrt(), sigmas, method="ddim")  # VE frame x = x_t / alpha


def _own_kl():
    """latentpipe's own KL autoencoder (pipeline.autoencoder.nets), random."""
    from pipeline.autoencoder.build import build_autoencoder
    from pipeline.config import AutoencoderConfig

    cfg = AutoencoderConfig(kind="kl", channels=16, channel_mult=(1, 2), norm_groups=8, latent_channels=C)
    return randomise(build_autoencoder(cfg, 3), seed=5)


@pytest.mark.parametrize(
    "beta_schedule,prediction,learn_sigma,autoencoder",
    [("linear", "eps", True, "pretrained"), ("cosine", "v", False, "pretrained"), ("linear", "x0", False, "own")],
)
def test_dit_pipeline_samples_the_latents_of_our_ddim(
    kl_folder, tmp_path, beta_schedule, prediction, learn_sigma, autoencoder
):
    vae = load_pretrained_autoencoder(kl_folder[1]) if autoencoder == "pretrained" else _own_kl()
    net = _dit(learn_sigma).eval()
    labels, steps = [3, 1, 7], 10
    out = export_dit_pipeline(
        net,
        vae,
        _latents(),
        tmp_path / "pipe",
        process="ddpm",
        beta_schedule=beta_schedule,
        timesteps=T,
        prediction=prediction,
        id2label={i: f"class {i}, c{i}" for i in range(CLASSES)},
    )
    pipe = diffusers.DiTPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.scheduler, diffusers.DDIMScheduler)
    assert (
        pipe.vae.config.scaling_factor == float(torch.tensor(SCALE)) and pipe.labels["c7"] == 7
    )  # the float32 scale latentpipe uses
    seen = []  # what DiTPipeline hands the autoencoder: its final latents / scaling_factor
    first = pipe.vae.post_quant_conv or pipe.vae.decoder  # the first layer AutoencoderKL.decode applies
    first.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    with torch.no_grad():
        images = pipe(
            labels,
            guidance_scale=1.0,
            num_inference_steps=steps,
            output_type="pt",
            generator=torch.Generator().manual_seed(11),
        ).images

    process = DDPM.linear(T) if beta_schedule == "linear" else DDPM.cosine(T)
    ours = _ours(net, process, prediction, 11, labels, steps)
    decoder_input = _latents().from_model(ours)
    # A random eps-network makes latents of size ~300 (x0 = (x - sqrt(1 - abar) eps) / sqrt(abar) at
    # abar ~ 4e-5), where float32 rounding alone is ~3e-5: 1e-4 absolute plus 1e-6 relative.
    torch.testing.assert_close(seen[0], decoder_input, rtol=1e-6, atol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(images, (vae.decode(decoder_input) / 2 + 0.5).clamp(0, 1), rtol=0, atol=1e-4)
    assert ours.std() > 0.1  # the sample is not a constant both sides could agree on by accident

    # The pipeline folder is also a DiT checkpoint latentpipe reads back (diffusion.init_from).
    again = load_dit(out, net.config)
    x, t, y = torch.randn(2, C, SIZE, SIZE), torch.tensor([5, 900]), torch.tensor([1, CLASSES])
    with torch.no_grad():
        torch.testing.assert_close(again(x, t, y), net(x, t, y), rtol=0, atol=0)
    weights = out / "transformer" / "diffusion_pytorch_model.safetensors"
    assert checkpoint_sha256(out) == {weights.name: sha256_file(weights)}


def test_scheduler_config_is_the_training_process():
    config = scheduler_config(process="ddpm", beta_schedule="cosine", timesteps=500, prediction="v")
    scheduler = diffusers.DDIMScheduler.from_config(config)
    torch.testing.assert_close(scheduler.alphas_cumprod.double(), DDPM.cosine(500).alphas_cumprod, rtol=1e-5, atol=1e-6)
    assert scheduler.config.prediction_type == "v_prediction" and not scheduler.config.clip_sample


def test_autoencoder_kl_export_keeps_its_scale(kl_folder, tmp_path):
    vae = load_pretrained_autoencoder(kl_folder[1])
    export_autoencoder_kl(vae, tmp_path / "exported")
    again = load_pretrained_autoencoder(tmp_path / "exported")
    assert again.scaling_factor == vae.scaling_factor
    assert json.loads((tmp_path / "exported" / "config.json").read_text())["_class_name"] == "AutoencoderKL"
    x = torch.rand(1, 3, 8, 8) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(again.decode(again.encode(x).mean), vae.decode(vae.encode(x).mean), rtol=0, atol=0)


# -- refusals, each before anything is written ---------------------------------------------------


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(process="ve"), "only process=ddpm exports"),
        (dict(prediction="score"), "prediction='score' has no diffusers prediction_type"),
        (
            dict(latents=LatentSpace("kl", "channel", torch.zeros(C), torch.tensor([1.0, 2.0, 1.0, 1.0]), None)),
            "normalised per channel; DiTPipeline only divides by one scaling_factor",
        ),
        (dict(net="reference-time"), "cannot hold it exactly. Export it with format 'dit'"),
        (dict(autoencoder="own-vq"), "a VQAutoencoder does not export to diffusers"),
        (dict(id2label={0: "zero"}), "id2label must name the classes 0..9"),
        (
            dict(latents=LatentSpace("vq", "scale", torch.zeros(C), torch.ones(C), torch.randn(8, C))),
            "DiTPipeline decodes KL latents only",
        ),
    ],
)
def test_what_diffusers_cannot_represent_is_refused(kl_folder, tmp_path, change, message):
    from pipeline.autoencoder.build import build_autoencoder
    from pipeline.config import AutoencoderConfig

    args = dict(
        net=_dit(False),
        autoencoder=load_pretrained_autoencoder(kl_folder[1]),
        latents=_latents(),
        process="ddpm",
        beta_schedule="linear",
        timesteps=T,
        prediction="eps",
        id2label=None,
    )
    args.update(change)
    if args["net"] == "reference-time":
        args["net"] = _dit(False, time_embedding="dit")
    if args["autoencoder"] == "own-vq":
        args["autoencoder"] = build_autoencoder(AutoencoderConfig(kind="vq", latent_channels=C), 3)
    with pytest.raises(LatentpipeError, match=message):
        export_dit_pipeline(args.pop("net"), args.pop("autoencoder"), args.pop("latents"), tmp_path / "pipe", **args)
    assert sorted(p.name for p in tmp_path.iterdir()) == [kl_folder[1].name]  # no output, no temporary left


def test_a_non_empty_output_folder_is_refused(kl_folder, tmp_path):
    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "keep.txt").write_text("mine")
    with pytest.raises(LatentpipeError, match="exists and is not an empty folder"):
        export_dit_pipeline(
            _dit(False),
            load_pretrained_autoencoder(kl_folder[1]),
            _latents(),
            tmp_path / "pipe",
            process="ddpm",
            beta_schedule="linear",
            timesteps=T,
            prediction="eps",
        )
    assert [p.name for p in (tmp_path / "pipe").iterdir()] == ["keep.txt"]
