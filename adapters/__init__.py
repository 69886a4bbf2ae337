"""Adapters: patch Hugging Face VLMs in place. One module per model family, registered by model_type."""
try:
    import transformers  # noqa: F401
except ImportError as err:  # an optional extra: the operators work without it
    raise ImportError("vlmcompress.adapters patches Hugging Face transformers models; install them with "
                      "pip install 'vlmcompress[hf]'") from err

from .patching import compressed, is_patched, patch, unpatch
from .pipeline import CompressionReport, ItemReport, compress_item, prepare_inputs
from .registry import adapter_for, register, supported_model_types

__all__ = ["CompressionReport", "ItemReport", "adapter_for", "compress_item", "compressed", "is_patched", "patch",
           "prepare_inputs", "register", "supported_model_types", "unpatch"]
