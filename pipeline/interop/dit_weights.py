"""DiT weights in and out: the facebookresearch/DiT state dict and diffusers' DiTTransformer2DModel
<-> latentpipe's DiT (pipeline.networks.dit), which is the same network (Peebles & Xie 2023).

Reference code names (``models.py`` of facebookresearch/DiT): ``x_embedder.proj``, ``pos_embed``
(the fixed 2-D sin-cos table, stored), ``t_embedder.mlp.{0,2}``, ``y_embedder.embedding_table``
(num_classes + 1 rows, the last the null class), ``blocks.N.attn.qkv``, ``blocks.N.attn.proj``,
``blocks.N.mlp.fc{1,2}``, ``blocks.N.adaLN_modulation.1``, ``final_layer.adaLN_modulation.1``,
``final_layer.linear`` (p*p*2C outputs with learn_sigma).

diffusers splits ``qkv`` into ``to_q``/``to_k``/``to_v``, keeps one copy of the time and label
embedders in every block (all equal after its own conversion script; refused otherwise), and
differs in two numerical conventions that DiTConfig.time_embedding and DiTConfig.mlp_norm_eps
reproduce: its time sinusoid divides by dim/2 - 1 instead of dim/2, and the layer norm before
each MLP uses its config's norm_eps. A checkpoint therefore loads into a DiT with its own
conventions, and one can be written out only in a format whose conventions it has.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pipeline.errors import LatentpipeError
from pipeline.interop.files import existing, read_state_dict, weight_hashes
from pipeline.networks.dit import DIT_SIZES, DiT, DiTConfig

REFERENCE_RENAMES = [  # ours -> facebookresearch/DiT
    (r"^patch_embed\.proj\.", "x_embedder.proj."),
    (r"^cond\.time\.mlp\.fc1\.", "t_embedder.mlp.0."),
    (r"^cond\.time\.mlp\.fc2\.", "t_embedder.mlp.2."),
    (r"^cond\.label\.table\.", "y_embedder.embedding_table."),
    (r"^blocks\.(\d+)\.ada_ln\.", r"blocks.\1.adaLN_modulation.1."),
    (r"^final\.ada_ln\.", "final_layer.adaLN_modulation.1."),
    (r"^final\.linear\.", "final_layer.linear."),
]
LABEL_TABLE = "cond.label.table.weight"
DIFFUSERS_CLASSES = ("DiTTransformer2DModel", "Transformer2DModel")
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def _reference_name(ours: str) -> str:
    for pattern, replacement in REFERENCE_RENAMES:
        ours = re.sub(pattern, replacement, ours)
    return ours


# -- the facebookresearch/DiT format ----------------------------------------------------------


def to_reference(net: DiT) -> dict[str, Tensor]:
    """The reference code's state dict of ``net`` (loads into its ``DiT_models[...]`` with strict=True)."""
    cfg = net.config
    if cfg.time_embedding != "dit" or cfg.mlp_norm_eps != 1e-6:
        raise LatentpipeError(
            f"this DiT uses time_embedding={cfg.time_embedding!r}, mlp_norm_eps={cfg.mlp_norm_eps}; the "
            f"facebookresearch/DiT format computes 'dit' and 1e-6, so it cannot hold it exactly (export it "
            f"to diffusers instead)"
        )
    state = {_reference_name(name): value.detach().clone() for name, value in net.state_dict().items()}
    state["pos_embed"] = net.get_buffer("pos_embed").detach().clone()
    return state


