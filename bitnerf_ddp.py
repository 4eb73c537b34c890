"""What is specific to BitNeRF under DistributedDataParallel (exp6); the loop itself is train.py's.

torchao's BitNet training weights are tensor subclasses wrapping an fp32 tensor. DDP must see them as the
parameters they are: it broadcasts rank 0's weights at construction and all-reduces their gradients, which
are plain fp32 tensors (torchao's backward returns them), so the latent fp32 weights stay identical on every
rank and each rank's ternary weights - recomputed from them every forward - are identical too. What goes
wrong otherwise, as in the original NeRF-Experiments code: quantizing rank 0's live model in place
mid-training leaves the ranks training different models, and calling `model.module` for the forward
bypasses the gradient all-reduce.
Export and checkpoints come from the unwrapped module on rank 0 only (train.py), never from the DDP
wrapper.
"""
from torch.nn.parallel import DistributedDataParallel as DDP


def check_bitnet_weights(module):
    """Fail early if QAT was not applied before wrapping (DDP would then train plain fp32 weights)."""
    quantized = [n for n, p in module.named_parameters() if type(p).__name__ == "BitNetTrainingLinearWeight"]
    if not quantized:
        raise ValueError("wrap_bitnerf: quantize_for_training must run before DDP wraps the model")
    return quantized


def wrap_bitnerf(module, device):
    """DDP around a QAT BitNeRF; gradients are bucketed as plain fp32 (see the module docstring)."""
    check_bitnet_weights(getattr(module, "_orig_mod", module))
    return DDP(module, device_ids=[device.index] if device.type == "cuda" else None)
