"""Training: the loop, optimizers and schedules, checkpoints, devices and distribution."""
