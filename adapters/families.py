"""Importing this module registers every family adapter."""
from . import llava  # noqa: F401
from . import llava_next  # noqa: F401
from . import llava_onevision  # noqa: F401
from . import qwen_vl  # noqa: F401
from . import internvl  # noqa: F401
