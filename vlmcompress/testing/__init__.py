"""Helpers for tests, examples and benchmarks: synthetic videos, tiny models, offline tokenizers.

Import the submodules directly (``from vlmcompress.testing.video import make_test_video``); this
package imports nothing heavy on its own.
"""
