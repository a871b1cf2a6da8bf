"""The sample classifier: >= 97% on the real MNIST val digits with its defaults, cached by its
inputs, the same answer for uint8 and float images."""

import time

import numpy as np
import pytest
import torch

from pipeline import config
from pipeline.metrics import classifier
from stages import prepare


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """The default data (5,000 MNIST digits, 32x32 gray) prepared into shards."""
    cfg = config.load(overrides=[f"experiment.runs_dir={tmp_path_factory.mktemp('runs')}", "data.workers=0"])
    return prepare.run(cfg)


def test_default_classifier_reads_real_digits_and_is_cached(digits, tmp_path):
    start = time.perf_counter()
    trained = classifier.load_or_train(
        tmp_path, {"shards": "mnist-default"}, str(digits / "train-*.tar"), str(digits / "val-*.tar"), num_classes=10
    )
    print(f"classifier: {time.perf_counter() - start:.1f}s, val accuracy {trained.val_accuracy:.4f}")
    assert trained.val_accuracy >= 0.97
    assert set(trained.val_per_class) == set(range(10)) and min(trained.val_per_class.values()) >= 0.9
    # a hit reads no shards (the patterns point nowhere) and gives back the same network
    hit = classifier.load_or_train(
        tmp_path, {"shards": "mnist-default"}, "/nonexistent/train-*.tar", "/nonexistent/val-*.tar", num_classes=10
    )
    assert hit.key == trained.key and hit.val_accuracy == trained.val_accuracy
    assert hit.val_per_class == trained.val_per_class
    images, labels = classifier.labelled_images(str(digits / "val-*.tar"))
    assert classifier.accuracy(hit.model, images, labels)["accuracy"] == trained.val_accuracy
    # one cache file, written once
    assert len(list(tmp_path.glob("*.safetensors"))) == 1


def test_uint8_and_float_images_score_the_same(digits, tmp_path):
    images, labels = classifier.labelled_images(str(digits / "val-*.tar"))
    trained = classifier.load_or_train(
        tmp_path,
        {"shards": "mnist-short"},
        str(digits / "train-*.tar"),
        str(digits / "val-*.tar"),
        10,
        classifier.Settings(steps=20),
    )
    as_uint8 = ((images + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert torch.equal(classifier.predict(trained.model, as_uint8), classifier.predict(trained.model, images))
    scores = classifier.accuracy(trained.model, as_uint8, np.asarray(labels))
    assert scores["count"] == len(labels) and set(scores["per_class"]) <= set(range(10))
    overall = sum(scores["per_class"][c] * int((labels == c).sum()) for c in scores["per_class"]) / len(labels)
    assert overall == pytest.approx(scores["accuracy"])


def test_training_is_seeded(digits):
    images, labels = classifier.labelled_images(str(digits / "val-*.tar"))
    settings = classifier.Settings(steps=3, batch_size=16)
    a, b = (classifier.train(images, labels, 10, settings) for _ in range(2))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_unlabelled_shards_are_refused_with_the_reason(tmp_path):
    from PIL import Image

    from pipeline.data.shards import ShardWriter, encode_image, make_sample

    with ShardWriter(tmp_path, "train", max_count=10, max_bytes=1 << 20) as writer:
        writer.write(make_sample("a", encode_image(Image.new("L", (8, 8)), "png", 95), "png", None, {}))
    with pytest.raises(ValueError, match="no class labels"):
        classifier.labelled_images(str(tmp_path / "train-*.tar"))
