"""A small word-level tokenizer for random Dia2 checkpoints, in the published checkpoint's file layout.

A published repo's tokenizer is a `tokenizer.json` with `[S1]`/`[S2]` as added tokens; this one has
the same files (`tokenizer.json`, `tokenizer_config.json`) and ids: BOS is id 0 (so the reference feeds
1 instead, as it does with the published tokenizer), the config's text pad, new-word and zero ids name
tokens of their own, and the rest of the vocabulary is whole lowercase words and punctuation.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers

from dia_ort.dia2_config import Dia2Config

WORDS = [
    ".",
    ",",
    "?",
    "!",
    "'",
    "-",
    "hello",
    "there",
    "how",
    "are",
    "you",
    "today",
    "i",
    "am",
    "fine",
    "thanks",
    "what",
    "is",
    "your",
    "name",
    "my",
    "it",
    "a",
    "an",
    "the",
    "and",
    "or",
    "but",
    "so",
    "yes",
    "no",
    "not",
    "this",
    "that",
    "here",
    "we",
    "they",
    "he",
    "she",
    "do",
    "does",
    "did",
    "can",
    "will",
    "would",
    "good",
    "great",
    "well",
    "okay",
    "time",
    "day",
    "night",
    "now",
    "then",
    "just",
    "like",
    "know",
    "think",
    "see",
    "say",
    "said",
    "go",
    "going",
    "come",
    "talk",
    "dialogue",
    "model",
    "speech",
    "voice",
    "open",
    "weights",
    "text",
    "to",
    "of",
    "in",
    "on",
    "for",
    "with",
    "at",
    "by",
    "from",
]
SPECIAL = {"<bos>": 0, "<unk>": 1, "[S1]": 5, "[S2]": 6}


def write_tokenizer(folder: Path, config: Dia2Config) -> list[str]:
    """`tokenizer.json` and `tokenizer_config.json` with `config.text_vocab_size` ids at most; their names."""
    fixed = SPECIAL | {
        "<pad>": config.text_pad_id,
        "<new_word>": config.text_new_word_id,
        "<zero>": config.text_zero_id,
    }
    if len(set(fixed.values())) != len(fixed) or max(fixed.values()) >= config.text_vocab_size:
        raise ValueError(f"the test tokenizer needs distinct ids below {config.text_vocab_size}: {fixed}")
    vocab = dict(fixed)
    free = (i for i in range(config.text_vocab_size) if i not in fixed.values())
    for word, index in zip(WORDS, free, strict=False):
        vocab[word] = index
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens(
        [AddedToken(tag, special=True, normalized=False) for tag in ("[S1]", "[S2]")]
    )
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    settings = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<bos>", "unk_token": "<unk>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(settings, indent=2) + "\n")
    return ["tokenizer.json", "tokenizer_config.json"]
