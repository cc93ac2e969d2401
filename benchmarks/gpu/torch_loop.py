"""Stage ``torch``: the plain PyTorch loop on the train stage's shapes, on CUDA, in a process of its own.

The baseline DESIGN.md names: an eager ``transformers`` Llama (SDPA attention) built from the same config values
as the JAX cases (``shapes.PLAN.train_cases``), random init directly on the device, rows of ``max_length`` with a
**boolean** 4D block-diagonal causal mask per row (True = may attend; an fp32 additive mask with bf16 inputs
takes a cuDNN path that misreads it), per-segment position ids, ``use_cache=False``, bf16 autocast, gradient
checkpointing (the JAX side remats every layer), masked-mean cross-entropy over the trained tokens, gradient
clipping at 1.0 and AdamW (fused on CUDA). Full fine-tuning keeps float32 master weights; LoRA (peft, r=16,
all linear layers) keeps a bf16 base with float32 adapters. The same packed batch generator feeds both
frameworks. MFU uses ``sftjax.train.flops`` with this model's own parameter counts.
"""

from __future__ import annotations

import gc
import statistics
import sys
import time

from benchmarks.gpu.common import Recorder, block_modules


def block_causal_mask(segment_ids, where):
    """[B, 1, L, L] bool: True where token i may see token j (same segment, j <= i). Padding (segment 0) sees
    earlier padding, so no softmax row is empty."""
    import torch

    seg = torch.as_tensor(segment_ids, dtype=torch.long, device=where)
    length = seg.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=where).tril()
    return ((seg[:, :, None] == seg[:, None, :]) & causal)[:, None]


def build_model(case, where):
    import torch
    import transformers

    from benchmarks.gpu import shapes

    hf = dict(shapes.hf_config(case.model), attn_implementation="sdpa")
    hf["max_position_embeddings"] = max(case.length, hf["max_position_embeddings"])
    hf.pop("dtype", None)
    config = transformers.LlamaConfig(**hf)
    dtype = getattr(torch, case.param_dtype)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(where):  # random init on the device itself: no 8B init on the host
            model = transformers.LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model = model.to(device=where, dtype=dtype)
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if case.lora_rank:
        import peft

        lora = peft.LoraConfig(r=case.lora_rank, lora_alpha=2 * case.lora_rank, lora_dropout=0.0,
                               target_modules="all-linear", task_type="CAUSAL_LM")
        model = peft.get_peft_model(model, lora)  # adapters in float32 (peft's autocast_adapter_dtype)
    model.train()
    return model


