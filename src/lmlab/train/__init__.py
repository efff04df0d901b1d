"""Training: the run's state and checkpoint (state), one step (step), what watches a run
(observers), the loop (loop), optimizers and the lr schedule (optim), distribution
(distributed), telemetry and TensorBoard. Checkpoint files are written and read in
lmlab.model.checkpoint; devices and dtypes are lmlab.device."""
