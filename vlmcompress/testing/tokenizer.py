"""Tiny offline tokenizers for the tiny test VLMs.

A byte-level BPE is trained with the `tokenizers` library on a small built-in English corpus (a few
hundred words, ~30 ms), so any text encodes without unknown tokens and decodes back exactly. Each model
family then gets its own copy with the special tokens its HF processor looks for, added as special
added tokens (never split, ids right after the BPE vocabulary), and a chat template in the family's
own layout (LLaVA's ``USER: ... ASSISTANT:`` or ChatML's ``<|im_start|>``), so
``processor.apply_chat_template(messages, tokenize=True, ...)`` works for image and video messages.

Nothing here downloads anything.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

__all__ = ["TokenizerSpec", "TOKENIZER_SPECS", "tiny_tokenizer", "round_vocab"]

# A few hundred words of plain English about pictures and video: enough for BPE to learn common merges,
# so prompts tokenize into a realistic handful of tokens rather than one token per byte.
_CORPUS = """
Describe this image in detail. What is shown in the picture? What happens in this video?
A small red car is parked next to a tall green tree on a quiet street in the morning.
Two children are playing with a brown dog in the park while their parents watch from a bench.
The video shows a person walking along the beach at sunset, and the waves roll onto the sand.
There is a cat sleeping on a blue sofa near the window, and the sun is shining through the glass.
A man in a black jacket rides a bicycle down the hill, passing houses with white fences.
The kitchen has a wooden table, four chairs, a bowl of fruit, and a lamp hanging from the ceiling.
In the first frame a bird sits on the branch; in the last frame it flies away over the river.
How many people are in the room? Which object is on the left? What color is the bus?
The camera pans slowly from the mountains to the lake, where a boat moves across the water.
A woman is cooking soup in a large pot, stirring it with a spoon and adding salt and pepper.
The city at night is full of lights, cars and people crossing the road at the busy corner.
Answer the question using a single word or phrase. Summarize the video in one sentence.
Please write a short caption for the image. The scene is bright, calm and clear.
Yes. No. Maybe. One, two, three, four, five, six, seven, eight, nine, ten.
The quick brown fox jumps over the lazy dog. A picture is worth a thousand words.
Time moves forward as the frames change: first, then next, then later, and finally at the end.
The man opens the door, looks outside, and then closes it again because it is raining.
Birds, trees, flowers, clouds, rocks, hills, roads, bridges, trains, planes and ships.
"""

_BPE_VOCAB = 512  # 256 bytes + ~256 merges; keeps embedding tables tiny


@dataclass(frozen=True)
class TokenizerSpec:
    """The special tokens and chat layout one family's processor expects.

    `special` lists every special token (order fixes ids: they follow the BPE vocabulary in this
    order). `named` maps tokenizer attributes (``eos_token``, ``pad_token``, InternVL's
    ``context_image_token`` ...) to tokens. `image`/`video` are the strings the chat template writes
    for an image or a video block, before the processor expands them.
    """

    style: str  # "llava" (USER:/ASSISTANT:) or "chatml"
    special: tuple[str, ...]
    named: dict[str, str] = field(default_factory=dict)
    image: str = "<image>\n"
    video: str = "<video>\n"


_LLAVA = TokenizerSpec(
    style="llava",
    special=("<pad>", "<s>", "</s>", "<image>", "<video>"),
    named={"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>"},
)
_CHATML_BASE = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
_CHATML_NAMED = {"pad_token": "<|endoftext|>", "eos_token": "<|im_end|>"}
_QWEN = TokenizerSpec(
    style="chatml",
    special=_CHATML_BASE + ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"),
    named=_CHATML_NAMED,
    image="<|vision_start|><|image_pad|><|vision_end|>",
    video="<|vision_start|><|video_pad|><|vision_end|>",
)

TOKENIZER_SPECS: dict[str, TokenizerSpec] = {
    "llava": _LLAVA,
    "llava_next": _LLAVA,
    "llava_next_video": _LLAVA,
    "llava_onevision": TokenizerSpec(
        style="chatml", special=_CHATML_BASE + ("<image>", "<video>"), named=_CHATML_NAMED
    ),
    "qwen2_vl": _QWEN,
    "qwen2_5_vl": _QWEN,
    "qwen3_vl": _QWEN,
    "internvl": TokenizerSpec(
        style="chatml",
        special=_CHATML_BASE + ("<img>", "</img>", "<IMG_CONTEXT>", "<video>"),
        # InternVLProcessor reads these four attributes off the tokenizer (real checkpoints store them
        # as `extra_special_tokens` in tokenizer_config.json).
        named={
            **_CHATML_NAMED,
            "start_image_token": "<img>",
            "end_image_token": "</img>",
            "context_image_token": "<IMG_CONTEXT>",
            "video_token": "<video>",
        },
        image="<IMG_CONTEXT>\n",
        video="<video>\n",
    ),
}


def _chat_template(spec: TokenizerSpec) -> str:
    """A Jinja chat template in the family's layout; content may be a string or a list of blocks."""
    image, video = spec.image.replace("\n", "\\n"), spec.video.replace("\n", "\\n")
    body = (
        "{%- if message['content'] is string -%}{{ message['content'] }}{%- else -%}"
        "{%- for block in message['content'] -%}"
        f"{{%- if block['type'] == 'image' -%}}{{{{ '{image}' }}}}"
        f"{{%- elif block['type'] == 'video' -%}}{{{{ '{video}' }}}}"
        "{%- elif block['type'] == 'text' -%}{{ block['text'] }}{%- endif -%}"
        "{%- endfor -%}{%- endif -%}"
    )
    if spec.style == "llava":
        return (
            "{%- for message in messages -%}"
            "{%- if message['role'] != 'system' -%}{{ message['role'].upper() + ': ' }}{%- endif -%}"
            + body
            + "{{ ' ' }}{%- endfor -%}"
            "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
        )
    return (
        "{%- for message in messages -%}"
        "{{ '<|im_start|>' + message['role'] + '\\n' }}" + body + "{{ '<|im_end|>\\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
    )


@functools.lru_cache(maxsize=1)
def _base_bpe_json() -> str:
    """Train the shared byte-level BPE once per process; returns its JSON (copied per family)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_BPE_VOCAB,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([line for line in _CORPUS.splitlines() if line.strip()], trainer=trainer)
    return tok.to_str()


def round_vocab(n: int, multiple: int = 64) -> int:
    """Embedding-table size for a tokenizer of `n` tokens (rounded up, as real checkpoints do)."""
    return -(-n // multiple) * multiple


@functools.lru_cache(maxsize=None)
def _cached_tokenizer(family: str):
    from tokenizers import AddedToken, Tokenizer
    from transformers import PreTrainedTokenizerFast

    if family not in TOKENIZER_SPECS:
        raise ValueError(f"family must be one of {sorted(TOKENIZER_SPECS)}, got {family!r}")
    spec = TOKENIZER_SPECS[family]
    tok = Tokenizer.from_str(_base_bpe_json())
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in spec.special])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        chat_template=_chat_template(spec),
        padding_side="left",
        model_max_length=4096,
        **spec.named,
    )


def tiny_tokenizer(family: str):
    """A fresh `PreTrainedTokenizerFast` for `family` (training is cached; the object is a copy).

    Special-token ids follow the BPE vocabulary in the order of ``TOKENIZER_SPECS[family].special``.
    Padding side is left (generation with batches).
    """
    import copy

    return copy.deepcopy(_cached_tokenizer(family))
