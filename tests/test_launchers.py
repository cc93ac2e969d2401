"""The TPU-pod and SLURM launchers: dry runs print the right commands, the printed commands do what they say when
run against stand-ins for gcloud's remote shell, srun and the TPU metadata server, and a missing argument is a
one-line error naming it."""

from __future__ import annotations

import json
import os
import pathlib
import shlex
import shutil
import socket
import stat
import subprocess

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "scripts"
TRAIN_ARGS = ["configs/qwen25_7b_full_tpu_v5p8.yaml", "train.steps=10", "data.sources=[a b.jsonl]", "x.note=it's"]


def _checkout(tmp_path: pathlib.Path, constraints: dict[str, str] | None = None) -> pathlib.Path:
    """A copy of the launchers in a folder of its own, so that the constraints/ folder is the test's to choose."""
    root = tmp_path / "repo"
    (root / "scripts").mkdir(parents=True)
    for name in ("launch_tpu_pod.sh", "tpu_worker_env.sh", "launch_slurm.sh", "slurm_train.sbatch"):
        shutil.copy(SCRIPTS / name, root / "scripts" / name)
    for name, text in (constraints or {}).items():
        (root / "constraints").mkdir(exist_ok=True)
        (root / "constraints" / name).write_text(text)
    return root


def _run(script: pathlib.Path, *args: str, env: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(script), *args], capture_output=True, text=True, timeout=60, cwd=cwd,
                          env={**os.environ, **(env or {})})


def _lines(result: subprocess.CompletedProcess) -> list[str]:
    assert result.returncode == 0, result.stderr
    return [line for line in result.stdout.splitlines() if line and not line.startswith("#")]


def _remote(line: str) -> str:
    """The --command of a printed `gcloud compute tpus tpu-vm ssh` line."""
    argv = shlex.split(line)
    return argv[argv.index("--command") + 1]


