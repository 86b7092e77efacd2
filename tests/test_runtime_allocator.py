"""runtime.keep_freed_memory: big buffers are reused instead of page-faulted in again."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# glibc reuses the freed block only once its heap has settled: strace shows it growing the heap
# (brk, never munmap or madvise of these blocks) for the first 4 to 7 uses, after which every use
# reuses the same pages. 10 uses with the last 3 checked failed now and then (use 8 still faulting);
# 20 uses with the last 5 checked look at the settled heap only. In a fresh interpreter, so that no
# earlier test's allocations shape the heap.
_MEASURE = """
import json, resource, torch
from charlm.runtime import keep_freed_memory

def faults_of_one_use(numel):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(numel).sum()  # allocated, written, freed
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

active = keep_freed_memory()
numel = 48 * 2**20 // 4  # 48 MiB of float32: by default glibc mmaps and unmaps it at every use
print(json.dumps({"active": active, "faults": [faults_of_one_use(numel) for _ in range(20)] if active else []}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt only")
def test_freed_buffers_are_reused_without_page_faults():
    out = subprocess.run([sys.executable, "-c", _MEASURE], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if not result["active"]:
        pytest.skip("no glibc mallopt here")
    pages = 48 * 2**20 // 4096
    faults = result["faults"]
    assert len(faults) == 20 and faults[0] >= pages // 2  # the first use does map the block
    # The first uses map the memory (the heap takes a few to settle); after that it is reused.
    assert sum(faults[-5:]) < pages // 4, faults


def test_a_worker_of_nproc_knows_that_the_launcher_s_stderr_is_a_terminal(monkeypatch):
    """Under `train --nproc` the workers' stderr is a pipe to the launcher; its word decides the bar."""
    import io
    import sys

    from charlm.runtime import is_terminal

    monkeypatch.delenv("CHARLM_STDERR_IS_TERMINAL", raising=False)
    pipe = io.StringIO()
    monkeypatch.setattr(sys, "stderr", pipe)
    assert not is_terminal(sys.stderr)
    monkeypatch.setenv("CHARLM_STDERR_IS_TERMINAL", "1")
    assert is_terminal(sys.stderr) and not is_terminal(io.StringIO())  # only stderr itself


def test_cuda_and_cuda_n_are_refused_by_name_without_a_gpu(monkeypatch):
    """Catches: resolve_device recognising only 'cuda' (then 'cuda:1' on a machine without a GPU is called an
    unknown device, and on one with a GPU it is refused outright)."""
    import torch

    from charlm.errors import UsageError
    from charlm.runtime import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a machine without one
    for name in ("cuda", "cuda:0", "cuda:1"):
        with pytest.raises(UsageError, match=f"device '{name}' was asked for but this machine has no CUDA GPU"):
            resolve_device(name)


def test_auto_takes_the_gpu_when_there_is_one_and_the_cpu_otherwise(monkeypatch):
    """Catches: 'auto' resolving to the CPU whatever the machine (or to CUDA on a machine without it)."""
    import torch

    from charlm.runtime import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")


def test_an_unknown_device_name_is_a_usage_error():
    """Catches: any unknown --device (gpu, mps, a typo) silently run on the CPU."""
    from charlm.errors import UsageError
    from charlm.runtime import resolve_device

    for name in ("gpu", "CPU", "cpu:0x", "cudax", "cuda:abc", "cuda:", "cuda:-1"):
        with pytest.raises(UsageError, match=f"unknown device '{name}': use auto, cpu, cuda or cuda:N"):
            resolve_device(name)


def test_a_gpu_index_the_machine_does_not_have_is_a_usage_error(monkeypatch):
    """Catches: 'cudax' or 'cuda:abc' reaching torch.device on a machine with CUDA (a RuntimeError, exit 1),
    and 'cuda:3' on a one-GPU machine accepted until the first tensor moved there."""
    import torch

    from charlm.errors import UsageError
    from charlm.runtime import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0) and resolve_device("cuda") == torch.device("cuda")
    with pytest.raises(UsageError, match=r"device 'cuda:3' was asked for but this machine has 1 CUDA GPU \(cuda:0 "):
        resolve_device("cuda:3")
    for name in ("cudax", "cuda:01", "cuda:\u0661"):  # torch.device refuses a leading zero and other digits
        with pytest.raises(UsageError, match=f"unknown device '{name}'"):
            resolve_device(name)
