import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def shared_data_root() -> Path:
    env = os.environ.get("SETPERM_DATA_ROOT")
    return Path(env) if env else (REPO.parent / "shared" / "data")


@pytest.fixture(autouse=True)
def _few_threads():
    # CI has 2 cores; keep tests deterministic in speed and avoid oversubscription.
    prev = torch.get_num_threads()
    torch.set_num_threads(min(prev, 2))
    yield
    torch.set_num_threads(prev)
