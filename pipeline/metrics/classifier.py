"""Classifier accuracy of class-conditional samples: the quick, cheap quality signal for digits.

A small CNN (three conv-pool-BN-ReLU blocks of 16/32/64 channels, one linear layer) is
trained on the real train split of a labelled shard set and tested on its real val split. A
generated image of class y that this classifier labels y looks like a y to a network that
reads real ones; its accuracy on the real val images is the ceiling to compare against.
This is the "classification accuracy score" idea in its cheap direction (Ravuri & Vinyals
2019 train on samples and test on real images; here, as in many conditional-GAN papers, a
classifier trained on real images scores the samples).

Trained once and cached: ``<directory>/<key>.safetensors`` holds the weights, and its
metadata the val accuracy (overall and per class) and the JSON the key hashes: the shard
set's identity (the prepare manifest's shard hashes), the training :class:`Settings` and
the architecture version. Written atomically (pipeline.atomic), read with safetensors (no
unpickling). Training is seeded by ``Settings.seed`` alone, not the experiment's seed: the
classifier is a measuring instrument and stays the same across the experiments it compares.

Measured on the default 5,000 MNIST digits (4,527 train / 473 val, 32x32 gray), 2 CPU
threads: see ``tests/metrics/test_classifier.py`` and docs/benchmarks.md.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import Tensor, nn

from pipeline import atomic
from pipeline.data.stream import sequential_batches
from pipeline.metrics.images import as_network_input
from pipeline.seeding import derive_seed, generator, randint, randperm

ARCHITECTURE = "cnn-16-32-64-pool-bn-v1"
"""Names the network in the cache key; change it with :class:`Classifier`."""


@dataclass(frozen=True)
class Settings:
    """How the classifier is trained (all part of the cache key)."""

    steps: int = 400
    """Optimiser steps."""
    batch_size: int = 128
    learning_rate: float = 5e-3
    """Peak of the one-cycle schedule (AdamW)."""
    max_shift: int = 2
    """Random translations of up to this many pixels (each axis) as augmentation."""
    seed: int = 0


class Classifier(nn.Module):
    """images (N, C, H, W) in [-1, 1] -> class logits (N, num_classes); any H, W >= 4.

    Each block pools right after its convolution, so batch norm and ReLU run on a quarter of
    the positions (about half the CPU time of conv-BN-ReLU-pool, same accuracy on digits).
    """

    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        widths = (channels, 16, 32, 64)
        blocks = []
        for i, (c_in, c_out) in enumerate(zip(widths, widths[1:])):
            pool = nn.MaxPool2d(2) if i < len(widths) - 2 else nn.AdaptiveAvgPool2d(4)
            blocks += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), pool, nn.BatchNorm2d(c_out), nn.ReLU()]
        self.features = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.25), nn.Linear(widths[-1] * 16, num_classes))

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.features(images))


@dataclass(frozen=True)
class Trained:
    """A classifier with its accuracy on the real val images it was tested on."""

    model: Classifier
    val_accuracy: float
    val_per_class: dict[int, float]
    key: str


def labelled_images(pattern: str, batch_size: int = 500) -> tuple[Tensor, Tensor]:
    """Every (image, label) of a shard set, in memory: images float (N, C, H, W) in [-1, 1].
    Meant for the small labelled sets this classifier is for (digits, CIFAR-size)."""
    images, labels = [], []
    for batch in sequential_batches(pattern, batch_size):
        if "label" not in batch:
            raise ValueError(f"the shards {pattern} carry no class labels ('cls'); the classifier needs labelled data")
        images.append(batch["image"])
        labels.append(torch.as_tensor(batch["label"]))
    return torch.cat(images), torch.cat(labels).long()


def _shifted(x: Tensor, max_shift: int, gen: torch.Generator) -> Tensor:
    """Each image translated by its own integer offset in [-max_shift, max_shift]^2, edges
    repeated (grid_sample with nearest sampling and border padding)."""
    n, _, h, w = x.shape
    shift = (randint(2 * max_shift + 1, (n, 2), gen, device=x.device) - max_shift).float()
    theta = torch.zeros(n, 2, 3, device=x.device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    theta[:, 0, 2], theta[:, 1, 2] = 2 * shift[:, 0] / w, 2 * shift[:, 1] / h
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="border", align_corners=False)


def train(images: Tensor, labels: Tensor, num_classes: int, settings: Settings) -> Classifier:
    """A classifier trained on (images, labels) with AdamW and a one-cycle schedule."""
    with torch.random.fork_rng(devices=[]):  # initial weights from the settings' seed, global state untouched
        torch.manual_seed(derive_seed(settings.seed, "classifier-init"))
        model = Classifier(images.shape[1], num_classes).to(images.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, settings.learning_rate, total_steps=settings.steps)
    gen = generator(settings.seed, "classifier-batches")
    order, position = randperm(len(images), gen, device=images.device), 0
    model.train()
    for step in range(settings.steps):
        if position + settings.batch_size > len(order):
            order, position = randperm(len(images), gen, device=images.device), 0
        index = order[position : position + settings.batch_size]
        position += settings.batch_size
        torch.manual_seed(derive_seed(settings.seed, "classifier-dropout", step))
        loss = F.cross_entropy(model(_shifted(images[index], settings.max_shift, gen)), labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return model.eval()


@torch.no_grad()
def predict(model: Classifier, images: Tensor | Any, batch_size: int = 500) -> Tensor:
    """Predicted classes (N,) of uint8 (N, H, W, C) or float (N, C, H, W) images in [-1, 1]."""
    model.eval()
    device = next(model.parameters()).device
    images = as_network_input(images)
    return torch.cat(
        [model(images[i : i + batch_size].to(device)).argmax(1).cpu() for i in range(0, len(images), batch_size)]
    )


def accuracy(model: Classifier, images: Tensor | Any, labels: Tensor | Any, batch_size: int = 500) -> dict:
    """How often the classifier finds the intended class: ``{"accuracy": float, "per_class":
    {class: accuracy of the images of that class}, "count": N}``; ``labels`` (N,) are the
    intended classes (the true ones for real images, the requested ones for samples)."""
    labels = torch.as_tensor(labels).long().cpu()
    correct = predict(model, images, batch_size) == labels
    per_class = {int(c): float(correct[labels == c].float().mean()) for c in labels.unique()}
    return {"accuracy": float(correct.float().mean()), "per_class": per_class, "count": len(labels)}


def _key_inputs(source: Mapping[str, Any], settings: Settings, num_classes: int) -> str:
    return json.dumps(
        {"source": source, "settings": asdict(settings), "architecture": ARCHITECTURE, "num_classes": num_classes},
        sort_keys=True,
        separators=(",", ":"),
    )


def load_or_train(
    directory: str | Path,
    source: Mapping[str, Any],
    train_pattern: str,
    val_pattern: str,
    num_classes: int,
    settings: Settings = Settings(),
) -> Trained:
    """The cached classifier of ``(source, settings)``, or on a miss: one trained on the
    shards ``train_pattern``, tested on ``val_pattern``, and stored.

    ``source`` identifies the shards' content (e.g. their sha256s); the patterns are read
    only on a miss, so a cached classifier costs no reading of images.
    """
    inputs = _key_inputs(source, settings, num_classes)
    key = hashlib.sha256(inputs.encode()).hexdigest()
    file = Path(directory) / f"{key}.safetensors"
    if file.is_file():
        with safe_open(str(file), framework="pt") as handle:
            meta = handle.metadata()
        model = Classifier(int(meta["channels"]), num_classes)
        model.load_state_dict(load_file(file))
        scores = json.loads(meta["val"])
        return Trained(model.eval(), scores["accuracy"], {int(c): a for c, a in scores["per_class"].items()}, key)
    model = train(*labelled_images(train_pattern), num_classes, settings)
    val_images, val_labels = labelled_images(val_pattern)
    scores = accuracy(model, val_images, val_labels)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {"inputs": inputs, "channels": str(val_images.shape[1]), "val": json.dumps(scores)}
    atomic.write_bytes(file, safetensors_bytes(state, metadata=meta))
    return Trained(model, scores["accuracy"], scores["per_class"], key)
