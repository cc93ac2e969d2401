"""What each stage measures, for the GPU run and for the CPU dry run (no jax or torch imported here).

The JAX train stage and the PyTorch stage read their models from the same ``MODELS`` entries, so the two
frameworks always run the same shapes. A model is a dict of ``ModelConfig`` fields (``model.init`` of a
random-init run); ``families.llama.config_to_hf`` turns it into the Hugging Face config for PyTorch.
"""

from __future__ import annotations

import dataclasses
import os

DRY_RUN = os.environ.get("SFTJAX_BENCH_DRY") == "1"

# Llama-3.2-1B and Llama-3.1-8B as their config.json files describe them (weights random).
_LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=500000.0, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
                    rope_original_max_position_embeddings=8192, rms_norm_eps=1e-5, max_position_embeddings=131072)
LLAMA_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32,
                num_kv_heads=8, head_dim=64, tie_word_embeddings=True, rope_factor=32.0, **_LLAMA3_ROPE)
LLAMA_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                num_kv_heads=8, head_dim=128, tie_word_embeddings=False, rope_factor=8.0, **_LLAMA3_ROPE)
# The same two layouts at toy size for the dry run (tied head and head_dim 16 / untied and head_dim 32).
TINY_1B = dict(LLAMA_1B, vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
               num_kv_heads=2, head_dim=16)
TINY_8B = dict(LLAMA_8B, vocab_size=512, hidden_size=64, intermediate_size=160, num_layers=2, num_heads=4,
               num_kv_heads=2, head_dim=32)


@dataclasses.dataclass(frozen=True)
class TrainCase:
    """One train-step measurement: a model, its batch geometry and how it trains."""

    name: str
    model: dict
    rows: int
    length: int
    lora_rank: int | None  # None: full fine-tuning
    param_dtype: str  # master weights (full FT) / frozen base (LoRA)
    compute_dtype: str = "bfloat16"
    remat: str = "full"
    scan_layers: bool = True

    @property
    def tokens(self) -> int:
        return self.rows * self.length


if DRY_RUN:
    # (op, dtype, shape) in order of priority; attention: (batch, length, q heads, kv heads, head_dim),
    # cross_entropy: (tokens, hidden, vocab)
    CORRECTNESS = [("attention", "float32", (1, 128, 4, 2, 32)), ("attention", "bfloat16", (1, 128, 4, 2, 16)),
                   ("cross_entropy", "float32", (256, 64, 2048)), ("cross_entropy", "bfloat16", (192, 32, 3000))]
    KERNEL_ATTENTION = [(1, 128, 4, 2, 32)]
    KERNEL_CE = [(256, 64, 2048)]
    KERNEL_REPEATS, KERNEL_CALLS = 2, 1
    MATMUL_SIZE, COPY_BYTES, CEILING_REPEATS = 256, 1 << 22, 3
    TRAIN_CASES = [TrainCase("llama_1b_full", TINY_1B, rows=2, length=128, lora_rank=None, param_dtype="float32"),
                   TrainCase("llama_8b_lora16", TINY_8B, rows=1, length=128, lora_rank=16, param_dtype="bfloat16")]
    TRAIN_WARMUP, TRAIN_STEPS = 1, 2
else:
    CORRECTNESS = [("attention", "float32", (2, 1024, 8, 2, 128)), ("attention", "bfloat16", (2, 1024, 8, 2, 128)),
                   ("cross_entropy", "float32", (4096, 512, 128256)),
                   ("cross_entropy", "bfloat16", (4096, 512, 128256)),
                   ("attention", "bfloat16", (2, 1024, 8, 2, 64)), ("cross_entropy", "bfloat16", (2048, 256, 50257))]
    KERNEL_ATTENTION = [(2, 4096, 32, 8, 128), (2, 4096, 32, 8, 64)]
    KERNEL_CE = [(8192, 4096, 128256)]
    KERNEL_REPEATS, KERNEL_CALLS = 5, 3
    MATMUL_SIZE, COPY_BYTES, CEILING_REPEATS = 8192, 2 << 30, 10
    TRAIN_CASES = [TrainCase("llama_1b_full", LLAMA_1B, rows=8, length=4096, lora_rank=None, param_dtype="float32"),
                   TrainCase("llama_8b_lora16", LLAMA_8B, rows=2, length=4096, lora_rank=16, param_dtype="bfloat16")]
    TRAIN_WARMUP, TRAIN_STEPS = 2, 5

# Implementations measured, by the names the APIs take. In the dry run the GPU-only ones run as their CPU
# stand-ins (see ``common_jax.attention_fn`` / ``cross_entropy_fn``); records keep the GPU names.
ATTENTION_IMPLEMENTATIONS = ("xla_chunked", "pallas_gpu", "cudnn")
CROSS_ENTROPY_IMPLEMENTATIONS = ("xla_chunked", "pallas_gpu")
# Train steps (attention, cross-entropy), in order of priority: the automatic choice first, then the Pallas
# kernels, then cuDNN; the dry run compiles the automatic one only (the others differ by their names alone).
TRAIN_IMPLEMENTATIONS = ((("auto", "auto"),) if DRY_RUN else
                         (("auto", "auto"), ("pallas_gpu", "pallas_gpu"), ("cudnn", "xla_chunked")))
LEARNING_RATE, WEIGHT_DECAY = 1e-5, 0.0

# Relative-error bounds (norm of the difference over the norm of the float32 reference): float32 under
# "highest" precision lands near 1e-6 (TF32 would be near 3e-4, so 5e-5 catches it); bf16 operands land
# between 1e-3 and 1e-2.
TOLERANCE = {"float32": 5e-5, "bfloat16": 2e-2}

# Seconds a measurement is expected to need (compiles included); a stage skips one that its deadline leaves
# no room for.
NEEDS_S = {"correctness": 3 if DRY_RUN else 15, "kernel": 3 if DRY_RUN else 15, "train": 5 if DRY_RUN else 60,
           "torch": 3 if DRY_RUN else 20}


def hf_config(model: dict) -> dict:
    """The Hugging Face ``config.json`` of a ``MODELS`` entry (LlamaForCausalLM)."""
    from sftjax.models.config import ModelConfig
    from sftjax.models.families import llama

    return llama.config_to_hf(ModelConfig(**model))
