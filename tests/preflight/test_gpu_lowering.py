"""The Pallas GPU kernels lowered for sm_90 (H100/H200) at real model shapes, without a GPU, and the registers
of their default configurations compiled by Triton for sm_90 (pallas_kernels/lowering.py)."""

from __future__ import annotations

import pytest

from pallas_kernels import lowering

CASES = lowering.standard_cases()


@pytest.mark.parametrize("case", CASES, ids=[case.label for case in CASES])
def test_lowers_for_sm90(case):
    result = lowering.run_case(case)
    assert result["ok"], result.get("error")
    names = {kernel["name"] for kernel in result["kernels"]}
    if case.op == "attention":
        expected = {"sftjax_flash_attention_fwd"}
        if case.options["backward"]:
            expected |= {"sftjax_flash_attention_dkdv", "sftjax_flash_attention_dq"}
    else:
        expected = {"sftjax_ce_row_stats", "sftjax_ce_row_grads"}
    assert names == expected


@pytest.mark.parametrize("case", [lowering.attention_case(d, 8, 2, length=1024) for d in (64, 96, 128, 256)]
                         + [lowering.cross_entropy_case(151936, hidden=1024, tokens=2048)],
                         ids=["attention-D64", "attention-D96", "attention-D128", "attention-D256", "cross_entropy"])
def test_default_blocks_do_not_spill_on_sm90(triton_package, case):
    result = lowering.run_case(case, registers=True)
    assert result["ok"], result.get("error")
    for kernel in result["kernels"]:
        assert "error" not in kernel, kernel
        assert kernel["spill_stores"] == kernel["spill_loads"] == 0, kernel
        assert kernel["shared"] <= lowering.SM90_MAX_SHARED_BYTES, kernel
