"""Training runtime: the only package that imports accelerate / deepspeed / torch.distributed
(``dist``), plus checkpoints, preemption, metric logging and progress, and the training toolkit
(``training``: the TrainState and TrainingLoop every training stage is built on)."""
