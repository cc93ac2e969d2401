"""Pallas TPU fused linear cross-entropy (Mosaic-lowered row kernels); see pallas_rows for the design."""

from __future__ import annotations

import functools

from pallas_kernels.cross_entropy.pallas_rows import fused_linear_cross_entropy_pallas

fused_linear_cross_entropy_pallas_tpu = functools.partial(fused_linear_cross_entropy_pallas, platform="tpu",
                                                          block_rows=8)
