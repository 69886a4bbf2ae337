"""The README's example: patch a model, generate as usual, read what was compressed.

Runs offline with a tiny random model; swap in a hub id or a local folder for real weights:
    model = AutoModelForImageTextToText.from_pretrained("llava-hf/llava-onevision-qwen2-0.5b-ov-hf")
    processor = AutoProcessor.from_pretrained("llava-hf/llava-onevision-qwen2-0.5b-ov-hf")
"""
import numpy as np
import torch

import vlmcompress as vc
from vlmcompress.testing.tiny_models import tiny_model_and_processor

model, processor = tiny_model_and_processor("qwen2_vl")            # or AutoModelForImageTextToText.from_pretrained(...)
video = np.random.default_rng(0).integers(0, 255, (8, 64, 64, 3), dtype=np.uint8)   # [T, H, W, 3]
chat = [{"role": "user", "content": [{"type": "video", "video": video},
                                     {"type": "text", "text": "What happens in this video?"}]}]
inputs = processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=True,
                                       return_dict=True, return_tensors="pt")

vc.patch(model, vc.CompressionConfig(keep_ratio=0.25, temporal_threshold=0.9, v2pe_delta=0.5))
with torch.no_grad():
    out = model.generate(**inputs, max_new_tokens=8, do_sample=False)   # unchanged user code
print(model.vlmcompress.report.summary())
vc.unpatch(model)                                                       # the original model again