def run_case(case, ceiling_flops: float | None) -> dict:
    import numpy as np
    import torch

    from benchmarks.batches import packed_batch
    from benchmarks.gpu import common_torch, shapes
    from sftjax.models.config import ModelConfig
    from sftjax.train import flops as flops_lib

    where = common_torch.device()
    start = time.perf_counter()
    model = build_model(case, where)
    build_s = time.perf_counter() - start
    parameters = list(model.parameters())
    devices = sorted({p.device.type for p in parameters})
    if devices != [where.type]:
        raise RuntimeError(f"model parameters on {devices}, expected {where.type}")
    trainable = [p for p in parameters if p.requires_grad]
    host = packed_batch(case.rows, case.length, case.model["vocab_size"], seed=0)
    as_long = lambda key: torch.as_tensor(host[key], dtype=torch.long, device=where)  # noqa: E731
    inputs = dict(input_ids=as_long("tokens"), position_ids=as_long("positions"),
                  attention_mask=block_causal_mask(host["segment_ids"], where), use_cache=False)
    targets = as_long("targets").flatten()
    loss_mask = torch.as_tensor(host["loss_mask"], dtype=torch.float32, device=where).flatten()
    optimizer = torch.optim.AdamW(trainable, lr=shapes.LEARNING_RATE, weight_decay=shapes.WEIGHT_DECAY,
                                  betas=(0.9, 0.999), eps=1e-8, fused=where.type == "cuda")

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type=where.type, dtype=torch.bfloat16):
            logits = model(**inputs).logits
        token_ce = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets, reduction="none")
        loss = (token_ce * loss_mask).sum() / loss_mask.sum().clamp(min=1.0)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        return loss.detach(), grad_norm.detach()

    if where.type == "cuda":
        torch.cuda.reset_peak_memory_stats(where)
    losses, grad_norms, times = [], [], []
    for index in range(shapes.PLAN.train_warmup + shapes.PLAN.train_steps):
        common_torch.synchronize(where)
        begin = time.perf_counter()
        loss, grad_norm = step()
        common_torch.synchronize(where)
        if index >= shapes.PLAN.train_warmup:
            times.append(time.perf_counter() - begin)
        losses.append(float(loss))
        grad_norms.append(float(grad_norm))
    step_s = statistics.median(times)

    model_config = ModelConfig(**case.model)
    per_token = flops_lib.model_flops_per_token(model_config, num_params=sum(p.numel() for p in parameters),
                                                num_trainable_params=sum(p.numel() for p in trainable),
                                                seq_len=case.length)
    model_flops = per_token * case.tokens / step_s
    peak = datasheet_peak(torch.cuda.get_device_name(where)) if where.type == "cuda" else None
    finite = bool(np.all(np.isfinite(losses)) and np.all(np.isfinite(grad_norms)))
    result = {
        "device": str(where), "parameter_devices": devices, "torch": torch.__version__,
        "parameters": sum(p.numel() for p in parameters), "trainable": sum(p.numel() for p in trainable),
        "build_s": round(build_s, 2), "step_s": step_s, "step_times_s": [round(t, 4) for t in times],
        "tokens_per_s": case.tokens / step_s, "model_flops_per_step": per_token * case.tokens,
        "model_tflops": model_flops / 1e12, "peak_flops_datasheet": peak,
        "mfu_datasheet": model_flops / peak if peak else None, "matmul_ceiling_flops": ceiling_flops,
        "mfu_measured_ceiling": model_flops / ceiling_flops if ceiling_flops else None,
        "losses": losses, "grad_norms": grad_norms, "log_vocab": float(np.log(case.model["vocab_size"])),
        "peak_memory_bytes": int(torch.cuda.max_memory_allocated(where)) if where.type == "cuda" else None,
        "attention_mask": "bool [B, 1, L, L]",
        "status": "ok" if finite and abs(losses[0] - np.log(case.model["vocab_size"])) < 1.0 else "fail",
    }
    return result


def free_memory() -> None:
    """The finished case's model, optimizer and activations back to the device before the next case."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def datasheet_peak(device_name: str) -> float | None:
    from sftjax.train.flops import PEAK_FLOPS

    name = device_name.lower()
    for key in sorted(PEAK_FLOPS, key=len, reverse=True):
        if key in name:
            return PEAK_FLOPS[key]
    return None


def main() -> int:
    block_modules()
    from benchmarks.gpu import common_torch, shapes

    record = Recorder("torch.jsonl", "torch")
    ceiling_flops = None
    try:
        where = common_torch.device()
        ceiling = record.attempt({"kind": "ceiling", "framework": "torch", "op": "matmul"},
                                 lambda: common_torch.matmul_ceiling(where, shapes.PLAN.matmul_size,
                                                                     shapes.PLAN.ceiling_repeats), needs_s=5)
        ceiling_flops = ceiling["tflops"] * 1e12 if ceiling.get("status") == "ok" else None
    except RuntimeError as error:
        record.write({"kind": "ceiling", "framework": "torch", "status": "error", "error": str(error)})
    for case in shapes.PLAN.train_cases:
        base = {"kind": "train_step", "framework": "pytorch", "case": case.name, "rows": case.rows,
                "length": case.length, "tokens_per_step": case.tokens, "lora_rank": case.lora_rank,
                "param_dtype": case.param_dtype, "compute_dtype": "bfloat16 (autocast)",
                "remat": "gradient checkpointing"}
        record.attempt(base, lambda case=case: run_case(case, ceiling_flops), needs_s=shapes.PLAN.needs_s["torch"])
        free_memory()
    return record.finish()


if __name__ == "__main__":
    sys.exit(main())
