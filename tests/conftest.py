"""pytest set-up of the MGPP tests: the Triton interpreter, one intra-op thread, the markers, and
the backend fixtures over the table of tests/backends.py. The builders are in tests/helpers.py,
the comparisons in tests/compare.py."""
import os
import sys
from pathlib import Path

# The Triton backend's tests run its kernels on the CPU through the interpreter; it must be set
# before triton is first imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
# benchmarks/ is the repository's, not the package's: importable from the checkout's root (the
# tests share its bounds, benchmarks/common/agreement.py).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytest  # noqa: E402
import torch  # noqa: E402

import backends  # noqa: E402

# The tensors here are small: one intra-op thread keeps the suite fast on shared cores, where an
# OpenMP barrier can wait milliseconds for a descheduled sibling. Tests of the multi-threaded
# paths (several chunks, merged histograms) take the `all_threads` fixture.
MACHINE_THREADS = torch.get_num_threads()
torch.set_num_threads(1)

MARKERS = {
    "gpu": "needs a CUDA device (the cuda backend's rows, the CUDA build's device tests)",
    "slow": "takes long: the Triton interpreter's rows, fresh processes, fuzzing, compiling for "
            "GPU targets, the examples",
    "distributed": "starts torch.distributed process groups (gloo ranks in subprocesses)",
    "example": "runs a script of examples/ end to end",
}

# Modules whose every test carries a marker, for files that do not set `pytestmark` themselves.
MODULE_MARKERS = {
    "test_example_prune_sst2.py": ("example", "slow"),
    "test_bench_suite.py": ("slow",),
}


def pytest_configure(config):
    for name, description in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {description}")


def pytest_collection_modifyitems(config, items):
    for item in items:
        for name in MODULE_MARKERS.get(item.path.name, ()):
            item.add_marker(name)


@pytest.fixture(params=backends.params(backends.KERNELS))
def kernel_backend(request):
    """Each row of the table but the reference (skipped with its reason where it cannot run)."""
    return request.param


@pytest.fixture(params=backends.params(backends.ROWS))
def any_backend(request):
    """Each row of the table, the reference included."""
    return request.param


@pytest.fixture
def all_threads():
    threads = max(2, MACHINE_THREADS)
    torch.set_num_threads(threads)
    yield threads
    torch.set_num_threads(1)


HOST_READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__")


@pytest.fixture
def forbid_host_reads(monkeypatch):
    """Makes every way of reading a tensor's value on the host fail when it is called from the
    files given to the returned function (on a GPU each would synchronise with the device)."""
    def forbid(files):
        watched = {str(Path(f).resolve()) for f in files}

        def guard(name, original):
            def guarded(self, *args, **kwargs):
                caller = str(Path(sys._getframe(1).f_code.co_filename).resolve())
                if caller in watched:
                    raise AssertionError(f"Tensor.{name} called from {caller}")
                return original(self, *args, **kwargs)
            return guarded

        for name in HOST_READS:
            monkeypatch.setattr(torch.Tensor, name, guard(name, getattr(torch.Tensor, name)))
        original_to = torch.Tensor.to

        def guarded_to(self, *args, **kwargs):
            caller = str(Path(sys._getframe(1).f_code.co_filename).resolve())
            targets = list(args) + list(kwargs.values())
            if caller in watched and any(str(a) == "cpu" for a in targets):
                raise AssertionError(f"Tensor.to(cpu) called from {caller}")
            return original_to(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, "to", guarded_to)
    return forbid
