"""Adapters: patch Hugging Face VLMs in place. One module per model family, registered by model_type."""
from .patching import compressed, is_patched, patch, unpatch
from .pipeline import CompressionReport, ItemReport, compress_item, prepare_inputs
from .registry import adapter_for, register, supported_model_types

__all__ = ["CompressionReport", "ItemReport", "adapter_for", "compress_item", "compressed", "is_patched", "patch",
           "prepare_inputs", "register", "supported_model_types", "unpatch"]
