"""The GPU benchmark path, checked on the CPU: the dry run of ``scripts/bench_gpu.sh`` runs every stage with tiny
shapes and writes every file, and the driver's capping keeps what a killed stage wrote.

The dry run's numbers are compared with independent references where they exist: the kernels with the
plain-jnp oracle (inside the stages), and the JAX train step's parameter counts and model FLOPs with those the
PyTorch/peft model of the same config gives.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "bench_gpu.sh"
FILES = {"stages.jsonl", "log.txt", "env.jsonl", "correctness.jsonl", "kernels.jsonl", "train.jsonl", "torch.jsonl"}
PROCESSES = ["env_jax", "env_torch", "correctness", "kernels", "train", "torch_loop"]


def read_records(path: pathlib.Path) -> list[dict]:
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert records, f"{path.name} is empty"
    return records


def dry_run_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SFTJAX_BENCH_", "XLA_PYTHON_CLIENT"))}
    env["PYTHON"] = sys.executable
    return env


@pytest.mark.slow
def test_dry_run_of_every_stage(tmp_path):
    """One dry run (about 2 minutes on an idle machine), then every file it wrote is checked. One test, so that
    pytest-xdist never runs it twice."""
    started = time.perf_counter()
    result = subprocess.run(["bash", str(SCRIPT), str(tmp_path), "--dry-run"], env=dry_run_env(),
                            capture_output=True, text=True, timeout=1800)
    print(f"dry run: {time.perf_counter() - started:.0f} s")
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert "bench_gpu summary" in result.stdout
    for check in (check_files_and_stages, check_environment_and_ceilings, check_correctness_covers_every_kernel,
                  check_kernel_speed_records, check_train_steps_match_the_pytorch_models_of_the_same_config):
        check(tmp_path)


def check_files_and_stages(dry_run: pathlib.Path):
    found = {p.name for p in dry_run.iterdir()}
    assert found == FILES and all(p.is_file() for p in dry_run.iterdir())  # <= 8 files, no folders
    stages = read_records(dry_run / "stages.jsonl")
    assert [s["process"] for s in stages] == PROCESSES
    assert all(s["status"] == "ok" and s["returncode"] == 0 and s["dry_run"] for s in stages), stages
    for name in FILES - {"log.txt", "stages.jsonl"}:
        for record in read_records(dry_run / name):
            assert record["stage"] and record["time_utc"] and record["status"] == "ok", record
    log = (dry_run / "log.txt").read_text()
    assert "[train]" in log and "[torch]" in log


def check_environment_and_ceilings(dry_run: pathlib.Path):
    records = read_records(dry_run / "env.jsonl")
    host = next(r for r in records if r["kind"] == "host")
    assert host["dry_run"] is True and host["versions"]["jax"]
    assert next(r for r in records if r["kind"] == "jax_device")["platform"] == "cpu"
    assert next(r for r in records if r["kind"] == "torch_device")["device"] == "cpu"
    ceilings = {(r["framework"], r["op"]): r for r in records if r["kind"] == "ceiling"}
    assert set(ceilings) == {("jax", "matmul"), ("jax", "copy"), ("torch", "matmul"), ("torch", "copy")}
    for (framework, op), record in ceilings.items():
        assert (record["tflops"] if op == "matmul" else record["tb_per_s"]) > 0, record


def check_correctness_covers_every_kernel(dry_run: pathlib.Path):
    from benchmarks.gpu import shapes

    records = read_records(dry_run / "correctness.jsonl")
    for op, implementations in (("attention", shapes.ATTENTION_IMPLEMENTATIONS),
                                ("cross_entropy", shapes.CROSS_ENTROPY_IMPLEMENTATIONS)):
        for dtype in ("float32", "bfloat16"):
            done = {r["implementation"] for r in records if r["kind"] == op and r["dtype"] == dtype}
            assert set(implementations) <= done, (op, dtype, done)
    for record in records:
        errors = [record.get("rel_err_out", record.get("rel_err_loss")),
                  *(record.get("rel_err_dq_dk_dv") or record.get("rel_err_d_hidden_d_weight"))]
        assert len(errors) == (4 if record["kind"] == "attention" else 3)
        assert all(isinstance(e, float) and math.isfinite(e) and e <= record["tolerance"] for e in errors), record
        assert record["tolerance"] == (5e-5 if record["dtype"] == "float32" else 2e-2)
    pallas = [r for r in records if r["implementation"] == "pallas_gpu"]
    assert pallas and all(r["ran_as"] == "pallas_gpu_interpret" for r in pallas)


def check_kernel_speed_records(dry_run: pathlib.Path):
    from benchmarks.gpu import shapes

    records = read_records(dry_run / "kernels.jsonl")
    attention = [r for r in records if r["kind"] == "attention"]
    for name in ("reference", *shapes.ATTENTION_IMPLEMENTATIONS):
        layouts = {r["layout"]: r for r in attention if r["implementation"] == name}
        assert set(layouts) == {"compile", "packed", "single"}, name
        packed, single = layouts["packed"], layouts["single"]
        assert packed["forward_ms"] > 0 and packed["forward_backward_ms"] > 0 and single["forward_ms"] > 0
        assert max(packed["segments_per_row"]) > 1 and single["segments_per_row"] == [1]
        assert packed["visible_pairs"] < single["visible_pairs"]
        if name != "reference":
            errors = [packed["rel_err_out_vs_reference"], *packed["rel_err_grads_vs_reference"]]
            assert all(e <= shapes.TOLERANCE["bfloat16"] for e in errors), (name, errors)
    ce = {r["implementation"]: r for r in records if r["kind"] == "cross_entropy"}
    assert set(ce) == {"reference", *shapes.CROSS_ENTROPY_IMPLEMENTATIONS}
    assert all(r["shape"]["trained"] > 0 and r["forward_backward_ms"] > 0 for r in ce.values())
    for name in shapes.CROSS_ENTROPY_IMPLEMENTATIONS:
        assert ce[name]["rel_err_loss_vs_reference"] <= shapes.TOLERANCE["bfloat16"]


def check_train_steps_match_the_pytorch_models_of_the_same_config(dry_run: pathlib.Path):
    from benchmarks.gpu import shapes

    jax_steps = {r["case"]: r for r in read_records(dry_run / "train.jsonl") if r["kind"] == "train_step"}
    torch_steps = {r["case"]: r for r in read_records(dry_run / "torch.jsonl") if r["kind"] == "train_step"}
    names = [case.name for case in shapes.DRY.train_cases]
    assert sorted(jax_steps) == sorted(torch_steps) == sorted(names)
    for case in shapes.DRY.train_cases:
        ours, theirs = jax_steps[case.name], torch_steps[case.name]
        # sftjax's parameter and LoRA counts against transformers + peft built from the same config values
        assert ours["parameters"] == theirs["parameters"] and ours["trainable"] == theirs["trainable"], case.name
        assert ours["model_flops_per_step"] == theirs["model_flops_per_step"] > 0
        if case.lora_rank:
            assert ours["trainable"] < ours["parameters"] / 2
        for record in (ours, theirs):
            assert len(record["losses"]) == shapes.DRY.train_warmup + shapes.DRY.train_steps
            assert abs(record["losses"][0] - math.log(case.model["vocab_size"])) < 1.0
            assert record["step_s"] > 0 and record["tokens_per_s"] > 0 and record["mfu_measured_ceiling"] > 0
        assert ours["attention_resolved"] and ours["compile_s"] > 0 and ours["compiled_memory"]["temp_bytes"] > 0
        assert theirs["device"] == "cpu" and theirs["parameter_devices"] == ["cpu"]


def test_a_stage_past_its_cap_is_killed_with_its_children_and_keeps_what_it_wrote(tmp_path):
    from benchmarks.gpu import run

    out = tmp_path / "partial.jsonl"
    child_pid = tmp_path / "child.pid"
    script = ("import json, os, subprocess, sys, time\n"
              f"open({str(out)!r}, 'a').write(json.dumps({{'status': 'ok'}}) + '\\n')\n"
              "child = subprocess.Popen(['sleep', '120'])\n"
              f"open({str(child_pid)!r}, 'w').write(str(child.pid))\n"
              "print('measured one', flush=True)\n"
              "time.sleep(120)\n")
    with open(tmp_path / "log.txt", "w") as log:
        result = run.run_process([sys.executable, "-c", script], dict(os.environ), cap_s=3, log=log)
    assert result["status"] == "timeout" and result["wall_s"] < 30
    assert json.loads(out.read_text()) == {"status": "ok"}
    assert "measured one" in (tmp_path / "log.txt").read_text()
    pid = int(child_pid.read_text())
    deadline = time.time() + 10
    while alive(pid) and time.time() < deadline:
        time.sleep(0.2)
    assert not alive(pid), "the stage's child survived the kill"


def alive(pid: int) -> bool:
    """Running (a killed process may linger as a zombie until its new parent reaps it)."""
    try:
        return pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_unknown_stage_is_refused_with_the_choices(tmp_path):
    result = subprocess.run([sys.executable, "-m", "benchmarks.gpu.run", str(tmp_path), "--stages", "env,trian"],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "unknown stage(s) trian; choose from env, correctness, kernels, train, torch" in result.stderr


def test_benchmark_modules_import_without_grain_gguf_or_tensorboardx(tmp_path):
    """What the GPU machine lacks is blocked; every stage module and the metrics logger still import and work."""
    modules = ["run", "common", "shapes", "common_jax", "common_torch", "env_jax", "env_torch", "correctness",
               "kernels", "train", "torch_loop"]
    code = "\n".join([
        "from benchmarks.gpu.common import block_modules",
        "block_modules(['grain', 'gguf', 'tensorboardX'])",
        *(f"import benchmarks.gpu.{m}" for m in modules),
        "import benchmarks.batches, sftjax.train.program, sftjax.train.flops, pallas_kernels.attention.pallas_gpu",
        "import pallas_kernels.attention.cudnn, pallas_kernels.cross_entropy.pallas_rows",
        "from sftjax.train.metrics import MetricsLogger",
        f"logger = MetricsLogger({str(tmp_path)!r}, total_steps=1, progress=False)",
        "logger.log(1, {'loss': 1.0}); logger.close()",
        "import sys",
        "assert all(sys.modules.get(m) is None for m in ('grain', 'gguf', 'tensorboardX'))",
    ])
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "tensorboard").exists()
    assert "tensorboardX is not installed" in result.stderr


def test_conftest_keeps_a_jax_platform_given_in_the_environment():
    """tests/conftest.py only defaults JAX_PLATFORMS to cpu, so ``JAX_PLATFORMS=cuda pytest tests/kernels`` runs
    the kernel tests on a GPU."""
    code = "import os; os.environ['JAX_PLATFORMS'] = 'cuda'; import tests.conftest; print(os.environ['JAX_PLATFORMS'])"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert result.returncode == 0 and result.stdout.strip() == "cuda", result.stderr


@pytest.mark.slow
def test_gpu_train_cases_build_and_lower_for_cuda_at_full_size():
    """The GPU run's two train configs at their real sizes, without a GPU: ``build_program`` builds them abstractly,
    the train step lowers for CUDA, and the parameter / LoRA counts equal those of transformers + peft models of
    the same config (on the meta device), which are the published 1.24B and 8.03B."""
    import jax
    import peft
    import torch
    import transformers

    from benchmarks.gpu import shapes
    from benchmarks.gpu.train import config_for
    from sftjax.sharding import make_mesh
    from sftjax.train.program import build_program

    mesh = make_mesh(devices=jax.devices()[:1])  # the GPU machine has one device
    published = {"llama_1b_full": 1_235_814_400, "llama_8b_lora16": 8_030_261_248}
    for case in shapes.GPU.train_cases:
        program = build_program(config_for(case, "auto", "auto", steps=7), mesh=mesh, total_steps=7, abstract=True)
        lowered = program.train_step.trace(*program.abstract_arguments(case.length)).lower(
            lowering_platforms=("cuda",))
        assert "stablehlo" in lowered.as_text()
        hf = shapes.hf_config(case.model)
        hf.pop("dtype", None)
        with torch.device("meta"):
            model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf))
        assert sum(p.numel() for p in model.parameters()) == published[case.name]
        if case.lora_rank:
            model = peft.get_peft_model(model, peft.LoraConfig(r=case.lora_rank, lora_alpha=2 * case.lora_rank,
                                                               target_modules="all-linear", task_type="CAUSAL_LM"))
        assert program.num_params == sum(p.numel() for p in model.parameters()), case.name
        assert program.num_trainable == sum(p.numel() for p in model.parameters() if p.requires_grad), case.name
