"""A diffusion training step on the GPU stand-ins: every backbone x process x prediction.

On ``meta``: the whole step as stages/diffusion.py takes it (label dropout, loss, backward,
AdamW step, EMA update) with the step's CPU generator. On ``fake_cuda``: the loss forward under
bf16 autocast. Both fail on the two bugs of issue 17: the DDPM/NCSN timestep computed on the
CPU table's device, and the noise drawn with a CPU generator onto the model's device.
"""

import pytest
import torch

from pipeline import seeding
from pipeline.diffusion import losses
from pipeline.diffusion.build import LOSSES, drop_labels
from pipeline.diffusion.schedules import DDPM, NCSN, VE, VP, SubVP
from pipeline.networks import build_denoiser
from pipeline.runtime.ema import EMA

CLASSES = 3
PROCESSES = {
    "ddpm": lambda: DDPM.linear(50),
    "vp": VP,
    "subvp": SubVP,
    "ve": VE,
    "ncsn": lambda: NCSN(levels=10),
}
BACKBONES = {
    "dit": {"kind": "dit", "input_size": 8, "in_channels": 4, "patch_size": 2, "width": 32, "depth": 2, "num_heads": 2},
    "unet": {
        "kind": "unet",
        "input_size": 8,
        "in_channels": 4,
        "model_channels": 16,
        "channel_mult": (1, 2),
        "attention_resolutions": (4,),
        "num_head_channels": 16,
        "norm_groups": 8,
    },
}


def _network(backbone: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_denoiser(**BACKBONES[backbone], num_classes=CLASSES)


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(4, 4, 8, 8, generator=g), torch.tensor([0, 1, 2, 0])


@pytest.mark.parametrize("prediction", sorted(LOSSES))
@pytest.mark.parametrize("process", sorted(PROCESSES))
@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_training_step_on_meta(meta, backbone, process, prediction):
    net = meta.module(_network(backbone))
    ema = EMA(net, decay=0.999)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
    x0, labels = (meta.tensor(t) for t in _batch())
    step_generator = seeding.generator(0, "diffusion-step", 0, 0, 0)  # the stage's: on the CPU
    forward_process = PROCESSES[process]()  # built at set-up, on the CPU, as the stage does
    with meta.running():
        y = drop_labels(labels, 0.5, net.null_class, step_generator)
        loss = LOSSES[prediction](net, forward_process, x0, step_generator, y=y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update(net, 1)
    assert loss.device == meta.device and loss.shape == ()
    assert all(p.device == meta.device for p in net.parameters())
    assert all(v.device == meta.device for v in ema.shadow.values())


@pytest.mark.parametrize("process", sorted(PROCESSES))
@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_loss_forward_under_bf16_autocast_on_fake_cuda(fake_cuda, backbone, process):
    """v-prediction: the prediction changes only the regression target, which the meta step covers."""
    net = fake_cuda.module(_network(backbone))
    x0, labels = (fake_cuda.tensor(t) for t in _batch())
    forward_process = PROCESSES[process]()  # built at set-up, on the CPU, as the stage does
    with fake_cuda.running(), fake_cuda.bf16_autocast():
        out = net(x0, fake_cuda.tensor(torch.full((4,), 3.0)), labels)
        loss = LOSSES["v"](net, forward_process, x0, seeding.generator(0, "step"), y=labels)
    assert out.dtype == torch.bfloat16 and out.device == fake_cuda.device
    assert loss.device == fake_cuda.device and loss.dtype == torch.float32


def test_vlb_step_on_meta(meta):
    """The DDPM variational bound as a training term (one-term estimate), backward included."""
    net = meta.module(_network("unet"))
    x0, labels, process = *(meta.tensor(t) for t in _batch()), DDPM.linear(50)
    with meta.running():
        bpd = losses.vlb(net, process, x0.clamp(-1, 1), seeding.generator(0, "vlb"), y=labels)
        bpd.mean().backward()
    assert bpd.shape == (4,) and bpd.device == meta.device
