"""Comparison helpers shared by the numerical tests.

Every tolerance here scales with the values compared: ``scaled_error`` is the largest absolute difference divided
by the largest magnitude of the reference (so a logit of 30 and a gradient of 1e-3 are judged alike), and
``assert_close`` fails with both numbers in the message. float32 sums reorder under another thread schedule and
move the last few bits of every output; a test that needs an absolute 1e-4 on values of 30 is a test that asks
for 3 ulps and fails on a loaded machine.
"""

from __future__ import annotations

import numpy as np


def _array(x) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensors
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def relative_error(actual, expected) -> float:
    """max |actual - expected| / max |expected| (0 when both are zero)."""
    actual, expected = _array(actual), _array(expected)
    if actual.shape != expected.shape:
        raise AssertionError(f"shapes differ: {actual.shape} vs {expected.shape}")
    scale = float(np.max(np.abs(expected))) if expected.size else 0.0
    diff = float(np.max(np.abs(actual - expected))) if expected.size else 0.0
    if scale == 0.0:
        return diff
    return diff / scale


scaled_error = relative_error


def assert_close(actual, expected, rtol: float, *, what: str = "values") -> None:
    """Fail unless max |actual - expected| <= rtol * max |expected|."""
    error = relative_error(actual, expected)
    assert error <= rtol, (f"{what}: max |diff| is {error:.3g} of the reference's scale "
                           f"(max |expected| = {float(np.max(np.abs(_array(expected)))):.4g}); allowed {rtol:g}")


def norm_relative_error(actual, expected) -> float:
    """||actual - expected|| / ||expected|| (Frobenius), after checking ``actual`` is finite: the kernel tests'
    measure, where a few large entries should not hide a wrong tile."""
    actual, expected = _array(actual), _array(expected)
    assert np.all(np.isfinite(actual)), "non-finite values"
    return float(np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-30))
