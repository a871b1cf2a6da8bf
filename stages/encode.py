"""Stage `encode`: prepare's shards through the trained autoencoder -> latent shards.

Each input shard ``{split}-%06d.tar`` becomes ``latents/{split}-%06d.tar`` with the same
keys: for VQ the code indices (int16, h x w) of each image, and of its horizontal mirror
(``codes_flip``); for the KL-VAE the posterior mean and log-variance (and their mirrors);
``cls`` when labelled. Ranks take disjoint input shards (rank r: shards r, r + R, ...), so no two
ranks ever write the same file and the output does not depend on the number of ranks.

Per-channel statistics of the continuous latents the diffusion model trains on (the codebook
embeddings for VQ; for KL the posterior samples z = mu + sigma eps, from their exact moments
E[z] = mu and E[z^2] = mu^2 + sigma^2, so no noise is drawn) of the train split give the scale
that brings them to unit variance;
it is stored in the manifest with the codebook (``codebook.safetensors``) and the
autoencoder's hash, next to a published autoencoder's own scaling factor (which
``diffusion.normalize=checkpoint`` uses instead). A rerun skips output shards that are already complete.
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save as safetensors_bytes

from pipeline import artifacts, atomic, config, manifest, stage_registry
from pipeline.data.shards import ShardWriter
from pipeline.data.stream import sequential_batches
from pipeline.runtime.dist import Runtime

SPEC = stage_registry.get("encode")
NAME, SECTIONS, INPUTS = SPEC.name, SPEC.sections, SPEC.inputs

log = logging.getLogger(__name__)


def _npy(array: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array.cpu().numpy(), allow_pickle=False)
    return buffer.getvalue()


@torch.no_grad()
def _encode(
    model, kind: str, images: torch.Tensor
) -> tuple[dict[str, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """(fields to store per image, (E[z], E[z^2]) per latent entry of what training sees): the
    codebook vectors for VQ; posterior samples for KL, whose second moment adds sigma^2 (the
    posterior means alone would understate the spread and overstate the scale)."""
    if kind == "vq":
        quantized = model.encode(images)
        z = quantized.z_q.double()
        return {"codes": quantized.indices.to(torch.int16)}, (z, z.pow(2))
    posterior = model.encode(images)
    mean = posterior.mean.double()
    return {"mean": posterior.mean, "logvar": posterior.logvar}, (mean, mean.pow(2) + posterior.logvar.double().exp())


def _encode_shard(url: Path, out_dir: Path, model, kind: str, cfg: config.Config, device) -> dict:
    """Write one latent shard (atomically, via ShardWriter) and return its statistics."""
    split, index = url.stem.rsplit("-", 1)
    sums = sq_sums = None
    count = 0
    with ShardWriter(out_dir, split, max_count=1 << 40, max_bytes=1 << 62, first_index=int(index)) as writer:
        for batch in sequential_batches(str(url), cfg.encode.batch_size):
            images = batch["image"].to(device)
            fields, (first, second) = _encode(model, kind, images)
            if cfg.encode.flip_twin:
                flipped, _ = _encode(model, kind, images.flip(-1))
                fields.update({f"{name}_flip": value for name, value in flipped.items()})
            sums = first.sum(dim=(0, 2, 3)) if sums is None else sums + first.sum(dim=(0, 2, 3))
            sq_sums = second.sum(dim=(0, 2, 3)) if sq_sums is None else sq_sums + second.sum(dim=(0, 2, 3))
            count += first.shape[0] * first.shape[2] * first.shape[3]
            for i, key in enumerate(batch["key"]):
                sample = {"__key__": key, **{f"{name}.npy": _npy(value[i]) for name, value in fields.items()}}
                if "label" in batch:
                    sample["cls"] = str(int(batch["label"][i])).encode()
                writer.write(sample)
    return {
        "count": count,
        "sum": sums.tolist(),
        "sq_sum": sq_sums.tolist(),
        "images": count // (first.shape[2] * first.shape[3]),
    }


def _drop_foreign_outputs(out_dir: Path, stems: set[str], made_from: dict) -> None:
    """Delete latent shards that a rerun must not reuse: of other inputs/configs, or unfinished."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for stats_file in out_dir.glob("*.stats.json"):
        stem = stats_file.name.removesuffix(".stats.json")
        if stem not in stems or json.loads(stats_file.read_text()).get("made_from") != made_from:
            stats_file.unlink()
    finished = {p.name.removesuffix(".stats.json") for p in out_dir.glob("*.stats.json")}
    for shard in out_dir.glob("*.tar"):
        if shard.stem not in finished:
            shard.unlink()


