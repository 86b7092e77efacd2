"""runtime.keep_freed_memory: big buffers are reused instead of page-faulted in again."""

from __future__ import annotations

import resource
import sys

import pytest
import torch

from charlm.runtime import keep_freed_memory


def _faults_of_one_use(numel: int) -> int:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(numel).sum()  # allocated, written, freed
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt only")
def test_freed_buffers_are_reused_without_page_faults():
    if not keep_freed_memory():
        pytest.skip("no glibc mallopt here")
    numel = 48 * 2**20 // 4  # 48 MiB of float32: by default glibc mmaps and unmaps it at every use
    pages = numel * 4 // 4096
    faults = [_faults_of_one_use(numel) for _ in range(10)]
    # The first uses map the memory (the heap may take a few to settle); after that it is reused.
    assert sum(faults[-3:]) < pages // 4, faults
