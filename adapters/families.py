"""Importing this module registers every family adapter."""
from . import llava  # noqa: F401