def reference_config(state: dict[str, Tensor]) -> DiTConfig:
    """The DiTConfig of a reference-format state dict, read off its shapes; the head count, which
    shapes do not show, from the paper's table of sizes."""
    width, in_channels, patch, _ = _need(state, "x_embedder.proj.weight").shape
    depth = len({m[1] for key in state if (m := re.match(r"blocks\.(\d+)\.", key))})
    heads = next((h for (w, d, h) in DIT_SIZES.values() if (w, d) == (width, depth)), None)
    if heads is None:
        raise LatentpipeError(
            f"a DiT of width {width} and depth {depth} is none of the paper's sizes "
            f"{sorted(DIT_SIZES)}, so its head count is unknown: pass its DiTConfig"
        )
    out = _need(state, "final_layer.linear.weight").shape[0] // (patch * patch)
    tokens = _need(state, "pos_embed").shape[1]
    labels = state.get("y_embedder.embedding_table.weight")
    return DiTConfig(
        input_size=math.isqrt(tokens) * patch,
        in_channels=in_channels,
        patch_size=patch,
        width=width,
        depth=depth,
        num_heads=heads,
        mlp_ratio=_need(state, "blocks.0.mlp.fc1.weight").shape[0] / width,
        num_classes=0 if labels is None else labels.shape[0] - 1,
        learn_sigma=out == 2 * in_channels,
    )


def from_reference(state: dict[str, Tensor], config: DiTConfig) -> DiT:
    """A DiT of ``config`` holding the reference-format ``state``; refuses a mismatch naming the key."""
    if config.time_embedding != "dit" or config.mlp_norm_eps != 1e-6:
        raise LatentpipeError(
            "a facebookresearch/DiT checkpoint computes time_embedding='dit' and "
            "mlp_norm_eps=1e-6: set those in the DiT config"
        )
    net = DiT(config)
    names = {_reference_name(name): name for name in net.state_dict()}
    table = state.get("y_embedder.embedding_table.weight")
    if config.num_classes and table is not None and table.shape[0] == config.num_classes:
        # Trained without label dropout (class_dropout_prob=0): no null row. A zero row keeps
        # every real label's output; guidance needs a model trained with the null class.
        state = {**state, "y_embedder.embedding_table.weight": torch.cat([table, table.new_zeros(1, table.shape[1])])}
    if "pos_embed" in state:
        positions = net.get_buffer("pos_embed")
        if state["pos_embed"].shape != positions.shape:
            raise LatentpipeError(
                f"pos_embed has shape {tuple(state['pos_embed'].shape)}, the DiT config needs "
                f"{tuple(positions.shape)} (input_size {config.input_size}, patch {config.patch_size})"
            )
        if not torch.allclose(state["pos_embed"].float(), positions, atol=1e-5):
            raise LatentpipeError(
                "pos_embed is not the fixed 2-D sin-cos table: a learned position "
                "embedding cannot be loaded into latentpipe's DiT"
            )
    _load(
        net,
        {names[key]: value for key, value in state.items() if key in names},
        sorted(set(state) - set(names) - {"pos_embed"}),
        rename=_reference_name,
    )
    return net


# -- diffusers' DiTTransformer2DModel -----------------------------------------------------------


def diffusers_config_of(config: DiTConfig) -> dict[str, Any]:
    """The DiTTransformer2DModel config of a DiT of ``config``."""
    if config.time_embedding != "diffusers":
        raise LatentpipeError(
            "this DiT uses the reference time embedding (time_embedding='dit'); diffusers' "
            "DiTTransformer2DModel always computes its own (10000^(-i/127) frequencies), so it cannot "
            "hold it exactly. Export it with format 'dit', or train with diffusion.dit.time_embedding=diffusers"
        )
    if config.mlp_ratio != 4:
        raise LatentpipeError(f"diffusers' DiTTransformer2DModel has MLP ratio 4; this DiT has {config.mlp_ratio}")
    return dict(
        num_attention_heads=config.num_heads,
        attention_head_dim=config.width // config.num_heads,
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        num_layers=config.depth,
        sample_size=config.input_size,
        patch_size=config.patch_size,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=config.num_classes,
        attention_bias=True,
        norm_type="ada_norm_zero",
        norm_elementwise_affine=False,
        norm_eps=config.mlp_norm_eps,
    )


