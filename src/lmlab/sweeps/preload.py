"""Imported once by the local executor's forkserver, so each forked run starts with torch,
its optimizers (which import torch._dynamo), transformers (the manifest records its
version) and the training loop already loaded: on 2 busy cores these imports take 5-15 s,
far longer than a short run's training."""

import safetensors  # noqa: F401
import torch._dynamo  # noqa: F401 - torch.optim imports it on the first optimizer
import torch.optim  # noqa: F401
import transformers  # noqa: F401

import lmlab.sweeps.worker  # noqa: F401
import lmlab.train.loop  # noqa: F401
