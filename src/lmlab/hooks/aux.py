"""Built-in auxiliary losses: regularisers added to the loss with a weight.

Each is `fn(acts, model, **params) -> scalar`: `acts` maps every point its
`at` matched to that point's activation in this forward pass. The manager
multiplies by the entry's `weight`; the loop adds the result to the loss and
logs each on its own `kind: aux` line of metrics.jsonl.
"""

from __future__ import annotations

import fnmatch

import torch

from lmlab.errors import LmlabError
from lmlab.hooks.registry import register


def _mean(values: list[torch.Tensor]) -> torch.Tensor:
    if not values:
        raise LmlabError("This aux loss needs 'at': the hook points whose activations it reads.")
    return torch.stack([v.float() for v in values]).mean()


@register("aux_losses")
def act_l1(acts: dict, model: torch.nn.Module) -> torch.Tensor:
    """Mean absolute activation over the matched points (pushes them towards sparsity)."""
    return _mean([a.abs().mean() for a in acts.values()])


@register("aux_losses")
def act_l2(acts: dict, model: torch.nn.Module) -> torch.Tensor:
    """Mean squared activation over the matched points (keeps them small)."""
    return _mean([a.float().pow(2).mean() for a in acts.values()])


@register("aux_losses", points="*hook_pattern")
def attn_entropy(acts: dict, model: torch.nn.Module) -> torch.Tensor:
    """Mean entropy (nats) of attention patterns; a positive weight pushes them to be sharp."""
    return _mean([-(p * torch.log(p.clamp_min(1e-9))).sum(-1).mean() for p in acts.values()])


@register("aux_losses", points="hook_logits")
def z_loss(acts: dict, model: torch.nn.Module) -> torch.Tensor:
    """Mean squared log-partition log(sum exp logits)^2 (PaLM's z-loss: keeps logits anchored)."""
    return _mean([torch.logsumexp(a.float(), dim=-1).pow(2).mean() for a in acts.values()])


@register("aux_losses")
def weight_orthogonality(acts: dict, model: torch.nn.Module, *,
                         params: str = "*.weight") -> torch.Tensor:
    """Mean ||W W^T - I||_F^2 (smaller Gram) over 2-D weights matching `params`, not embeddings."""
    terms = []
    for name, p in model.network.named_parameters():
        if p.dim() != 2 or not fnmatch.fnmatchcase(name, params) or not model.decay_mask(name, p):
            continue
        w = p.float()
        gram = w @ w.t() if w.shape[0] <= w.shape[1] else w.t() @ w
        if type(gram) is not torch.Tensor:  # maybe sharded by FSDP (imported only then)
            from torch.distributed.tensor import DTensor

            if isinstance(gram, DTensor):
                gram = gram.full_tensor()
        eye = torch.eye(gram.shape[0], device=gram.device)
        terms.append((gram - eye).pow(2).sum())
    if not terms:
        raise LmlabError(f"weight_orthogonality: no 2-D weight matches params='{params}'.")
    return torch.stack(terms).mean()
