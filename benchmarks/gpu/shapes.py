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
    needs_s: float = 5.0  # seconds the case is expected to take, compile included (a stage skips what won't fit)

    @property
    def tokens(self) -> int:
        return self.rows * self.length


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything a run measures; ``GPU`` and ``DRY`` below, ``PLAN`` the one this process runs."""

    # (op, dtype, shape) in order of priority; attention: (batch, length, q heads, kv heads, head_dim),
    # cross_entropy: (tokens, hidden, vocab)
    correctness: tuple
    kernel_attention: tuple  # attention shapes; the first one is measured before the cross-entropy
    kernel_ce: tuple
    kernel_repeats: int
    kernel_calls: int  # calls dispatched back to back per timed repeat
    matmul_size: int  # the ceilings: a [n, n] @ [n, n] bf16 product, a copy of this many bytes
    copy_bytes: int
    ceiling_repeats: int
    train_cases: tuple
    train_implementations: tuple  # (attention, cross-entropy), in order of priority
    train_warmup: int
    train_steps: int
    needs_s: dict  # seconds one measurement is expected to need: a stage skips what its deadline leaves no room for


GPU = Plan(
    correctness=(("attention", "float32", (2, 1024, 8, 2, 128)), ("attention", "bfloat16", (2, 1024, 8, 2, 128)),
                 ("cross_entropy", "float32", (4096, 512, 128256)), ("cross_entropy", "bfloat16", (4096, 512, 128256)),
                 ("attention", "bfloat16", (2, 1024, 8, 2, 64)), ("cross_entropy", "bfloat16", (2048, 256, 50257))),
    kernel_attention=((2, 4096, 32, 8, 128), (2, 4096, 32, 8, 64)),
    kernel_ce=((8192, 4096, 128256),),
    kernel_repeats=5, kernel_calls=3,
    matmul_size=8192, copy_bytes=2 << 30, ceiling_repeats=10,
    train_cases=(TrainCase("llama_1b_full", LLAMA_1B, rows=8, length=4096, lora_rank=None, param_dtype="float32",
                           needs_s=70),
                 TrainCase("llama_8b_lora16", LLAMA_8B, rows=2, length=4096, lora_rank=16, param_dtype="bfloat16",
                           needs_s=85)),
    # the automatic choice first, then the Pallas kernels, then cuDNN
    train_implementations=(("auto", "auto"), ("pallas_gpu", "pallas_gpu"), ("cudnn", "xla_chunked")),
    train_warmup=2, train_steps=5,
    needs_s={"correctness": 15, "kernel": 15, "torch": 30},
)
DRY = Plan(
    correctness=(("attention", "float32", (1, 128, 4, 2, 32)), ("attention", "bfloat16", (1, 128, 4, 2, 16)),
                 ("cross_entropy", "float32", (256, 64, 2048)), ("cross_entropy", "bfloat16", (192, 32, 3000))),
    kernel_attention=((1, 128, 4, 2, 32),),
    kernel_ce=((256, 64, 2048),),
    kernel_repeats=2, kernel_calls=1,
    matmul_size=256, copy_bytes=1 << 22, ceiling_repeats=3,
    train_cases=(TrainCase("llama_1b_full", TINY_1B, rows=2, length=128, lora_rank=None, param_dtype="float32"),
                 TrainCase("llama_8b_lora16", TINY_8B, rows=1, length=128, lora_rank=16, param_dtype="bfloat16")),
    # the other pairs differ by their names alone: not worth their CPU compiles
    train_implementations=(("auto", "auto"),),
    train_warmup=1, train_steps=2,
    needs_s={"correctness": 3, "kernel": 3, "torch": 3},
)
PLAN = DRY if DRY_RUN else GPU

# Implementations measured, by the names the APIs take. In the dry run the GPU-only ones run as their CPU
# stand-ins (see ``common_jax.attention_fn`` / ``cross_entropy_fn``); records keep the GPU names.
ATTENTION_IMPLEMENTATIONS = ("xla_chunked", "pallas_gpu", "cudnn")
CROSS_ENTROPY_IMPLEMENTATIONS = ("xla_chunked", "pallas_gpu")
LEARNING_RATE, WEIGHT_DECAY = 1e-5, 0.0

# Relative-error bounds (norm of the difference over the norm of the float32 reference): float32 under
# "highest" precision lands near 1e-6 (TF32 would be near 3e-4, so 5e-5 catches it); bf16 operands land
# between 1e-3 and 1e-2.
TOLERANCE = {"float32": 5e-5, "bfloat16": 2e-2}

def hf_config(model: dict) -> dict:
    """The Hugging Face ``config.json`` of a ``MODELS`` entry (LlamaForCausalLM)."""
    from sftjax.models.config import ModelConfig
    from sftjax.models.families import llama

    return llama.config_to_hf(ModelConfig(**model))
