"""Configs, tokenizer and processors of the task-trained tiny VLMs (before training).

The models are the real `transformers` classes, small: frames of 64×64 px in 8-px patches, a 3-layer
vision tower of width 128 and a 3-layer LLM of width 128. That is large enough to resolve a 16-px
shape and a 10×14-px digit, and small enough to train from scratch on two CPU cores in about half an
hour.

- ``llava_onevision``: SigLIP tower → 8×8 patches per frame, pooled by the model to 4×4 = 16 tokens per
  frame, plus one newline token per video; Qwen2 LLM with 1-D RoPE.
- ``qwen2_vl``: Qwen2-VL tower (temporal patch 2, 2×2 merger) → 16 tokens per pair of frames; M-RoPE.

The tokenizer is a byte-level BPE trained on a small English corpus plus the benchmark's own text, so
every answer of :data:`vlmcompress.synthetic.ANSWERS` is a single token (checked here).
"""
from __future__ import annotations

import functools
from typing import Any

from ..synthetic import ANSWERS, QUESTIONS

__all__ = ["FAMILIES", "FRAME_SIZE", "seeing_tokenizer", "seeing_config", "seeing_processor", "seeing_model",
           "DESCRIBE"]

FAMILIES = ("llava_onevision", "qwen2_vl")
FRAME_SIZE = 64
PATCH = 8
DESCRIBE = "Describe the video."
_TEXT = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=8192)
_VISION = dict(hidden=128, heads=4, layers=3, mlp=256)
_BPE_VOCAB = 700


def _corpus() -> list[str]:
    from ..testing.tokenizer import _CORPUS

    words = [w for answers in ANSWERS.values() for w in answers]
    lines = [line for line in _CORPUS.splitlines() if line.strip()]
    lines += list(QUESTIONS.values()) * 20 + [DESCRIBE] * 20
    # Each answer alone and after a space, many times, so BPE gives it one token in both spellings.
    lines += [" ".join(words)] * 50 + [w for w in words for _ in range(20)]
    lines += ["a red square moves left; the digit 7", "three shapes", "a blue flash, then a green flash"] * 20
    return lines


@functools.lru_cache(maxsize=None)
def _tokenizer(family: str):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from ..testing.tokenizer import TOKENIZER_SPECS, _chat_template

    spec = TOKENIZER_SPECS[family]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=_BPE_VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_corpus(), trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in spec.special])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=_chat_template(spec), padding_side="left",
                                   model_max_length=8192, **spec.named)
    for answers in ANSWERS.values():
        for word in answers:
            if len(fast.encode(word, add_special_tokens=False)) != 1:
                raise AssertionError(f"answer {word!r} is not one token")
    return fast


def seeing_tokenizer(family: str):
    """A fresh copy of the family's tokenizer (ChatML template, left padding)."""
    import copy

    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    return copy.deepcopy(_tokenizer(family))


def _ids(tok, family: str) -> dict[str, int]:
    from ..testing.tokenizer import TOKENIZER_SPECS, round_vocab

    special = {t: tok.convert_tokens_to_ids(t) for t in TOKENIZER_SPECS[family].special}
    return {**special, "vocab_size": round_vocab(len(tok))}


def _text_config(ids: dict[str, int], **extra: Any) -> dict[str, Any]:
    return {**_TEXT, "vocab_size": ids["vocab_size"], "pad_token_id": ids["<|endoftext|>"],
            "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"], "tie_word_embeddings": True,
            **extra}


def seeing_config(family: str):
    """The untrained `PretrainedConfig` of `family`."""
    import transformers as tf

    tok = seeing_tokenizer(family)
    ids = _ids(tok, family)
    if family == "llava_onevision":
        return tf.LlavaOnevisionConfig(
            vision_config=dict(model_type="siglip_vision_model", hidden_size=_VISION["hidden"],
                               intermediate_size=_VISION["mlp"], num_hidden_layers=_VISION["layers"],
                               num_attention_heads=_VISION["heads"], image_size=FRAME_SIZE, patch_size=PATCH,
                               vision_use_head=False),
            text_config={"model_type": "qwen2", **_text_config(ids)},
            image_token_index=ids["<image>"], video_token_index=ids["<video>"],
            vision_feature_select_strategy="full", vision_feature_layer=-1,
            image_grid_pinpoints=[[64, 64], [64, 128], [128, 64], [128, 128]], vision_aspect_ratio="anyres_max_9",
            tie_word_embeddings=True,
        )
    head_dim = _TEXT["hidden_size"] // _TEXT["num_attention_heads"]
    return tf.Qwen2VLConfig(
        vision_config=dict(depth=_VISION["layers"], embed_dim=_VISION["hidden"], hidden_size=_TEXT["hidden_size"],
                           mlp_ratio=_VISION["mlp"] // _VISION["hidden"], num_heads=_VISION["heads"],
                           patch_size=PATCH, spatial_merge_size=2, temporal_patch_size=2),
        # mrope_section splits head_dim/2 = 16 rotary pairs over (t, h, w), as the real [16, 24, 24]/64.
        text_config=_text_config(ids, rope_parameters={"rope_type": "default",
                                                        "mrope_section": [head_dim // 8, 3 * head_dim // 16,
                                                                          3 * head_dim // 16]}),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )


def seeing_processor(family: str):
    """The family's real HF processor for 64-px frames, with :func:`seeing_tokenizer`."""
    import transformers as tf

    tok = seeing_tokenizer(family)
    if family == "llava_onevision":
        s = FRAME_SIZE
        return tf.LlavaOnevisionProcessor(
            image_processor=tf.LlavaOnevisionImageProcessor(
                size={"height": s, "width": s}, image_grid_pinpoints=[[64, 64], [64, 128], [128, 64], [128, 128]]),
            tokenizer=tok,
            video_processor=tf.LlavaOnevisionVideoProcessor(size={"height": s, "width": s}),
            num_image_tokens=(s // PATCH) ** 2, vision_feature_select_strategy="full",
            vision_aspect_ratio="anyres_max_9", chat_template=tok.chat_template,
        )
    kw = dict(patch_size=PATCH, temporal_patch_size=2, merge_size=2,
              size={"shortest_edge": 32 * 32, "longest_edge": FRAME_SIZE * FRAME_SIZE})
    return tf.Qwen2VLProcessor(image_processor=tf.Qwen2VLImageProcessor(**kw), tokenizer=tok,
                               video_processor=tf.Qwen2VLVideoProcessor(**kw, cap_pixels_per_frame=True), chat_template=tok.chat_template)


def seeing_model(family: str, *, seed: int = 0):
    """A freshly initialised model of `family` (train mode, fp32, SDPA), with its generation config set."""
    import torch
    from transformers import AutoModelForImageTextToText

    config = seeing_config(family)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, attn_implementation="sdpa")
    text = config.get_text_config()
    gen = model.generation_config
    gen.pad_token_id, gen.eos_token_id, gen.bos_token_id = text.pad_token_id, text.eos_token_id, text.bos_token_id
    gen.do_sample = False
    return model
