"""T5 tokenizer: prompt strings -> padded token ids, from the checkpoint's tokenizer.json.

Keeps the file's Unigram model and normalizer and sets the rest as transformers' T5Tokenizer
(5.x) does whatever the file says: words split on whitespace, Metaspace "▁" before each, "</s>"
appended; then truncation and padding to the bundle's `t5_max_length`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, pre_tokenizers, processors

from .errors import UserError
from .tokenizer import _check_prompts, _read_optional_json

FIX = "copy the checkpoint's T5 tokenizer folder (with tokenizer.json) into the bundle"


class T5Tokenizer:
    """Turns prompts into the (batch, max_length) ids a T5 encoder takes: tokens, "</s>",
    then pad ids; "</s>" stays last when a prompt is truncated."""

    def __init__(self, tokenizer: Tokenizer, pad_token_id: int):
        self.tokenizer = tokenizer
        self.pad_token_id = pad_token_id

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> T5Tokenizer:
        directory = Path(path)
        file = directory / "tokenizer.json"
        if not file.is_file():
            raise UserError(f"T5 tokenizer file {str(file)!r} is missing; {FIX}.")
        try:
            tokenizer = Tokenizer.from_file(str(file))
        except Exception as error:  # tokenizers raises a bare Exception on a bad file
            raise UserError(f"Cannot read {str(file)!r} ({error}); {FIX}.") from error
        eos_id = tokenizer.token_to_id("</s>")
        if eos_id is None:
            raise UserError(f"{str(file)!r} has no </s> token, so it is not a T5 tokenizer; {FIX}.")
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.WhitespaceSplit(),
                pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
            ]
        )
        tokenizer.post_processor = processors.TemplateProcessing(
            single="$A </s>", special_tokens=[("</s>", eos_id)]
        )
        pad = _read_optional_json(directory / "tokenizer_config.json").get("pad_token", "<pad>")
        pad_id = tokenizer.token_to_id(pad if isinstance(pad, str) else pad.get("content", ""))
        if pad_id is None:
            raise UserError(f"The pad token {pad!r} is not in {str(file)!r}; {FIX}.")
        return cls(tokenizer, pad_id)

    def encode(self, prompts: Sequence[str], max_length: int) -> np.ndarray:
        """Same as transformers' `tokenizer(prompts, padding="max_length",
        max_length=max_length, truncation=True)`."""
        _check_prompts(prompts)
        self.tokenizer.enable_truncation(max_length)
        self.tokenizer.no_padding()
        ids = np.full((len(prompts), max_length), self.pad_token_id, dtype=np.int64)
        for row, encoding in zip(ids, self.tokenizer.encode_batch(list(prompts)), strict=True):
            row[: len(encoding.ids)] = encoding.ids
        return ids
