"""fxopt's passes, one module per pass family; importing this package registers them all."""

from fxopt.passes import canonicalize, fold_affine, fold_bn, merge_convs, reparam  # noqa: F401
from fxopt.passes import channel_permutation, fold_constants, fold_pad, fuse_siblings, noops  # noqa: F401
from fxopt.passes import lower_zero_channels  # noqa: F401  (channel dependency groups, zero-channel lowering)
from fxopt.passes import sparse_weights  # noqa: F401  (lower_sparse_weights)
