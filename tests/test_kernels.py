import torch
from torch import nn

from fxopt import kernels
from fxopt.testing import randomize_norm_stats


def test_batch_norm_affine_matches_eval_batch_norm():
    bn = randomize_norm_stats(nn.BatchNorm2d(5), seed=4).eval()
    bn.eps = 1e-3
    x = torch.randn(2, 5, 3, 3)
    affine = kernels.batch_norm_affine(bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
    y = x.double() * affine.scale.view(1, -1, 1, 1) + affine.shift.view(1, -1, 1, 1)
    torch.testing.assert_close(y.float(), bn(x), rtol=1e-5, atol=1e-6)


def test_batch_norm_affine_without_affine_parameters():
    bn = randomize_norm_stats(nn.BatchNorm1d(3, affine=False), seed=2).eval()
    affine = kernels.batch_norm_affine(bn.running_mean, bn.running_var, None, None, bn.eps)
    x = torch.randn(4, 3)
    torch.testing.assert_close((x.double() * affine.scale + affine.shift).float(), bn(x), rtol=1e-5, atol=1e-6)


def test_fold_affine_after_keeps_dtype_and_computes_in_float64():
    conv = nn.Conv2d(2, 4, 3, groups=2).to(torch.float16)
    affine = kernels.ChannelAffine(torch.full((4,), 3.0, dtype=torch.float64), torch.arange(4, dtype=torch.float64))
    weight, bias = kernels.fold_affine_after(conv.weight, None, affine)
    assert weight.dtype == bias.dtype == torch.float16
    torch.testing.assert_close(weight, (conv.weight.double() * 3).half())
    torch.testing.assert_close(bias, torch.arange(4, dtype=torch.float16))
