"""Weight expressions and their maths: against hand-computed values and torch's own BatchNorm and conv2d."""

from __future__ import annotations

import torch
from torch import nn

from serving.engines.tensorrt import mapping as tm


def test_bn_scale_and_shift_hand_computed() -> None:
    weight = torch.tensor([2.0, 3.0])
    var = torch.tensor([3.0, 8.0])
    mean = torch.tensor([1.0, 2.0])
    bias = torch.tensor([0.5, 0.5])
    # eps = 1: sqrt(3 + 1) = 2, sqrt(8 + 1) = 3
    assert torch.equal(tm.bn_scale(weight, var, 1.0), torch.tensor([1.0, 1.0]))
    assert torch.equal(tm.bn_shift(bias, mean, weight, var, 1.0), torch.tensor([-0.5, -1.5]))
    # affine=False: weight ones, bias zeros
    assert torch.allclose(tm.bn_scale(None, var, 1.0), torch.tensor([0.5, 1 / 3]))
    assert torch.allclose(tm.bn_shift(None, mean, None, var, 1.0), torch.tensor([-0.5, -2 / 3]))


def _random_bn(channels: int, eps: float) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(channels, eps=eps).eval()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.uniform_(-1.0, 1.0)
        bn.running_mean.uniform_(-1.0, 1.0)
        bn.running_var.uniform_(1e-4, 1e-2)  # small variances: eps matters
    return bn


def test_bn_fold_uses_the_models_eps_not_the_default() -> None:
    torch.manual_seed(0)
    bn = _random_bn(6, eps=1e-3)
    x = torch.randn(2, 6, 3, 3)
    scale = tm.bn_scale(bn.weight.detach(), bn.running_var, bn.eps)
    shift = tm.bn_shift(bn.bias.detach(), bn.running_mean, bn.weight.detach(), bn.running_var, bn.eps)
    folded = x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
    assert torch.allclose(folded, bn(x), atol=1e-5)
    wrong = tm.bn_scale(bn.weight.detach(), bn.running_var, 1e-5)  # the eps hard-coded by older tools
    assert not torch.allclose(wrong, scale, rtol=1e-2)


def test_conv_bn_fold_matches_conv_then_bn() -> None:
    torch.manual_seed(1)
    conv = nn.Conv2d(3, 5, 3, padding=1, bias=True).eval()
    bn = _random_bn(5, eps=1e-3)
    x = torch.randn(2, 3, 8, 8)
    w = tm.fold_conv_bn_weight(conv.weight.detach(), bn.weight.detach(), bn.running_var, bn.eps)
    b = tm.fold_conv_bn_bias(conv.bias.detach(), bn.bias.detach(), bn.running_mean, bn.weight.detach(),
                             bn.running_var, bn.eps)
    with torch.no_grad():
        expected = bn(conv(x))
        got = torch.nn.functional.conv2d(x, w, b, padding=1)
    assert torch.allclose(got, expected, atol=1e-4)
    # a conv without bias: the fold's bias is beta - mean * scale
    b0 = tm.fold_conv_bn_bias(None, bn.bias.detach(), bn.running_mean, bn.weight.detach(), bn.running_var,
                              bn.eps)
    assert torch.allclose(b0, tm.bn_shift(bn.bias.detach(), bn.running_mean, bn.weight.detach(),
                                          bn.running_var, bn.eps))


def test_transpose_permute_reshape_cast() -> None:
    w = torch.arange(6.0).reshape(2, 3)
    src = {"fc.weight": w}
    t = tm.transpose(tm.Source("fc.weight"), 0, 1, rank=2)
    assert t == tm.Permute(tm.Source("fc.weight"), (1, 0))
    assert torch.equal(tm.evaluate(t, src), torch.tensor([[0.0, 3.0], [1.0, 4.0], [2.0, 5.0]]))
    r = tm.Reshape(t, (6,))
    assert tm.evaluate(r, src).tolist() == [0.0, 3.0, 1.0, 4.0, 2.0, 5.0]
    c = tm.Cast(tm.Source("fc.weight"), torch.float16)
    assert tm.evaluate(c, src).dtype == torch.float16
    rec = tm.WeightRecord("[CONSTANT] w", (3, 2), torch.float32, t)
    out = tm.materialize(rec, src)
    assert out.is_contiguous() and torch.equal(out, w.t())
