"""The staged GPU benchmark: ``scripts/bench_gpu.sh OUT_DIR [--dry-run] [--stages ...]``.

Design in plain words
---------------------
A GPU machine is lent for a few minutes, has no network and no packages beyond its image, and returns only the
files written under one output folder. So the run is built to survive its first call there:

* ``run.py`` (standard library only) is the driver. It runs every stage as its own Python process, in order,
  each under a wall-clock cap that also shrinks to what is left of the call's budget, and kills a stage's whole
  process group when the cap passes. JAX stages and PyTorch stages never share a process (the two allocators
  would fight over GPU memory), and PyTorch runs only after the JAX processes have exited.
* Every stage appends one JSON line per measurement to its file under ``OUT_DIR`` as soon as it is measured
  (flushed and synced), so a stage that is killed still returns everything it measured before. Inside a stage,
  each measurement is tried on its own: an error is a record (``status: error``), not the end of the stage, and
  a measurement that would not fit before the stage's deadline is recorded as ``skipped``.
* ``--dry-run`` runs every stage and writes every file on the CPU with tiny shapes (``JAX_PLATFORMS=cpu``, the
  Pallas kernels in interpret mode, cuDNN's wrapper through jax's XLA implementation, PyTorch on the CPU); the
  test suite runs it. Both modes block ``grain``, ``gguf`` and ``tensorboardX`` at import time, as the GPU
  machine lacks them.

Stages and their files (at most 8 files, all directly under ``OUT_DIR``):

==============  ==========================  =============================================================
stage           processes                   file
==============  ==========================  =============================================================
(driver)        run.py                      ``stages.jsonl`` (one line per process), ``log.txt``
env             env_jax, env_torch          ``env.jsonl``: versions, device, driver, matmul / copy ceilings
correctness     correctness                 ``correctness.jsonl``: every GPU kernel against the reference
kernels         kernels                     ``kernels.jsonl``: attention and fused-CE speed
train           train                       ``train.jsonl``: train steps built by ``build_program``, MFU
torch           torch_loop                  ``torch.jsonl``: the PyTorch loop on the same shapes
==============  ==========================  =============================================================
"""
