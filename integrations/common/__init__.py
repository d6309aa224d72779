"""Infrastructure shared by the training scripts of every integration.

Run directory with the resolved config, checkpoints that resume exactly, a progress bar,
TensorBoard, device/seed handling and torchrun / DistributedDataParallel set-up. The
integrations import only ``setperm`` and this module.
"""
from .checkpoint import load_checkpoint, save_checkpoint, latest_checkpoint, rng_state, set_rng_state
from .run import RunDir, add_kernel_argument, resolve_device, seed_everything, progress, config_to_dict
from .distributed import DistInfo, init_distributed, cleanup_distributed

__all__ = [
    "RunDir",
    "add_kernel_argument",
    "resolve_device",
    "seed_everything",
    "progress",
    "config_to_dict",
    "save_checkpoint",
    "load_checkpoint",
    "latest_checkpoint",
    "rng_state",
    "set_rng_state",
    "DistInfo",
    "init_distributed",
    "cleanup_distributed",
]
