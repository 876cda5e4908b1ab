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


def _run(conv: kernels.AffineConv, x):
    return torch.nn.functional.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation)


def test_compose_general_k1_then_k2_with_stride_and_groups():
    first = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2).double()
    second = nn.Conv2d(6, 5, 3, stride=1, padding=0).double()
    composed = kernels.compose(kernels.conv_as_affine(first), kernels.conv_as_affine(second))
    assert composed.kernel_size == (3 + 2 * 2, 7) and composed.stride == (2, 2) and composed.padding == (1, 1)
    x = torch.randn(2, 4, 13, 13, dtype=torch.float64)
    torch.testing.assert_close(_run(composed, x), second(first(x)))


def test_compose_pointwise_first_keeps_second_padding_and_dilation():
    first = nn.Conv2d(4, 4, 1, groups=4, bias=False).double()
    second = nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=4).double()
    composed = kernels.compose(kernels.conv_as_affine(first), kernels.conv_as_affine(second))
    x = torch.randn(1, 4, 9, 9, dtype=torch.float64)
    torch.testing.assert_close(_run(composed, x), second(first(x)))
    module = kernels.to_conv(composed, torch.float64)
    assert module.groups == 4 and module.dilation == (2, 2)  # depthwise ∘ depthwise stays depthwise


def test_compose_declines_inner_padding():
    first = kernels.conv_as_affine(nn.Conv2d(3, 3, 1))  # has a bias: its zero-padded output is not conv(0)
    second = kernels.conv_as_affine(nn.Conv2d(3, 3, 3, padding=1))
    assert "inner zero padding" in kernels.compose(first, second)


def test_add_centres_asymmetric_kernels_and_identity():
    convs = [nn.Conv2d(4, 4, k, padding=p).double() for k, p in [(3, 1), ((1, 3), (0, 1)), ((3, 1), (1, 0)), (1, 0)]]
    terms = [kernels.conv_as_affine(c) for c in convs] + [kernels.identity_conv(4)]
    total = kernels.add(terms)
    assert total.kernel_size == (3, 3) and total.padding == (1, 1)
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(_run(total, x), sum(c(x) for c in convs) + x)


def test_add_declines_misaligned_and_strided():
    a = kernels.conv_as_affine(nn.Conv2d(2, 2, 3, stride=2, padding=1))
    assert "cannot be centred" in kernels.add([a, kernels.conv_as_affine(nn.Conv2d(2, 2, 2, stride=2))])
    assert "different strides" in kernels.add([a, kernels.identity_conv(2)])


def test_avg_pool_counts_padding():
    x = torch.randn(1, 3, 7, 7, dtype=torch.float64)
    pool = kernels.avg_pool_conv(3, 3, 2, 1)
    torch.testing.assert_close(_run(pool, x), torch.nn.functional.avg_pool2d(x, 3, 2, 1, count_include_pad=True))


def test_to_conv_picks_the_largest_valid_grouping():
    grouped = nn.Conv2d(8, 8, 3, padding=1, groups=4).double()
    affine = kernels.conv_as_affine(grouped)
    assert kernels.to_conv(affine, torch.float32).groups == 4
    dense = kernels.add([affine, kernels.conv_as_affine(nn.Conv2d(8, 8, 1).double())])
    assert kernels.to_conv(dense, torch.float32).groups == 1


def test_fold_affine_before_grouped_conv():
    conv = nn.Conv2d(4, 6, 3, groups=2).double()
    affine = kernels.ChannelAffine(torch.rand(4, dtype=torch.float64) + 0.5, torch.randn(4, dtype=torch.float64))
    weight, bias = kernels.fold_affine_before(conv.weight, conv.bias, affine, groups=2)
    x = torch.randn(1, 4, 5, 5, dtype=torch.float64)
    expected = conv(x * affine.scale.view(1, -1, 1, 1) + affine.shift.view(1, -1, 1, 1))
    torch.testing.assert_close(torch.nn.functional.conv2d(x, weight, bias, groups=2), expected)
