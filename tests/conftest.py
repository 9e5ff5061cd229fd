"""Suite-wide test settings."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    # The suite's tensors are small: with several BLAS/OpenMP threads on a 2-core machine most of the
    # time goes to thread barriers (measured up to 30x slower). One thread for every test.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