def config_from_diffusers(config: dict[str, Any]) -> DiTConfig:
    """The DiTConfig of a DiTTransformer2DModel config (refusing the options that do not map)."""
    cls = config.get("_class_name", "DiTTransformer2DModel")
    needs = {
        "norm_type": "ada_norm_zero",
        "activation_fn": "gelu-approximate",
        "attention_bias": True,
        "norm_elementwise_affine": False,
    }
    for key, value in needs.items():
        if config.get(key, value) != value:
            raise LatentpipeError(
                f"a {cls} with {key}={config[key]!r} has no latentpipe DiT equivalent (needs {key}={value!r})"
            )
    heads, head_dim = config.get("num_attention_heads", 16), config.get("attention_head_dim", 72)
    in_channels = config.get("in_channels", 4)
    out_channels = config.get("out_channels") or in_channels
    if out_channels not in (in_channels, 2 * in_channels):
        raise LatentpipeError(
            f"a {cls} with {out_channels} output channels for {in_channels} input channels "
            f"is not a DiT (C or 2C outputs)"
        )
    return DiTConfig(
        input_size=config.get("sample_size", 32),
        in_channels=in_channels,
        patch_size=config.get("patch_size", 2),
        width=heads * head_dim,
        depth=config.get("num_layers", 28),
        num_heads=heads,
        num_classes=config.get("num_embeds_ada_norm") or 0,
        learn_sigma=out_channels == 2 * in_channels,
        time_embedding="diffusers",
        mlp_norm_eps=config.get("norm_eps", 1e-5),
    )


def _diffusers_block_names(i: int) -> dict[str, str]:
    b = f"transformer_blocks.{i}."
    return {
        f"blocks.{i}.ada_ln.": b + "norm1.linear.",
        f"blocks.{i}.attn.proj.": b + "attn1.to_out.0.",
        f"blocks.{i}.mlp.fc1.": b + "ff.net.0.proj.",
        f"blocks.{i}.mlp.fc2.": b + "ff.net.2.",
    }


_DIFFUSERS_EMBEDDERS = {
    "cond.time.mlp.fc1.": "norm1.emb.timestep_embedder.linear_1.",
    "cond.time.mlp.fc2.": "norm1.emb.timestep_embedder.linear_2.",
}
_DIFFUSERS_TOP = {
    "patch_embed.proj.": "pos_embed.proj.",
    "final.ada_ln.": "proj_out_1.",
    "final.linear.": "proj_out_2.",
}