def _executable(path: pathlib.Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def _fake_sftjax(bin_dir: pathlib.Path, record: pathlib.Path) -> None:
    """An `sftjax` that records its arguments and the job variables, then prints a line (for the log)."""
    _executable(bin_dir / "sftjax", f"""#!/usr/bin/env python3
import json, os, sys
keys = [k for k in os.environ if k.startswith(("JAX_", "LIBTPU", "SLURM_", "XLA_"))]
json.dump({{"argv": sys.argv[1:], "env": {{k: os.environ[k] for k in keys}}}}, open({str(record)!r}, "w"))
print("fake sftjax trained")
""")


# ------------------------------------------------------------------------------------------------- TPU pod


def test_tpu_dry_run_prints_copy_install_train_and_log_commands(tmp_path):
    root = _checkout(tmp_path, {"tpu.txt": "jax==0.10.2\n"})
    result = _run(root / "scripts" / "launch_tpu_pod.sh", "--tpu", "my-pod", "--zone", "us-east5-a", "--project",
                  "proj", "--logs", "out/logs", "--env", "LIBTPU_INIT_ARGS=--xla_a=1 --xla_b=2", "--dry-run",
                  *TRAIN_ARGS, env={"TMPDIR": str(tmp_path)})
    pack, scp, unpack, install, train, mkdir, collect = _lines(result)
    flags = "--zone=us-east5-a --project=proj --worker=all"
    assert pack.startswith("git ls-files -z --cached --others --exclude-standard | tar ")
    assert f"-czf {tmp_path}/sftjax-my-pod.tar.gz" in pack
    assert scp == f"gcloud compute tpus tpu-vm scp {tmp_path}/sftjax-my-pod.tar.gz my-pod:sftjax-src.tar.gz {flags}"
    ssh = f"gcloud compute tpus tpu-vm ssh my-pod {flags} --command "
    for line in (unpack, install, train):
        assert line.startswith(ssh), line
        subprocess.run(["bash", "-n", "-c", _remote(line)], check=True)  # each remote command is valid bash
    assert _remote(unpack) == "set -e; mkdir -p sftjax; tar -xzf sftjax-src.tar.gz -C sftjax; rm sftjax-src.tar.gz"
    assert "pip install -q -e '.[tpu]' -c constraints/tpu.txt" in _remote(install)
    assert "sftjax train configs/qwen25_7b_full_tpu_v5p8.yaml train.steps=10" in _remote(train)
    assert mkdir == "mkdir -p out/logs"
    assert collect == f"gcloud compute tpus tpu-vm scp 'my-pod:sftjax/logs/*' out/logs/ {flags}"
    assert not (root / "out").exists()  # a dry run changes nothing


def test_tpu_remote_train_command_joins_the_job_from_metadata_and_logs(tmp_path):
    """The printed train command, run on a stand-in worker: the venv is activated, the job variables come from the
    TPU metadata (worker 1 of 2, coordinator = the first endpoint), the arguments arrive intact, the log is written."""
    if shutil.which("curl") is None and not os.environ.get("CI"):
        pytest.skip("curl is not installed")
    root = _checkout(tmp_path)
    result = _run(root / "scripts" / "launch_tpu_pod.sh", "--tpu", "pod", "--zone", "z", "--steps", "train",
                  "--env", "LIBTPU_INIT_ARGS=--xla_a=1 --xla_b=2", "--dry-run", *TRAIN_ARGS)
    (train,) = _lines(result)
    home = tmp_path / "home"
    worker = home / "sftjax"
    shutil.copytree(root / "scripts", worker / "scripts")
    record = tmp_path / "record.json"
    _fake_sftjax(worker / ".venv" / "bin", record)
    (worker / ".venv" / "bin" / "activate").write_text(f'export PATH="{worker / ".venv" / "bin"}:$PATH"\n')
    metadata = tmp_path / "metadata"
    metadata.mkdir()
    (metadata / "worker-network-endpoints").write_text("w-0:0:10.1.0.7,w-1:1:10.1.0.8")
    (metadata / "agent-worker-number").write_text("1")
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    env["SFTJAX_METADATA_URL"] = f"file://{metadata}"
    done = subprocess.run(["bash", "-c", _remote(train)], cwd=home, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    seen = json.loads(record.read_text())
    assert seen["argv"] == ["train", *TRAIN_ARGS]
    assert seen["env"]["JAX_COORDINATOR_ADDRESS"] == "10.1.0.7:8476"
    assert (seen["env"]["JAX_NUM_PROCESSES"], seen["env"]["JAX_PROCESS_ID"]) == ("2", "1")
    assert seen["env"]["LIBTPU_INIT_ARGS"] == "--xla_a=1 --xla_b=2"
    log = worker / "logs" / f"train-{socket.gethostname()}.log"
    assert "fake sftjax trained" in log.read_text()
    assert "worker 1 of 2, coordinator 10.1.0.7:8476" in log.read_text()


@pytest.mark.parametrize("endpoints, rank, expected", [
    ("10.0.0.2,10.0.0.3,10.0.0.4,10.0.0.5", "3", {"JAX_COORDINATOR_ADDRESS": "10.0.0.2:8476",
                                                  "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}),
    ("t1v-n-0:0:10.0.0.2,t1v-n-1:1:10.0.0.3", "0", {"JAX_COORDINATOR_ADDRESS": "10.0.0.2:8476",
                                                    "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}),
    ("10.0.0.2", "0", {}),  # one host: no job to join
    (None, None, {}),  # no metadata server: one process
])
def test_tpu_worker_env_reads_the_job_like_jax_does(tmp_path, endpoints, rank, expected):
    if shutil.which("curl") is None and not os.environ.get("CI"):
        pytest.skip("curl is not installed")
    metadata = tmp_path / "metadata"
    metadata.mkdir()
    if endpoints is not None:
        (metadata / "worker-network-endpoints").write_text(endpoints)
        (metadata / "agent-worker-number").write_text(rank)
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    env["SFTJAX_METADATA_URL"] = f"file://{metadata}"
    script = f". {SCRIPTS / 'tpu_worker_env.sh'}; env | grep '^JAX_' || true"
    out = subprocess.run(["bash", "-c", f"set -euo pipefail; {script}"], env=env, capture_output=True, text=True,
                         timeout=30, check=True)
    assert dict(line.split("=", 1) for line in out.stdout.split()) == expected
    # a job described by hand is left alone
    env.update(JAX_COORDINATOR_ADDRESS="h:1", JAX_NUM_PROCESSES="8", JAX_PROCESS_ID="5")
    out = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=30, check=True)
    assert "JAX_COORDINATOR_ADDRESS=h:1" in out.stdout.split() and "JAX_PROCESS_ID=5" in out.stdout.split()


def test_tpu_queued_resource_git_copy_and_detach(tmp_path):
    root = _checkout(tmp_path)
    result = _run(root / "scripts" / "launch_tpu_pod.sh", "--tpu", "pod", "--zone", "z", "--queued-resource",
                  "qr-1", "--accelerator-type", "v5p-16", "--runtime-version", "v2-alpha-tpuv5", "--spot",
                  "--copy", "git", "--repo", "https://example.org/sftjax.git", "--ref", "v1.0", "--detach",
                  "--steps", "create,copy,train", "--dry-run", "configs/x.yaml")
    create, describe, clone, train = _lines(result)
    assert create == ("gcloud compute tpus queued-resources create qr-1 --node-id=pod --zone=z "
                      "--accelerator-type=v5p-16 --runtime-version=v2-alpha-tpuv5 --spot")
    assert describe == "gcloud compute tpus queued-resources describe qr-1 --zone=z '--format=value(state.state)'"
    assert "git clone --quiet https://example.org/sftjax.git sftjax" in _remote(clone)
    assert _remote(clone).endswith(
        "git -C sftjax fetch --quiet origin v1.0; git -C sftjax checkout --quiet --detach FETCH_HEAD")
    assert "setsid bash -c" in _remote(train) and "< /dev/null &" in _remote(train)
    subprocess.run(["bash", "-n", "-c", _remote(train)], check=True)
    # --detach alone: no log collection right after the start
    lines = _lines(_run(root / "scripts" / "launch_tpu_pod.sh", "--tpu", "pod", "--zone", "z", "--detach",
                        "--dry-run", "c.yaml"))
    assert "setsid bash -c" in _remote(lines[-1]) and not any("logs/*" in line for line in lines)
    # no constraints/tpu.txt: installed without -c, unless a file is named
    (root / "constraints").mkdir()
    (root / "constraints" / "other.txt").write_text("jax==0.11.2\n")
    install = ["--tpu", "pod", "--zone", "z", "--steps", "install", "--dry-run", "c.yaml"]
    (line,) = _lines(_run(root / "scripts" / "launch_tpu_pod.sh", *install))
    assert _remote(line).endswith("pip install -q -e '.[tpu]'")
    (line,) = _lines(_run(root / "scripts" / "launch_tpu_pod.sh", "--constraints", "constraints/other.txt", *install))
    assert _remote(line).endswith("pip install -q -e '.[tpu]' -c constraints/other.txt")


@pytest.mark.parametrize("args, message", [
    ([], "missing --tpu NAME"),
    (["--tpu", "pod"], "missing --zone ZONE"),
    (["--tpu", "pod", "--zone", "z"], "missing CONFIG"),
    (["--tpu", "--zone", "z", "c.yaml"], "--tpu needs a value"),
    (["--tpu", "pod", "--zone", "z", "--copy", "git", "c.yaml"], "missing --repo URL"),
    (["--tpu", "pod", "--zone", "z", "--queued-resource", "q", "c.yaml"], "missing --accelerator-type TYPE"),
    (["--tpu", "pod", "--zone", "z", "--queued-resource", "q", "--accelerator-type", "v5p-16", "c.yaml"],
     "missing --runtime-version V"),
    (["--tpu", "pod", "--zone", "z", "--steps", "copy,nope", "c.yaml"], "unknown step nope"),
    (["--tpu", "pod", "--zone", "z", "c.yaml", "train.steps"], "override train.steps must look like key.sub=value"),
    (["--tpu", "pod", "--zone", "z", "--constraints", "/abs/c.txt", "c.yaml"], "--constraints /abs/c.txt"),
    (["--tpu", "pod", "--zone", "z", "--bogus", "c.yaml"], "unknown option --bogus"),
])
def test_tpu_launcher_refuses_missing_or_bad_arguments_in_one_line(tmp_path, args, message):
    result = _run(_checkout(tmp_path) / "scripts" / "launch_tpu_pod.sh", *args, "--dry-run")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("launch_tpu_pod.sh: error: ")
    assert message in result.stderr


# ---------------------------------------------------------------------------------------------------- SLURM


def test_slurm_dry_run_prints_install_sbatch_and_srun(tmp_path):
    root = _checkout(tmp_path, {"gpu.txt": "jax==0.10.2\n"})
    result = _run(root / "scripts" / "launch_slurm.sh", "--nodes", "4", "--gpus-per-node", "8", "--partition", "gpu",
                  "--account", "lab", "--time", "12:00:00", "--install", "--env", "XLA_PYTHON_CLIENT_MEM_FRACTION=0.9",
                  "--sbatch-arg=--exclusive", "--dry-run", *TRAIN_ARGS)
    venv, pip, install, mkdir, sbatch, job_mkdir, srun = _lines(result)
    assert venv == "python3 -m venv .venv" and pip == ".venv/bin/python -m pip install -q --upgrade pip"
    assert install == ".venv/bin/python -m pip install -q -e '.[gpu]' -c constraints/gpu.txt"
    assert mkdir == "mkdir -p logs"
    argv = shlex.split(sbatch)
    assert argv[:4] == ["sbatch", "--nodes=4", "--gpus-per-node=8", "--ntasks-per-node=8"]  # one task per GPU
    assert {"--partition=gpu", "--account=lab", "--time=12:00:00", "--exclusive",
            "--export=ALL,SFTJAX_VENV=.venv,XLA_PYTHON_CLIENT_MEM_FRACTION=0.9"} <= set(argv)
    assert argv[argv.index("scripts/slurm_train.sbatch") + 1:] == TRAIN_ARGS
    assert "# the job then runs, on 4 node(s) x 8 GPU(s) = 32 tasks:" in result.stdout
    assert job_mkdir == "mkdir -p logs/JOBID"
    argv = shlex.split(srun)
    assert argv[:4] == ["srun", "--kill-on-bad-exit=1", "--gpu-bind=none", "--output=logs/JOBID/%N-task%t.log"]
    assert argv[4:6] == ["bash", "-c"]
    assert shlex.split(argv[6]) == [".", ".venv/bin/activate", "&&", "exec", "sftjax", "train", *TRAIN_ARGS]
    assert not (root / "logs").exists() and not (root / ".venv").exists()  # a dry run changes nothing


def test_slurm_job_script_runs_one_srun_step_that_trains(tmp_path):
    """slurm_train.sbatch as the batch step runs it, with a stand-in srun that runs its command as one task."""
    root = _checkout(tmp_path)
    record = tmp_path / "record.json"
    _fake_sftjax(root / ".venv" / "bin", record)
    (root / ".venv" / "bin" / "activate").write_text(f'export PATH="{root / ".venv" / "bin"}:$PATH"\n')
    srun_args = tmp_path / "srun_args.json"
    _executable(tmp_path / "bin" / "srun", f"""#!/usr/bin/env python3
import json, os, subprocess, sys
args = sys.argv[1:]
json.dump(args, open({str(srun_args)!r}, "w"))
command = [a for a in args if not a.startswith("--")]
env = dict(os.environ, SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_STEP_NODELIST="node[01-02]")
sys.exit(subprocess.run(command, env=env).returncode)
""")
    env = {"PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "SLURM_SUBMIT_DIR": str(root), "SLURM_JOB_ID": "4242",
           "SLURM_NTASKS": "16", "SLURM_NTASKS_PER_NODE": "8", "SLURM_GPUS_PER_NODE": "h100:8"}
    result = _run(root / "scripts" / "slurm_train.sbatch", *TRAIN_ARGS, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(srun_args.read_text())[:3] == ["--kill-on-bad-exit=1", "--gpu-bind=none",
                                                     "--output=logs/4242/%N-task%t.log"]
    assert (root / "logs" / "4242").is_dir()
    seen = json.loads(record.read_text())
    assert seen["argv"] == ["train", *TRAIN_ARGS]
    assert seen["env"]["SLURM_JOB_ID"] == "4242" and seen["env"]["SLURM_NTASKS"] == "16"

    env["SLURM_GPUS_PER_NODE"] = "4"  # 8 tasks on 4 GPUs per node
    result = _run(root / "scripts" / "slurm_train.sbatch", *TRAIN_ARGS, env=env, cwd=tmp_path)
    assert result.returncode == 2 and "--ntasks-per-node=8 but --gpus-per-node=4" in result.stderr


@pytest.mark.parametrize("script, args, message", [
    ("launch_slurm.sh", [], "missing --nodes N"),
    ("launch_slurm.sh", ["--nodes", "2"], "missing --gpus-per-node G"),
    ("launch_slurm.sh", ["--nodes", "2", "--gpus-per-node", "8"], "missing CONFIG"),
    ("launch_slurm.sh", ["--nodes", "two", "--gpus-per-node", "8", "c.yaml"], "--nodes two must be a positive integer"),
    ("launch_slurm.sh", ["--nodes", "2", "--gpus-per-node", "8", "c.yaml", "oops"], "override oops must look like"),
    ("launch_slurm.sh", ["--nodes", "2", "--gpus-per-node", "8", "--env", "A", "c.yaml"], "--env A must look like"),
    ("slurm_train.sbatch", [], "missing CONFIG"),
    ("slurm_train.sbatch", ["--nodes=2", "c.yaml"], "unknown option --nodes=2"),
])
def test_slurm_scripts_refuse_missing_or_bad_arguments_in_one_line(tmp_path, script, args, message):
    result = _run(_checkout(tmp_path) / "scripts" / script, *args, "--dry-run")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(f"{script}: error: ")
    assert message in result.stderr


def test_slurm_job_script_without_a_venv_says_how_to_install(tmp_path):
    root = _checkout(tmp_path)
    result = _run(root / "scripts" / "slurm_train.sbatch", "c.yaml", env={"SLURM_SUBMIT_DIR": str(root)})
    assert result.returncode == 2 and "no sftjax in .venv" in result.stderr and "--install" in result.stderr
