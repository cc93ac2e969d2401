from pallas_kernels.cross_entropy.api import CrossEntropyResult, fused_linear_cross_entropy, project_logits

__all__ = ["CrossEntropyResult", "fused_linear_cross_entropy", "project_logits"]
