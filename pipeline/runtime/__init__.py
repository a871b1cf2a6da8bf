"""Training runtime: the only package that imports accelerate / deepspeed / torch.distributed
(``dist``), plus checkpoints, preemption and metric logging used by every training stage."""
