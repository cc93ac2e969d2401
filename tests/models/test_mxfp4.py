"""MXFP4 dequantization against transformers' ``convert_moe_packed_tensors`` (the gpt-oss loader), bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import require

from sftjax.errors import CheckpointError
from sftjax.models.mxfp4 import dequantize_mxfp4, dequantize_mxfp4_tensors

torch = require("torch")
mxfp4 = require("transformers.integrations.mxfp4")


def packed(shape, seed):
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=shape + (16,), dtype=np.uint8)
    scales = rng.integers(110, 140, size=shape, dtype=np.uint8)  # 2**-17 .. 2**12
    return blocks, scales


@pytest.mark.parametrize("shape", [(3, 8, 2), (2, 64, 1), (4, 6, 3)])
def test_dequantized_weights_equal_transformers_bit_for_bit(shape):
    blocks, scales = packed(shape, seed=sum(shape))
    expected = mxfp4.convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales),
                                                dtype=torch.float32).numpy()
    got = dequantize_mxfp4(blocks, scales)
    assert got.shape == expected.shape == (shape[0], shape[2] * 32, shape[1])
    np.testing.assert_array_equal(got.view(np.uint32), expected.view(np.uint32))  # signed zeros included


def test_stream_pairs_blocks_with_scales_in_any_order_and_passes_the_rest():
    b1, s1 = packed((2, 4, 1), 1)
    b2, s2 = packed((2, 8, 2), 2)
    other = np.ones(3, np.float32)
    stream = [("l.0.experts.down_proj_scales", s1), ("l.0.norm.weight", other),
              ("l.0.experts.down_proj_blocks", b1), ("l.0.experts.gate_up_proj_blocks", b2),
              ("l.0.experts.gate_up_proj_scales", s2)]
    out = dict(dequantize_mxfp4_tensors(stream))
    assert sorted(out) == ["l.0.experts.down_proj", "l.0.experts.gate_up_proj", "l.0.norm.weight"]
    np.testing.assert_array_equal(out["l.0.experts.down_proj"], dequantize_mxfp4(b1, s1))
    np.testing.assert_array_equal(out["l.0.norm.weight"], other)


def test_bad_mxfp4_tensors_get_one_line_errors_naming_the_key():
    blocks, scales = packed((2, 4, 1), 0)
    with pytest.raises(CheckpointError, match="x.down_proj_blocks has no x.down_proj_scales partner"):
        list(dequantize_mxfp4_tensors([("x.down_proj_blocks", blocks)], source="model.safetensors"))
    with pytest.raises(CheckpointError, match=r"m: x.w: MXFP4 blocks \(2, 4, 1, 16\) and scales \(2, 4, 2\)"):
        list(dequantize_mxfp4_tensors([("x.w_blocks", blocks), ("x.w_scales", np.zeros((2, 4, 2), np.uint8))],
                                      source="m"))
    with pytest.raises(CheckpointError, match="must be uint8"):
        dequantize_mxfp4(blocks.astype(np.int32), scales)
