"""DiT weights in and out: a random diffusers DiTTransformer2DModel loaded into latentpipe's DiT
gives its outputs; exported back, diffusers gives ours again; the facebookresearch/DiT format
round-trips; mismatches are refused naming the key."""

import dataclasses

import diffusers  # in the test extra: a missing install fails rather than skips
import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline.errors import LatentpipeError
from pipeline.interop import (
    checkpoint_config,
    export_dit_transformer,
    export_reference_dit,
    load_dit,
)
from pipeline.interop.dit_weights import from_diffusers, reference_config, to_reference
from pipeline.networks import build_denoiser
from pipeline.networks.dit import DiT, DiTConfig

from .conftest import randomise

TOL = dict(rtol=0, atol=1e-5)
C, SIZE, CLASSES = 4, 8, 10


def _diffusers_dit(learn_sigma: bool, num_classes: int = CLASSES, seed: int = 0, norm_eps: float = 1e-5):
    """A random DiTTransformer2DModel whose blocks share one time/label embedder (as every DiT
    converted by diffusers' script does)."""
    model = diffusers.DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=C,
        out_channels=2 * C if learn_sigma else C,
        num_layers=3,
        sample_size=SIZE,
        patch_size=2,
        num_embeds_ada_norm=num_classes,
        norm_eps=norm_eps,
    )
    randomise(model, seed)
    shared = model.transformer_blocks[0].norm1.emb.state_dict()
    for block in model.transformer_blocks[1:]:
        block.norm1.emb.load_state_dict(shared)
    return model


