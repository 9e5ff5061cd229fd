"""Suite-wide test settings."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    # The suite's tensors are small: with several BLAS/OpenMP threads on a 2-core machine most of the
    # time goes to thread barriers (measured up to 30x slower). One thread for every test, and for the
    # module-scoped fixtures too: BLAS results may differ in the last bits between thread counts, and
    # tests compare a fixture's output (e.g. a CLI run) with the same job run again bit for bit.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
