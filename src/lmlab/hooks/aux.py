"""Built-in auxiliary losses: regularisers added to the loss with a weight."""

from __future__ import annotations

import torch

from lmlab.hooks.registry import register


@register("aux_losses")
def attn_entropy(acts: dict, model: torch.nn.Module) -> torch.Tensor:
    """Mean entropy (nats) of attention patterns; a positive weight pushes them to be sharp."""
    ents = [-(p * torch.log(p.clamp_min(1e-9))).sum(-1).mean() for p in acts.values()]
    return torch.stack(ents).mean()
