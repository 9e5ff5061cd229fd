"""Suite-wide test settings: one thread, and the benchmark suites (outside the package) on sys.path."""

import sys
from pathlib import Path

import pytest
import torch

# benchmarks/suites (training code that needs scikit-learn) is not installed with rankwise; the merge tests
# train their small models with it, imported as ``suites`` like the benchmark scripts do.
BENCHMARKS = str(Path(__file__).resolve().parents[1] / "benchmarks")
if BENCHMARKS not in sys.path:
    sys.path.insert(0, BENCHMARKS)


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


def pytest_collection_modifyitems(config, items):
    # Tests marked ``cuda`` need a GPU: skipped (not failed) where torch sees none, so that the CPU CI
    # collects them and benchmarks/gpu_check.sh runs exactly these with ``-m cuda`` on a GPU machine.
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