def to_diffusers(net: DiT) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(config, state dict) of the DiTTransformer2DModel that computes what ``net`` computes."""
    config = diffusers_config_of(net.config)
    ours = {name: value.detach() for name, value in net.state_dict().items()}
    out: dict[str, Tensor] = {}
    width = net.config.width
    table = ours.get(LABEL_TABLE)
    if table is None:  # unconditional: diffusers always embeds a label; one zero row changes nothing
        table = ours["patch_embed.proj.bias"].new_zeros(1, width)
    for i in range(net.config.depth):
        for src, dst in _diffusers_block_names(i).items():
            for leaf in ("weight", "bias"):
                out[dst + leaf] = ours[src + leaf].clone()
        for leaf in ("weight", "bias"):
            for name, value in zip("qkv", ours[f"blocks.{i}.attn.qkv.{leaf}"].split(width)):
                out[f"transformer_blocks.{i}.attn1.to_{name}.{leaf}"] = value.clone()
            for src, dst in _DIFFUSERS_EMBEDDERS.items():
                out[f"transformer_blocks.{i}.{dst}{leaf}"] = ours[src + leaf].clone()
        out[f"transformer_blocks.{i}.norm1.emb.class_embedder.embedding_table.weight"] = table.clone()
    for src, dst in _DIFFUSERS_TOP.items():
        for leaf in ("weight", "bias"):
            out[dst + leaf] = ours[src + leaf].clone()
    return config, out


def from_diffusers(config: dict[str, Any], state: dict[str, Tensor], target: DiTConfig | None = None) -> DiT:
    """A DiT holding a DiTTransformer2DModel's weights; ``target`` (the configured preset) must
    agree with the checkpoint, else the offending key is named."""
    found = config_from_diffusers(config)
    if target is not None:
        _same_conventions(found, target, "diffusers DiTTransformer2DModel")
    net = DiT(target or found)
    width = net.config.width
    ours: dict[str, Tensor] = {}
    origin: dict[str, str] = {}  # our name -> the diffusers key it came from (block 0's for shared ones)
    used: set[str] = set()

    def take(key: str) -> Tensor:
        used.add(key)
        return _need(state, key)

    for i in range(net.config.depth):
        b = f"transformer_blocks.{i}."
        for src, dst in _diffusers_block_names(i).items():
            for leaf in ("weight", "bias"):
                ours[src + leaf], origin[src + leaf] = take(dst + leaf), dst + leaf
        for leaf in ("weight", "bias"):
            parts = [take(f"{b}attn1.to_{name}.{leaf}") for name in "qkv"]
            if any(p.shape[0] != width for p in parts):
                raise LatentpipeError(
                    f"{b}attn1.to_q.{leaf} has shape {tuple(parts[0].shape)}, the DiT needs {width} rows per projection"
                )
            ours[f"blocks.{i}.attn.qkv.{leaf}"] = torch.cat(parts)
            origin[f"blocks.{i}.attn.qkv.{leaf}"] = f"{b}attn1.to_q/k/v.{leaf}"
        embedders = {
            src + leaf: b + dst + leaf for src, dst in _DIFFUSERS_EMBEDDERS.items() for leaf in ("weight", "bias")
        }
        embedders[LABEL_TABLE] = b + "norm1.emb.class_embedder.embedding_table.weight"
        for src, dst in embedders.items():
            value = take(dst)
            if src in ours and not torch.equal(ours[src], value):
                raise LatentpipeError(
                    f"{dst} differs from block 0's: latentpipe's DiT shares one time and label "
                    f"embedder between blocks, so this checkpoint cannot be represented"
                )
            ours[src] = value
            origin.setdefault(src, dst)
    for src, dst in _DIFFUSERS_TOP.items():
        for leaf in ("weight", "bias"):
            ours[src + leaf], origin[src + leaf] = take(dst + leaf), dst + leaf
    if not net.config.num_classes:
        if ours[LABEL_TABLE].shape[0] != 1 or ours[LABEL_TABLE].any():
            raise LatentpipeError(
                f"an unconditional DiT can hold only a single all-zero label row ({origin[LABEL_TABLE]} is not)"
            )
        del ours[LABEL_TABLE]
    _load(net, ours, sorted(set(state) - used), rename=lambda name: origin.get(name, name))
    return net


# -- files ------------------------------------------------------------------------------------


def checkpoint_config(path: str | Path) -> DiTConfig:
    """The DiTConfig a DiT checkpoint (diffusers folder or reference-format file) was made with."""
    path = existing(path, "a diffusers DiTTransformer2DModel folder or a facebookresearch/DiT checkpoint")
    if path.is_dir():
        return config_from_diffusers(_diffusers_folder_config(path))
    return reference_config(read_state_dict(path, nested=("ema", "model", "state_dict")))


def _weights_file(folder: Path) -> Path:
    weights = [folder / name for name in DIFFUSERS_WEIGHTS if (folder / name).is_file()]
    if not weights:
        raise LatentpipeError(f"{folder} has config.json but no weights: expected {DIFFUSERS_WEIGHTS[0]}")
    return weights[0]


def checkpoint_sha256(path: str | Path) -> dict[str, str]:
    """file name -> sha256 of the weight file :func:`load_dit` reads at ``path`` (for the manifest)."""
    path = existing(path, "a diffusers DiTTransformer2DModel folder or a facebookresearch/DiT checkpoint")
    if path.is_dir():
        _diffusers_folder_config(path)
        return weight_hashes([_weights_file(_transformer_folder(path))])
    return weight_hashes([path])


def load_dit(path: str | Path, config: DiTConfig | None = None) -> DiT:
    """The DiT at ``path``: a diffusers DiTTransformer2DModel folder (or a DiTPipeline folder's
    transformer/), or a facebookresearch/DiT state dict (.pt weights-only, or .safetensors; a
    training checkpoint gives its EMA weights, as the reference sample.py does).

    ``config``: the DiT the run is configured for; every tensor must have its shape (the first
    that does not is named), and its time_embedding/mlp_norm_eps must be the checkpoint's. None:
    the checkpoint's own (:func:`checkpoint_config`)."""
    path = existing(path, "a diffusers DiTTransformer2DModel folder or a facebookresearch/DiT checkpoint")
    if path.is_dir():
        folder_config = _diffusers_folder_config(path)
        return from_diffusers(folder_config, read_state_dict(_weights_file(_transformer_folder(path))), config)
    state = read_state_dict(path, nested=("ema", "model", "state_dict"))
    if config is None:
        config = reference_config(state)
    _same_conventions(
        dataclasses.replace(config, time_embedding="dit", mlp_norm_eps=1e-6), config, "facebookresearch/DiT checkpoint"
    )
    return from_reference(state, config)


