"""CLIP tokenizer: prompt strings -> padded int64 token ids, without torch or transformers.

Rebuilds, with the `tokenizers` library, the pipeline transformers' CLIPTokenizer builds from a
checkpoint's tokenizer files, so the ids match the ones diffusers feeds its text encoder.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from .errors import UserError

# transformers' CLIPTokenizer defaults, used where the tokenizer files name no token.
DEFAULT_SPECIAL_TOKENS = {
    "bos_token": "<|startoftext|>",
    "eos_token": "<|endoftext|>",
    "unk_token": "<|endoftext|>",
    "pad_token": "<|endoftext|>",
}
# CLIP's word splitter (OpenAI's simple_tokenizer.py), as transformers gives it to `tokenizers`.
CLIP_WORD_PATTERN = (
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d"
    r"|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
)
FIX = "copy the checkpoint's tokenizer/ folder into the bundle (or re-export it)"


class ClipTokenizer:
    """Turns prompts into the (batch, max_length) ids a CLIP text encoder takes."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        bos_token_id: int,
        eos_token_id: int,
        pad_token_id: int,
        model_max_length: int = 77,
    ):
        self.tokenizer = tokenizer
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.model_max_length = model_max_length

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> ClipTokenizer:
        """Load a diffusers `tokenizer/` folder: tokenizer.json, or vocab.json + merges.txt."""
        directory = Path(path)
        if not directory.is_dir():
            raise UserError(f"Tokenizer folder {str(directory)!r} does not exist; {FIX}.")
        config = _read_optional_json(directory / "tokenizer_config.json")
        vocab, merges, listed_tokens = _read_bpe(directory)
        named, listed_tokens = _special_tokens(directory, config, listed_tokens)
        listed_contents = {token.content for token in listed_tokens}
        for key, token in named.items():
            # transformers would append an unknown special token as a new id past the text
            # encoder's embedding table; refuse it here instead.
            if str(token) not in vocab and str(token) not in listed_contents:
                raise UserError(
                    f"The {key} {str(token)!r} named in {str(directory)!r} is not in the "
                    f"vocabulary; fix tokenizer_config.json / special_tokens_map.json or {FIX}."
                )
        try:
            model = BPE(
                vocab,
                merges,
                dropout=None,
                continuing_subword_prefix="",
                end_of_word_suffix="</w>",
                fuse_unk=False,
                unk_token=str(named["unk_token"]),
            )
        except Exception as error:
            raise UserError(
                f"Tokenizer files in {str(directory)!r} disagree ({error}); {FIX}."
            ) from error

        tokenizer = Tokenizer(model)
        tokenizer.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
        )
        word_splitter = pre_tokenizers.Split(Regex(CLIP_WORD_PATTERN), "removed", invert=True)
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [word_splitter, pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
        _add_special_tokens(tokenizer, named, listed_tokens)

        ids = {key: tokenizer.token_to_id(str(token)) for key, token in named.items()}
        tokenizer.post_processor = processors.RobertaProcessing(
            (str(named["eos_token"]), ids["eos_token"]),
            (str(named["bos_token"]), ids["bos_token"]),
            trim_offsets=False,
            add_prefix_space=False,
        )
        return cls(
            tokenizer,
            bos_token_id=ids["bos_token"],
            eos_token_id=ids["eos_token"],
            pad_token_id=ids["pad_token"],
            model_max_length=int(config.get("model_max_length", 77)),
        )

    def encode(self, prompts: Sequence[str], max_length: int = 77) -> np.ndarray:
        """Ids of shape (len(prompts), max_length): BOS, tokens, EOS, then pad; EOS stays last
        when a prompt is truncated. Same as `tokenizer(prompts, padding="max_length",
        max_length=max_length, truncation=True)` in transformers."""
        _check_prompts(prompts)
        if max_length < 2:
            raise UserError(f"max_length={max_length} leaves no room for BOS and EOS; use >= 2.")
        ids = np.full((len(prompts), max_length), self.pad_token_id, dtype=np.int64)
        for row, encoding in zip(ids, self.tokenizer.encode_batch(list(prompts)), strict=True):
            tokens = encoding.ids
            if len(tokens) > max_length:
                # Truncating the words to max_length - 2 before adding BOS/EOS, as tokenizers does.
                tokens = tokens[: max_length - 1] + [self.eos_token_id]
            row[: len(tokens)] = tokens
        return ids


def _check_prompts(prompts: Sequence[str]) -> None:
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise TypeError(
            f"prompts must be a list of strings, got {type(prompts).__name__}; "
            "wrap a single prompt in a list: [prompt]."
        )
    for index, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise TypeError(
                f"Prompt {index} is a {type(prompt).__name__} ({prompt!r:.40}), not a string; "
                "pass text prompts only."
            )


def _read_bpe(directory: Path) -> tuple[dict[str, int], list[tuple[str, str]], list[AddedToken]]:
    """Vocab, merges and the added tokens listed there; tokenizer.json wins, as in transformers."""
    tokenizer_json = directory / "tokenizer.json"
    if tokenizer_json.is_file():
        content = _read_json(tokenizer_json)
        model = content.get("model") if isinstance(content, dict) else None
        if not isinstance(model, dict) or model.get("type", "BPE") != "BPE" or "vocab" not in model:
            raise UserError(
                f"{str(tokenizer_json)!r} holds no BPE vocabulary, so it is not a CLIP tokenizer; "
                f"{FIX}."
            )
        merges = [
            tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])
        ]
        listed = [_listed_token(token) for token in content.get("added_tokens", [])]
        return model["vocab"], merges, listed

    vocab_json, merges_txt = directory / "vocab.json", directory / "merges.txt"
    for required in (vocab_json, merges_txt):
        if not required.is_file():
            raise UserError(
                f"Tokenizer file {str(required)!r} is missing (and there is no tokenizer.json); "
                f"{FIX}."
            )
    if not isinstance(_read_json(vocab_json), dict):
        raise UserError(f"{str(vocab_json)!r} is not a token -> id mapping; {FIX}.")
    try:
        # The tokenizers reader, so merges.txt parses exactly as it does for transformers.
        vocab, merges = BPE.read_file(str(vocab_json), str(merges_txt))
    except Exception as error:
        raise UserError(f"Cannot read {str(merges_txt)!r} ({error}); {FIX}.") from error
    return vocab, merges, []


