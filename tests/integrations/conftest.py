import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    # The integration tests run small tensors: a second intra-op thread only adds synchronisation,
    # and on a busy 2-core machine OpenMP's spinning threads made them many times slower (an index
    # op measured 27 ms with 2 threads vs 0.01 ms with 1).
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)
