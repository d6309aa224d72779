"""What the training scripts of every integration share.

* :mod:`.lifecycle`: the run rule (start / refuse / resume / overwrite / finish / interrupt) and
  :func:`open_run`; the README's "Runs" section describes it.
* :mod:`.atomic`: atomic file writes (temporary names unique to the writer) and the OS error behind a failure.
* :mod:`.checkpoint`: atomic checkpoint files loaded with ``weights_only=True``.
* :mod:`.seeding`: random streams keyed by (seed, step, ...).
* :mod:`.pool`: the units of a sweep in worker processes, with the run rule's interrupt behaviour.
* :mod:`.datasets`: readers of the image data sets (MNIST, Fashion-MNIST, CIFAR-10, Tiny ImageNet).
* :mod:`.safe_pickle`: the official pickle formats read without running code from the file.
* :mod:`.cli`: checked argument types, the shared flags, the data root, the entry point.
* :mod:`.stats`: mean ± std over seeds, paired tests; :mod:`.figures`: the reports' PNG figures.
* :mod:`.progress`: a bar on a terminal, a line at an interval in a log file.
* :mod:`.distributed`: torchrun / DistributedDataParallel set-up.

The integrations import only ``setperm`` and this package.
"""
from .checkpoint import CheckpointError, latest_checkpoint, load_latest, read_checkpoint, run_folder
from .cli import (CommandError, add_data_root_argument, add_kernel_argument, add_threads_argument, add_run_arguments, data_root, default_data_root,
                  device_name, non_negative_float, non_negative_int, positive_float, positive_int,
                  refuse_po_u_without_steps, resolve_device, run_command, set_threads, HelpFormatter, with_help_formatter)
from .distributed import DistInfo, cleanup_distributed, init_distributed, launched_rank
from .lifecycle import (NonFiniteError, Run, RunError, RunInterrupted, StopNow, ensure_new, finite_loss, open_run,
                        write_json, write_new_json)
from .progress import progress
from .safe_pickle import UnsafePickleError, restricted_load
from .seeding import generator, seed_everything, seeded_generator, step_seed

__all__ = [
    "open_run", "Run", "RunError", "RunInterrupted", "StopNow", "NonFiniteError", "finite_loss", "ensure_new",
    "write_json", "write_new_json",
    "CheckpointError", "read_checkpoint", "load_latest", "latest_checkpoint", "run_folder",
    "step_seed", "generator", "seeded_generator", "seed_everything",
    "restricted_load", "UnsafePickleError",
    "CommandError", "positive_int", "non_negative_int", "positive_float", "non_negative_float", "device_name", "resolve_device",
    "refuse_po_u_without_steps",
    "add_kernel_argument", "add_threads_argument", "add_run_arguments", "add_data_root_argument", "data_root", "default_data_root",
    "set_threads", "run_command", "HelpFormatter", "with_help_formatter",
    "progress",
    "DistInfo", "init_distributed", "cleanup_distributed", "launched_rank",
]