def _transformer_folder(path: Path) -> Path:
    """A DiTPipeline folder's transformer/, or the folder itself."""
    if (path / "model_index.json").is_file() and (path / "transformer").is_dir():
        return path / "transformer"
    return path


def _diffusers_folder_config(path: Path) -> dict[str, Any]:
    path = _transformer_folder(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise LatentpipeError(f"{path} has no config.json: expected a diffusers DiTTransformer2DModel folder")
    config = json.loads(config_file.read_text())
    if config.get("_class_name") not in DIFFUSERS_CLASSES:
        raise LatentpipeError(
            f"{path} holds a diffusers {config.get('_class_name')}, not a DiT: expected DiTTransformer2DModel"
        )
    return config


def _same_conventions(found: DiTConfig, target: DiTConfig, what: str) -> None:
    for key in ("time_embedding", "mlp_norm_eps"):
        if getattr(found, key) != getattr(target, key):
            raise LatentpipeError(
                f"a {what} computes {key}={getattr(found, key)!r}, the DiT config says "
                f"{getattr(target, key)!r}: set diffusion.dit.{key}={getattr(found, key)}"
            )


def _need(state: dict[str, Tensor], key: str) -> Tensor:
    if key not in state:
        raise LatentpipeError(f"the DiT checkpoint lacks {key}")
    return state[key]


def _load(net: DiT, ours: dict[str, Tensor], unexpected: list[str], rename) -> None:
    """Load ``ours`` into ``net`` after checking names and shapes; errors name the checkpoint's keys."""
    if unexpected:
        raise LatentpipeError(
            f"the DiT checkpoint has key(s) latentpipe's DiT has no place for: {', '.join(unexpected[:8])}"
        )
    expected = net.state_dict()
    missing = sorted(set(expected) - set(ours))
    if missing:
        raise LatentpipeError(f"the DiT checkpoint lacks {', '.join(rename(name) for name in missing[:8])}")
    for name, value in expected.items():
        if ours[name].shape != value.shape:
            raise LatentpipeError(
                f"{rename(name)} has shape {tuple(ours[name].shape)}, the DiT config needs "
                f"{tuple(value.shape)}: the checkpoint is another DiT size, patch size, "
                f"latent size, class count or learn_sigma"
            )
    net.load_state_dict({name: value.to(expected[name].dtype) for name, value in ours.items()})
