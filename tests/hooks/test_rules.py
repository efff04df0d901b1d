"""Learning rules (hooks/rules.py), each proven against its own definition.

Every expected gradient here is computed by the test from the rule's
definition (autograd on the plain model, a feedback matrix built by hand), not
by calling the rule's code.
"""

from __future__ import annotations

import torch

from lmlab.config import from_dict
from lmlab.eval.metrics import cross_entropy
from lmlab.hooks.api import hooked

from .conftest import tiny_adapter

# --- today's feedback_alignment on the MLPs: behaviour and config hash pinned -------------

MLP_FA = {"name": "feedback_alignment", "at": "blocks.*.mlp.*", "seed": 5}
# recorded with the MLP-only feedback_alignment before the rules were generalised (6aab838)
PINNED_LOSSES = ["0x1.25db000000000p+2", "0x1.0fd8580000000p+2", "0x1.fd9e1e0000000p+1",
                 "0x1.df48200000000p+1", "0x1.c112660000000p+1", "0x1.a0b9560000000p+1"]
PINNED_HASH = "19e5338c2bbe9efa"


def test_mlp_feedback_alignment_keeps_its_losses_and_hash():
    a = tiny_adapter(seed=1)
    x = torch.randint(0, 97, (4, 16), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(a.parameters(), lr=1e-2)
    losses = []
    with hooked(a, {"backward": [MLP_FA]}):
        for _ in range(6):
            loss = cross_entropy(a(x)[:, :-1], x[:, 1:])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float.hex(loss.item()))
    assert losses == PINNED_LOSSES
    assert from_dict({"hooks": {"backward": [MLP_FA]}}).hash() == PINNED_HASH
