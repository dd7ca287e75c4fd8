"""Names of the op kinds that hardware profiles refer to (torch-free, so that profiles load without torch).

The op registry (:mod:`cgmq_cli.ops`) declares every entry under these names;
``tests/unit/test_ops.py`` checks that the two agree.
"""

from __future__ import annotations

PROFILE_KINDS = ("conv", "depthwise", "conv1d", "linear", "matmul", "embedding")  # keys of a profile's per_op
PROFILE_ALIASES = {"conv2d": "conv"}  # the registry reports plain 2-D convolutions as "conv2d"
# what a profile's integer_ops may list
INTEGER_OPS = ("conv", "linear", "matmul", "embedding", "add", "concat", "pooling")