def _inputs(batch: int = 5, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, C, SIZE, SIZE, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    y = torch.randint(0, CLASSES + 1, (batch,), generator=g)  # the null class included
    return x, t, y


def _theirs(model, x, t, y):
    with torch.no_grad():
        return model(x, timestep=t, class_labels=y).sample


def _ours(net, x, t, y):
    with torch.no_grad():
        return net.eval()(x, t, y)


@pytest.mark.parametrize("learn_sigma", [False, True])
@pytest.mark.parametrize("norm_eps", [1e-5, 1e-6])
def test_diffusers_dit_loads_with_identical_outputs_and_exports_back(tmp_path, learn_sigma, norm_eps):
    model = _diffusers_dit(learn_sigma, norm_eps=norm_eps)
    model.save_pretrained(tmp_path / "dit")
    net = load_dit(tmp_path / "dit")
    assert net.config.learn_sigma == learn_sigma and net.config.num_classes == CLASSES
    assert net.config.time_embedding == "diffusers" and net.config.mlp_norm_eps == norm_eps
    x, t, y = _inputs()
    reference = _theirs(model, x, t, y)
    assert reference.shape == (5, 2 * C if learn_sigma else C, SIZE, SIZE)
    torch.testing.assert_close(_ours(net, x, t, y), reference, **TOL)

    export_dit_transformer(net, tmp_path / "out")
    again = diffusers.DiTTransformer2DModel.from_pretrained(tmp_path / "out").eval()
    torch.testing.assert_close(_theirs(again, x, t, y), reference, **TOL)


def test_unconditional_dit_exports_as_one_zero_label_row(tmp_path):
    net = randomise(
        build_denoiser(
            "dit",
            in_channels=C,
            input_size=SIZE,
            patch_size=2,
            width=32,
            depth=2,
            num_heads=2,
            num_classes=0,
            time_embedding="diffusers",
            mlp_norm_eps=1e-5,
        ),
        2,
    )
    x, t, _ = _inputs()
    export_dit_transformer(net, tmp_path / "out")
    theirs = diffusers.DiTTransformer2DModel.from_pretrained(tmp_path / "out").eval()
    torch.testing.assert_close(_theirs(theirs, x, t, torch.zeros_like(t)), _ours(net, x, t, None), **TOL)
    again = load_dit(tmp_path / "out")
    assert again.config.num_classes == 0
    torch.testing.assert_close(_ours(again, x, t, None), _ours(net, x, t, None), rtol=0, atol=0)


def test_the_two_time_conventions_really_differ():
    """Why DiTConfig.time_embedding exists: the same weights under the other sinusoid differ."""
    model = _diffusers_dit(False)
    x, t, y = _inputs()
    ours = from_diffusers(dict(model.config), model.state_dict())
    other = DiT(dataclasses.replace(ours.config, time_embedding="dit"))
    other.load_state_dict(ours.state_dict())
    assert (_ours(other, x, t, y) - _theirs(model, x, t, y)).abs().max() > 1e-3


@pytest.mark.parametrize("learn_sigma", [False, True])
@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_reference_format_round_trip(tmp_path, learn_sigma, suffix):
    net = randomise(
        build_denoiser(
            "dit", "S/2", in_channels=C, input_size=SIZE, depth=2, num_classes=CLASSES, learn_sigma=learn_sigma
        ),
        3,
    )
    path = export_reference_dit(net, tmp_path / f"DiT-S-2{suffix}")
    state = torch.load(path, weights_only=True) if suffix == ".pt" else load_file(path)
    assert {
        "x_embedder.proj.weight",
        "pos_embed",
        "t_embedder.mlp.0.weight",
        "t_embedder.mlp.2.bias",
        "y_embedder.embedding_table.weight",
        "blocks.1.attn.qkv.weight",
        "blocks.1.adaLN_modulation.1.weight",
        "final_layer.adaLN_modulation.1.bias",
        "final_layer.linear.weight",
    } <= set(state)
    assert state["y_embedder.embedding_table.weight"].shape[0] == CLASSES + 1
    assert state["final_layer.linear.weight"].shape[0] == 4 * (2 * C if learn_sigma else C)
    # S/2 at depth 2 is no paper size: the head count must come from the config
    with pytest.raises(LatentpipeError, match="head count is unknown: pass its DiTConfig"):
        checkpoint_config(path)
    again = load_dit(path, net.config)
    x, t, y = _inputs()
    torch.testing.assert_close(_ours(again, x, t, y), _ours(net, x, t, y), rtol=0, atol=0)


def test_reference_config_is_read_off_a_paper_size_checkpoint():
    config = DiTConfig(
        input_size=16, in_channels=4, patch_size=4, width=384, depth=12, num_heads=6, num_classes=1000, learn_sigma=True
    )
    with torch.device("meta"):
        state = to_reference(DiT(config))
    assert reference_config(state) == config


def test_training_checkpoint_gives_its_ema_weights(tmp_path):
    net = randomise(build_denoiser("dit", "S/2", in_channels=C, input_size=SIZE, depth=1, num_classes=CLASSES), 4)
    other = randomise(build_denoiser("dit", "S/2", in_channels=C, input_size=SIZE, depth=1, num_classes=CLASSES), 5)
    torch.save({"model": to_reference(other), "ema": to_reference(net), "opt": {}}, tmp_path / "0400000.pt")
    loaded = load_dit(tmp_path / "0400000.pt", net.config)
    x, t, y = _inputs()
    torch.testing.assert_close(_ours(loaded, x, t, y), _ours(net, x, t, y), rtol=0, atol=0)


# -- refusals ------------------------------------------------------------------------------------


def test_shape_mismatch_names_the_offending_key(tmp_path):
    net = build_denoiser("dit", "S/2", in_channels=C, input_size=SIZE, depth=2, num_classes=CLASSES)
    path = export_reference_dit(net, tmp_path / "dit.pt")
    with pytest.raises(
        LatentpipeError,
        match=r"y_embedder.embedding_table.weight has shape \(11, 384\), the DiT "
        r"config needs \(101, 384\)",
    ):
        load_dit(path, dataclasses.replace(net.config, num_classes=100))
    with pytest.raises(
        LatentpipeError,
        match=r"final_layer.linear.weight has shape \(16, 384\), the DiT config "
        r"needs \(32, 384\)",
    ):
        load_dit(path, dataclasses.replace(net.config, learn_sigma=True))
    with pytest.raises(
        LatentpipeError, match=r"pos_embed has shape \(1, 16, 384\), the DiT config needs \(1, 64, 384\)"
    ):
        load_dit(path, dataclasses.replace(net.config, input_size=16))


def test_diffusers_shape_mismatch_names_the_diffusers_key(tmp_path):
    _diffusers_dit(True).save_pretrained(tmp_path / "dit")
    found = checkpoint_config(tmp_path / "dit")
    with pytest.raises(
        LatentpipeError, match=r"proj_out_2.weight has shape \(32, 32\), the DiT config needs \(16, 32\)"
    ):
        load_dit(tmp_path / "dit", dataclasses.replace(found, learn_sigma=False))


def test_conventions_must_match_the_checkpoint(tmp_path):
    _diffusers_dit(False).save_pretrained(tmp_path / "dit")
    found = checkpoint_config(tmp_path / "dit")
    with pytest.raises(
        LatentpipeError, match="computes time_embedding='diffusers'.*set diffusion.dit.time_embedding=diffusers"
    ):
        load_dit(tmp_path / "dit", dataclasses.replace(found, time_embedding="dit"))
    net = build_denoiser("dit", "S/2", in_channels=C, input_size=SIZE, depth=1, num_classes=CLASSES)
    with pytest.raises(LatentpipeError, match="cannot hold it exactly. Export it with format 'dit'"):
        export_dit_transformer(net, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(LatentpipeError, match="facebookresearch/DiT format computes 'dit' and 1e-6"):
        export_reference_dit(load_dit(tmp_path / "dit"), tmp_path / "dit.pt")


def test_blocks_with_different_embedders_are_refused(tmp_path):
    model = _diffusers_dit(False)
    with torch.no_grad():
        model.transformer_blocks[2].norm1.emb.timestep_embedder.linear_1.bias.add_(1.0)
    model.save_pretrained(tmp_path / "dit")
    with pytest.raises(
        LatentpipeError, match="transformer_blocks.2.norm1.emb.timestep_embedder.linear_1.bias differs from block 0's"
    ):
        load_dit(tmp_path / "dit")


def test_missing_keys_and_wrong_folders_are_named(tmp_path):
    _diffusers_dit(False).save_pretrained(tmp_path / "dit")
    weights = tmp_path / "dit" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    del state["transformer_blocks.1.ff.net.2.bias"]
    save_file(state, weights)
    with pytest.raises(LatentpipeError, match="lacks transformer_blocks.1.ff.net.2.bias"):
        load_dit(tmp_path / "dit")
    with pytest.raises(LatentpipeError, match="does not exist: expected a diffusers DiTTransformer2DModel folder"):
        load_dit(tmp_path / "absent")
    diffusers.AutoencoderKL(block_out_channels=(32,), norm_num_groups=32).save_pretrained(tmp_path / "vae")
    with pytest.raises(
        LatentpipeError, match="holds a diffusers AutoencoderKL, not a DiT: expected DiTTransformer2DModel"
    ):
        load_dit(tmp_path / "vae")
