"""The two image layouts: stored uint8 (N, H, W, C) and network float (N, C, H, W) in [-1, 1]."""

import torch

from pipeline.metrics.images import as_network_input, to_uint8


def test_stored_images_round_trip_through_the_network_layout():
    stored = torch.randint(0, 256, (3, 5, 4, 2), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    assert (to_uint8(as_network_input(stored)) == stored.numpy()).all()


def test_to_uint8_clamps_and_rounds_like_an_image_file():
    x = torch.tensor([-2.0, -1.0, 0.0, 0.004, 1.0, 3.0]).view(1, 1, 1, 6)
    assert to_uint8(x).ravel().tolist() == [0, 0, 128, 128, 255, 255]  # 127.5 rounds half to even: 128
