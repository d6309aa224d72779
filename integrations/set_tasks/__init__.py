"""Set-to-vector tasks: setperm side by side with the set encoders users pick today.

``python -m integrations.set_tasks run`` trains every (task, encoder, seed) cell and writes
``<out>/results``; see README.md. PyG (``torch_geometric``) is needed for the baselines.
"""
from .data import ElementPool, SetBatch, fingerprint, fixed_sets, random_sizes, sample_sets
from .encoders import BASELINES, DEFAULT_ENCODERS, ENCODERS, INVARIANT, OURS, EncoderConfig, build_encoder, match_width
from .model import SetModel, build_model
from .report import summarize, write_report
from .runner import EXTENDS, plan_cells, run_suite, suite_config
from .tasks import TASKS, Task, get_task
from .train import TrainConfig, evaluate, run_cell

__all__ = [
    "TASKS", "Task", "get_task",
    "ElementPool", "SetBatch", "sample_sets", "fixed_sets", "random_sizes", "fingerprint",
    "ENCODERS", "DEFAULT_ENCODERS", "BASELINES", "OURS", "INVARIANT", "EncoderConfig", "build_encoder", "match_width",
    "SetModel", "build_model",
    "TrainConfig", "run_cell", "evaluate",
    "run_suite", "plan_cells", "suite_config", "EXTENDS",
    "summarize", "write_report",
]
