"""Shared by every test file: one torch thread, and no hub.

The models in the tests are tiny, far too small to gain from more threads, and with other work on
the machine spinning thread pools slow them down many times over. Runs' numbers depend on the
thread count, so fixing it also keeps the asserted numbers the same on every machine.
"""

import os

import pytest
import torch

# Nothing here reads the hub: a name that is not a local folder fails at once rather than after
# the network's retries (the tests of a hub name's error message count on it).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="session")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _one_thread(one_thread, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # for child processes
