"""Process-wide torch settings, changed only inside a scope that restores them.

Library calls (a scan, a purification, a lab build) never leave torch's thread count or its
deterministic-algorithm switch changed for the program that embeds clipguard: they enter
:func:`torch_settings` and the previous values come back on exit, even on an exception.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch


@contextmanager
def torch_settings(threads: int | None = None, deterministic: bool | None = None) -> Iterator[None]:
    """Run the enclosed block with ``threads`` torch CPU threads and deterministic kernels.

    ``None`` leaves a setting as it is. On exit the thread count and the
    ``torch.use_deterministic_algorithms`` switch (with its ``warn_only`` flag) are what they
    were on entry.
    """
    previous_threads = torch.get_num_threads()
    previous_deterministic = torch.are_deterministic_algorithms_enabled()
    previous_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        if threads is not None:
            torch.set_num_threads(max(1, threads))
        if deterministic is not None:
            torch.use_deterministic_algorithms(deterministic, warn_only=True)
        yield
    finally:
        torch.set_num_threads(previous_threads)
        torch.use_deterministic_algorithms(previous_deterministic, warn_only=previous_warn_only)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators with ``seed``.

    Deterministic kernels are a separate, scoped choice: :func:`torch_settings`.
    """
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


#: the most torch threads the command line uses unless told otherwise (``--threads``)
CLI_DEFAULT_MAX_THREADS = 2


def cli_threads(requested: int | None) -> int:
    """The torch thread count of a command: ``requested`` (``--threads`` or
    ``CLIPGUARD_THREADS``) when given, else the smaller of torch's current count and
    :data:`CLI_DEFAULT_MAX_THREADS`, the count the plugins capped themselves at before the
    command line chose it: a command gives the same results as then."""
    if requested is not None:
        return requested
    return min(torch.get_num_threads(), CLI_DEFAULT_MAX_THREADS)
