"""Pallas GPU fused linear cross-entropy (Triton-lowered row kernels); see pallas_rows for the design."""

from __future__ import annotations

import functools

from pallas_kernels.cross_entropy.pallas_rows import fused_linear_cross_entropy_pallas

fused_linear_cross_entropy_pallas_gpu = functools.partial(fused_linear_cross_entropy_pallas, platform="gpu")
