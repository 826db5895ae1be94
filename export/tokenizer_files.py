"""Write CLIP tokenizer folders (vocab.json, merges.txt, configs) without downloading anything.

Random-weight "tiny" models ship a byte-level vocabulary from here; tests build the real CLIP
vocabulary from open_clip's BPE merges file with the same writer.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

from sdrt.atomic_files import write_atomic

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"

# CLIP's vocabulary: 49 152 BPE entries = 256 bytes + 256 bytes with "</w>" + 48 894 merges
# + the 2 special tokens (OpenAI's clip/simple_tokenizer.py).
CLIP_MERGE_COUNT = 49152 - 256 - 2

# The first merges of the real CLIP BPE that join only lowercase letters, in CLIP's order, so
# common English words in a tiny model's prompt become a few tokens instead of one per letter.
ENGLISH_MERGES = (
    "i n", "t h", "a n", "r e", "a r", "e r", "th e</w>", "in g</w>", "o u", "o n", "s t",
    "o r", "e n", "o n</w>", "a l", "a t", "e r</w>", "i t", "i n</w>", "t o</w>", "r o",
    "i s</w>", "l e", "i c", "a t</w>", "an d</w>", "e d</w>", "o f</w>", "c h", "o r</w>",
    "e s</w>", "i l", "e l", "s t</w>", "a c", "o m", "a m", "l o", "a n</w>", "a y</w>", "s h",
    "r i", "l i", "t i", "f or</w>", "n e", "r a", "h a", "d e", "o l", "v e</w>", "s i", "u r",
    "a l</w>", "s e", "u n", "d i", "b e", "l a", "w h", "o o", "d ay</w>", "e n</w>", "m a",
    "n o", "l e</w>", "t o", "ou r</w>", "i r", "g h", "w it", "i t</w>", "y o", "a s", "s p",
    "th is</w>", "t s</w>", "at i", "yo u</w>", "wit h</w>", "a d", "i s", "a b", "l y</w>",
    "w e", "th e", "t e", "a s</w>", "a g", "v i", "p p", "s u", "h o", "m y</w>", "b u", "c om",
    "s e</w>", "er s</w>", "m e", "m e</w>", "al l</w>", "c on", "m o", "k e</w>", "g e",
    "ou t</w>", "en t</w>", "c o", "f e", "v er", "a r</w>", "f ro", "a u", "p o", "c e</w>",
    "gh t</w>", "ar e</w>", "s s</w>", "fro m</w>", "c h</w>", "t r", "ou n", "on e</w>",
    "b y</w>", "d o", "t h</w>", "w or", "er e</w>",
)  # fmt: skip


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) byte -> printable character table, in vocabulary order."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table = {byte: chr(byte) for byte in printable}
    # Bytes without a printable character map to code points 256, 257, ... in byte order.
    unprintable = [byte for byte in range(256) if byte not in table]
    table.update({byte: chr(256 + offset) for offset, byte in enumerate(unprintable)})
    return table


def write_byte_level_clip_vocab(
    directory: str | os.PathLike, merges: int = 0, pad_token: str = EOS_TOKEN
) -> int:
    """Write a minimal CLIP tokenizer folder: 512 byte tokens, `merges` English merges, specials.

    `pad_token` is "<|endoftext|>" for SD 1.x and "!" for SD 2.x / SDXL's second tokenizer.
    Returns the vocabulary size (a text encoder using it needs vocab_size >= this).
    """
    if not 0 <= merges <= len(ENGLISH_MERGES):
        raise ValueError(
            f"merges={merges} is out of range; pass a number from 0 to {len(ENGLISH_MERGES)}."
        )
    return write_clip_vocab(directory, list(ENGLISH_MERGES[:merges]), pad_token=pad_token)


def write_clip_vocab_from_bpe(
    directory: str | os.PathLike, bpe_path: str | os.PathLike, pad_token: str = EOS_TOKEN
) -> int:
    """Write the real CLIP tokenizer folder from OpenAI's `bpe_simple_vocab_16e6.txt.gz`.

    Returns the vocabulary size (49 408).
    """
    with gzip.open(bpe_path, "rt", encoding="utf-8") as bpe_file:
        lines = bpe_file.read().split("\n")
    # The first line is a header; CLIP keeps exactly the next CLIP_MERGE_COUNT lines.
    merges = lines[1 : CLIP_MERGE_COUNT + 1]
    if len(merges) != CLIP_MERGE_COUNT:
        raise ValueError(
            f"{bpe_path} has {len(merges)} merges, CLIP needs {CLIP_MERGE_COUNT}; it is truncated."
        )
    return write_clip_vocab(directory, merges, pad_token=pad_token)


def write_clip_vocab(
    directory: str | os.PathLike, merges: list[str], pad_token: str = EOS_TOKEN
) -> int:
    """Write vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json.

    The vocabulary is built the way CLIP builds it: byte characters, the same with "</w>", one
    entry per merge, then the two special tokens. Returns the vocabulary size.
    """
    byte_tokens = list(bytes_to_unicode().values())
    tokens = byte_tokens + [token + "</w>" for token in byte_tokens]
    tokens += ["".join(merge.split(" ")) for merge in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError("The merges produce duplicate vocabulary entries; each merge must be new.")
    if pad_token not in vocab:
        raise ValueError(
            f"pad_token {pad_token!r} is not in the vocabulary; use {EOS_TOKEN!r} or '!'."
        )

    special_tokens = {
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": EOS_TOKEN,
        "pad_token": pad_token,
    }
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "do_lower_case": True,
        "errors": "replace",
        "add_prefix_space": False,
        **special_tokens,
    }
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_atomic(directory / "vocab.json", json.dumps(vocab, ensure_ascii=False))
    write_atomic(directory / "merges.txt", "#version: 0.2\n" + "".join(m + "\n" for m in merges))
    write_atomic(directory / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")
    write_atomic(directory / "special_tokens_map.json", json.dumps(special_tokens, indent=2) + "\n")
    return len(vocab)
