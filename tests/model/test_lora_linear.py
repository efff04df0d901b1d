"""The fused LoRA layer computes what PEFT's layer computes, and steps aside where it would not."""

from __future__ import annotations

import torch

from lmlab.model.lora_linear import lora_linear, use_fused_lora

from .test_fast_finetune import IDX, shared  # noqa: F401  (the registry fixture)
from .test_lora import lora_adapter, randomise_lora


def _loss_and_grads(adapter, dtype=None):
    x, y = IDX[:, :-1], IDX[:, 1:]
    adapter.zero_grad()
    with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
        loss = adapter(x, targets=y)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in adapter.named_parameters()
                           if p.requires_grad}


def test_lora_linear_equals_its_definition_with_bias() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 8, generator=g, requires_grad=True)
    w, bias = torch.randn(6, 8, generator=g), torch.randn(6, generator=g)
    a = torch.randn(3, 8, generator=g, requires_grad=True)
    b = torch.randn(6, 3, generator=g, requires_grad=True)
    gy = torch.randn(2, 5, 6, generator=g)
    ours = lora_linear(x, w, bias, a, b, 0.5)
    got = torch.autograd.grad(ours, (x, a, b), gy)
    ref = x @ w.T + bias + 0.5 * (x @ a.T) @ b.T
    want = torch.autograd.grad(ref, (x, a, b), gy)
    torch.testing.assert_close(ours, ref)
    for o, r in zip(got, want, strict=True):
        torch.testing.assert_close(o, r)


def test_fused_lora_model_equals_peft_in_loss_and_every_gradient(shared) -> None:  # noqa: F811
    peft_path, fused = lora_adapter(shared, "tiny").train(), lora_adapter(shared, "tiny").train()
    randomise_lora(peft_path)
    fused.load_state_dict(peft_path.state_dict())  # PEFT draws A at random
    assert use_fused_lora(fused.model) == 8  # q, v, o, down in each of the 2 layers
    want_loss, want = _loss_and_grads(peft_path)
    loss, got = _loss_and_grads(fused)
    torch.testing.assert_close(loss, want_loss)
    assert got.keys() == want.keys()
    for n in want:
        torch.testing.assert_close(got[n], want[n])
    # under bf16 autocast: float32 gradients, no further from the float32 ones than PEFT's
    peft_loss, peft_bf16 = _loss_and_grads(peft_path, torch.bfloat16)
    loss, got = _loss_and_grads(fused, torch.bfloat16)
    assert abs(loss - want_loss) <= abs(peft_loss - want_loss) + 1e-3
    for n in want:
        assert got[n].dtype == torch.float32
        ours, theirs = (got[n] - want[n]).norm(), (peft_bf16[n] - want[n]).norm()
        assert ours <= 1.25 * theirs + 1e-3 * want[n].norm(), n


def test_a_hooked_linear_or_dropout_goes_through_peft(shared) -> None:  # noqa: F811
    adapter = lora_adapter(shared, "tiny").train()
    randomise_lora(adapter)
    use_fused_lora(adapter.model)
    q = adapter.model.model.layers[0].self_attn.q_proj
    seen = []
    handle = q.base_layer.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    adapter(IDX[:, :-1])
    assert len(seen) == 1  # a learning rule's hook on the frozen linear still fires
    handle.remove()
    adapter(IDX[:, :-1])
    assert len(seen) == 1  # unhooked, the fused step skips the module call
    q.lora_dropout["default"] = torch.nn.Dropout(0.5)
    calls = []
    q.lora_dropout["default"].register_forward_hook(lambda m, i, o: calls.append(1))
    adapter(IDX[:, :-1])
    assert calls == [1]
    q.lora_dropout["default"] = torch.nn.Identity()
    q.base_layer.weight.requires_grad_(True)  # a trained base weight needs PEFT's own path
    adapter(IDX[:, :-1], targets=IDX[:, 1:]).backward()
    assert q.base_layer.weight.grad is not None
