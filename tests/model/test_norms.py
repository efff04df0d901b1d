import pytest
import torch

from lmlab.model.norms import RMSNorm, _RMSNormFunction


@pytest.mark.parametrize("shape,eps", [((3, 7, 16), 1e-5), ((2, 4, 5, 8), None)])
def test_rmsnorm_forward_and_backward_equal_torchs(shape, eps):
    torch.manual_seed(0)
    ours, theirs = RMSNorm(shape[-1], eps=eps), torch.nn.RMSNorm(shape[-1], eps=eps)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        theirs.weight.copy_(ours.weight)
    x = torch.randn(shape, requires_grad=True)
    g = torch.randn(shape)
    y1, y2 = ours(x), theirs(x)
    d1 = torch.autograd.grad(y1, (x, ours.weight), g)
    d2 = torch.autograd.grad(y2, (x, theirs.weight), g)
    torch.testing.assert_close(y1, y2, rtol=0, atol=1e-6)
    torch.testing.assert_close(d1[0], d2[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(d1[1], d2[1], rtol=0, atol=1e-5)
    inputs = (x.double().detach().requires_grad_(), ours.weight.double().detach().requires_grad_())
    assert torch.autograd.gradcheck(lambda a, w: _RMSNormFunction.apply(a, w, 1e-5), inputs)


def test_rmsnorm_keeps_the_input_dtype_and_computes_in_float32():
    norm = RMSNorm(8, eps=1e-5)
    x = (torch.randn(4, 8) * 100).bfloat16().requires_grad_()
    y = norm(x)
    assert y.dtype == torch.bfloat16
    expected = x.float() * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + 1e-5)
    torch.testing.assert_close(y.float(), expected.bfloat16().float())
    y.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and norm.weight.grad.dtype == torch.float32
