"""Test-wide settings. The suite runs under pytest-xdist with one worker per core, so each worker
uses one torch thread: on the 2-core CI machine two threads per worker were ~6x slower under load."""
import torch

torch.set_num_threads(1)