def run(cfg: config.Config) -> Path:
    runtime = Runtime()
    with manifest.stage_run(cfg, NAME, SECTIONS, INPUTS, is_main=runtime.is_main) as record:
        # every input is verified (sha256) before an output is touched: a refusal changes nothing
        trained = artifacts.TrainedAutoencoder.from_stage_dir(cfg)
        model, kind = trained.load_model(cfg.autoencoder, runtime.device), trained.latent.kind
        prepared = artifacts.PreparedShards.from_stage_dir(cfg)
        out_dir = record.directory / artifacts.EncodedLatents.LATENT_DIR
        inputs = sorted(prepared.files("train") + prepared.files("val"))
        made_from = {
            "inputs": record.inputs,
            "config": config.section_hash(cfg, SECTIONS),
            "autoencoder_sha256": trained.weights_sha256,
        }
        if runtime.is_main:
            _drop_foreign_outputs(out_dir, {url.stem for url in inputs}, made_from)
        runtime.barrier()
        for url in inputs[runtime.rank :: runtime.world_size]:
            stats_file = out_dir / f"{url.stem}.stats.json"
            if stats_file.is_file():
                continue  # finished by an earlier run from the same inputs
            with atomic.disk_full_as_error(f"latent shard {url.name}", out_dir):
                stats = _encode_shard(url, out_dir, model, kind, cfg, runtime.device)
            atomic.write_text(stats_file, json.dumps({**stats, "made_from": made_from}))
        runtime.barrier()
        if runtime.is_main:
            stats = {url.stem: json.loads((out_dir / f"{url.stem}.stats.json").read_text()) for url in inputs}
            train = [s for name, s in stats.items() if name.startswith("train")]
            count = sum(s["count"] for s in train)
            mean = np.sum([s["sum"] for s in train], axis=0) / count
            var = np.sum([s["sq_sum"] for s in train], axis=0) / count - mean**2
            overall_std = float(np.sqrt(var.mean() + np.mean(mean**2) - np.mean(mean) ** 2))
            if kind == "vq":
                codebook = model.codebook
                table = codebook.embed(torch.arange(codebook.num_codes).view(1, -1, 1)).squeeze(-1)[0].T
                atomic.write_bytes(
                    record.directory / artifacts.EncodedLatents.CODEBOOK_FILE,
                    safetensors_bytes({"embeddings": table.detach().cpu().contiguous()}),
                )
                record.add_output(record.directory / artifacts.EncodedLatents.CODEBOOK_FILE)
            for url in inputs:
                record.add_output(out_dir / url.name, split=url.stem.rsplit("-", 1)[0], count=stats[url.stem]["images"])
            fields = ["codes"] if kind == "vq" else ["mean", "logvar"]
            fields += [f"{name}_flip" for name in fields] if cfg.encode.flip_twin else []
            shape = trained.latent
            record.publish(
                artifacts.EncodedLatents(
                    directory=record.directory,
                    latent=artifacts.LatentStats(
                        channels=shape.channels,
                        resolution=shape.resolution,
                        kind=shape.kind,
                        fields=tuple(fields),
                        channel_mean=tuple(mean.tolist()),
                        channel_std=tuple(np.sqrt(var).tolist()),
                        scale=1.0 / overall_std,
                        autoencoder_sha256=trained.weights_sha256,
                        checkpoint_scale=trained.scaling_factor,
                        checkpoint_shift=trained.shift_factor,
                    ),
                )
            )
            record.metrics.update(latent_scale=1.0 / overall_std, train_images=sum(s["images"] for s in train))
        runtime.barrier()
    return record.directory
