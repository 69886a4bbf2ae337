"""Test-wide settings.

- Triton's interpreter must be chosen before ``triton`` is first imported (transformers imports it
  when a model class loads), so on a machine without CUDA it is switched on here, before anything else.
- The suite runs under pytest-xdist with one worker per core, so each worker uses one torch thread:
  on the 2-core CI machine two threads per worker were ~6x slower under load.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(1)
