"""Byte-level BPE tokenizers with Qwen2-VL's special tokens, and the Qwen2-VL chat template.

Real checkpoints ship their own ``tokenizer.json``; these are for the small checkpoints edge-duet makes itself
(random test models and the trained demo model).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from edge_duet.protocol import DEMO_SYSTEM_PROMPT, MUST_REPLY_PREFIX, NO_REPLY, QWEN_SYSTEM_PROMPT

# Order matters only for the ids they get; Qwen puts them right after the BPE vocabulary.
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# Qwen2-VL's template, reduced to what a proactive dialogue uses (system / user with images and text / assistant).
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    + QWEN_SYSTEM_PROMPT + "<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def default_corpus() -> list[str]:
    """A small English corpus covering the protocol's fixed phrases and everyday scene words."""
    colours = "red green blue yellow white black orange purple pink brown grey".split()
    shapes = "circle square triangle star ring box ball cup person car dog cat hand bowl egg".split()
    verbs = "appears moves leaves enters stops turns changes falls opens closes picks puts holds".split()
    lines = [
        NO_REPLY,
        MUST_REPLY_PREFIX,
        DEMO_SYSTEM_PROMPT,
        QWEN_SYSTEM_PROMPT,
        "What is happening in the video? Tell me when something changes.",
        "What is the cook doing? She is cracking two eggs into a bowl.",
        "How many objects are there? There are three objects now.",
        "Tell me when a new object appears. Describe what you see.",
    ]
    for i, c in enumerate(colours):
        for j, s in enumerate(shapes):
            v = verbs[(i + j) % len(verbs)]
            lines.append(f"A {c} {s} {v}. The {s} is {c}. Is there a {c} {s}? Yes, a {c} {s} {v} on the left.")
    lines += [f"There are {n} objects. {n} {s}s." for n in range(10) for s in shapes[:4]]
    return lines


def build_tokenizer(corpus: Iterable[str] | None = None, vocab_size: int = 512) -> Tokenizer:
    """Train a byte-level BPE tokenizer (Qwen-style: NFC, byte-level, special tokens after the vocabulary)."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(list(corpus if corpus is not None else default_corpus()), trainer=trainer)
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return tok


def write_tokenizer_files(out_dir: str | Path, tok: Tokenizer, chat_template: str = CHAT_TEMPLATE) -> None:
    """Write the files a Qwen2.5-VL checkpoint carries for its tokenizer, loadable by transformers offline."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    added = {
        str(tok.token_to_id(t)): {
            "content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True
        }
        for t in SPECIAL_TOKENS
    }
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "model_max_length": 32768,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "bos_token": None,
        "unk_token": None,
        "add_bos_token": False,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "split_special_tokens": False,
        "added_tokens_decoder": added,
        "chat_template": chat_template,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "chat_template.jinja").write_text(chat_template)
    (out / "special_tokens_map.json").write_text(
        json.dumps({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, indent=2) + "\n"
    )