def _special_tokens(
    directory: Path, config: dict, listed_tokens: list[AddedToken]
) -> tuple[dict[str, str | AddedToken], list[AddedToken]]:
    """The bos/eos/unk/pad tokens and the listed added tokens, with transformers' precedence.

    A token named by a plain string stays a string, as in transformers, because its equality
    with the other named tokens decides which flags the tokenizer ends up with.
    """
    named = {
        key: default if config.get(key) is None else _added_token(config[key])
        for key, default in DEFAULT_SPECIAL_TOKENS.items()
    }
    if "added_tokens_decoder" in config:
        # Newer checkpoints list every added token here; transformers then ignores
        # special_tokens_map.json and tokenizer.json's own list.
        decoder = config["added_tokens_decoder"]
        if not isinstance(decoder, dict):
            raise UserError(
                f"added_tokens_decoder in tokenizer_config.json is not a mapping; {FIX}."
            )
        listed_tokens = [_listed_token(decoder[key]) for key in sorted(decoder, key=int)]
    else:
        special_tokens_map = _read_optional_json(directory / "special_tokens_map.json")
        for key in named:
            value = special_tokens_map.get(key)
            if isinstance(value, dict):
                value = {**value, "special": True}
            if value is not None:
                named[key] = _added_token(value)
    listed_by_content = {token.content: token for token in listed_tokens}
    named = {key: listed_by_content.get(str(token), token) for key, token in named.items()}
    return named, listed_tokens


def _add_special_tokens(
    tokenizer: Tokenizer, named: dict[str, str | AddedToken], listed_tokens: list[AddedToken]
) -> None:
    """Register the added tokens, which are cut out of a prompt before BPE runs (SD 2.x's pad
    token "!" too, so a "!" in a prompt becomes id 0).

    Mirrors transformers: the listed tokens, then each named token not equal to one already
    queued; where two share a text, the later one's flags (e.g. `normalized`) win.
    """
    listed_contents = {token.content for token in listed_tokens}
    queued: list[str | AddedToken] = list(listed_tokens)
    for token in named.values():
        if str(token) not in listed_contents and token not in queued:
            queued.append(token)
    named_contents = {str(token) for token in named.values()}
    for position, token in enumerate(queued):
        if isinstance(token, str):
            queued[position] = AddedToken(token, special=True)
        elif token.content in named_contents:
            token.special = True
    tokenizer.add_tokens(queued)


def _added_token(value: str | dict) -> str | AddedToken:
    """A config string as is, or a serialized token dict as the AddedToken it describes."""
    if isinstance(value, str):
        return value
    if not isinstance(value, dict) or not isinstance(value.get("content"), str):
        raise UserError(f"Special token entry {value!r} has no text content; {FIX}.")
    # Only the flags the file sets: AddedToken derives `normalized` from `special` otherwise.
    flags = ("single_word", "lstrip", "rstrip", "normalized", "special")
    return AddedToken(value["content"], **{flag: value[flag] for flag in flags if flag in value})


def _listed_token(value: dict) -> AddedToken:
    token = _added_token(value)
    if isinstance(token, str):
        raise UserError(f"Added token entry {value!r} is not a token object; {FIX}.")
    return token


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"Cannot read {str(path)!r} ({error}); {FIX}.") from error


def _read_optional_json(path: Path) -> dict:
    content = _read_json(path) if path.is_file() else {}
    if not isinstance(content, dict):
        raise UserError(f"{str(path)!r} is not a JSON object; {FIX}.")
    return content
