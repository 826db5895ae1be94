"""Random-weight text encoders and their tokenizers (CLIP and T5), and the graphs of the ones a
diffusion transformer reads, without downloading anything.

CLIP gets the byte-level vocabulary of tokenizer_files; T5 gets a small Unigram vocabulary
with Metaspace pre-tokenization, written as tokenizer.json by `tokenizers`, the format real T5
checkpoints ship and the runtime reads.
"""

from __future__ import annotations

import string
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..onnx_export import Component, TensorSpec
from ..tokenizer_files import write_byte_level_clip_vocab

# T5's special tokens, with the ids the real vocabulary gives them
T5_SPECIALS = ("<pad>", "</s>", "<unk>")
T5_WORDS = ("a", "the", "of", "photo", "on", "in", "and", "at", "with", "red", "cat", "dog")


def random_clip(config: dict[str, Any], pad_token: str, projection: bool) -> tuple[Any, Any]:
    """A CLIP tokenizer and a seeded random CLIP text model (with its pooled projection when
    `projection`: SDXL's and SD3's encoders)."""
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
    )

    with tempfile.TemporaryDirectory() as tmp:
        vocab_size = write_byte_level_clip_vocab(tmp, pad_token=pad_token)
        tokenizer = CLIPTokenizer.from_pretrained(tmp)
    text_config = CLIPTextConfig(
        **{
            "max_position_embeddings": 77,
            **config,
            "vocab_size": max(config.get("vocab_size", 0), vocab_size),
        },
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = (CLIPTextModelWithProjection if projection else CLIPTextModel)(text_config)
    return tokenizer, model


def write_t5_tokenizer(path: Path) -> int:
    """tokenizer.json of a small T5-style Unigram vocabulary (specials, "▁", letters, digits,
    punctuation, a few whole words); returns its size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    pieces = [(token, 0.0) for token in T5_SPECIALS] + [("▁", -2.0)]
    pieces += [(f"▁{word}", -1.0) for word in T5_WORDS]
    pieces += [(char, -3.0) for char in string.ascii_letters + string.digits + string.punctuation]
    tokenizer = Tokenizer(models.Unigram(pieces, unk_id=T5_SPECIALS.index("<unk>")))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(  # as transformers' T5Tokenizer sets it
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always"),
        ]
    )
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", T5_SPECIALS.index("</s>"))]
    )
    tokenizer.save(str(path))
    return len(pieces)


def random_t5(config: dict[str, Any], max_length: int) -> tuple[Any, Any]:
    """A T5 tokenizer (fast, from tokenizer.json) and a seeded random T5 encoder."""
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / "tokenizer.json"
        vocab_size = write_t5_tokenizer(file)
        tokenizer = T5TokenizerFast(
            tokenizer_file=str(file),
            eos_token="</s>",
            pad_token="<pad>",
            unk_token="<unk>",
            extra_ids=0,
            model_max_length=max_length,
        )
    t5_config = T5Config(
        **{**config, "vocab_size": max(config.get("vocab_size", 0), vocab_size)},
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return tokenizer, T5EncoderModel(t5_config)


def random_text_encoders(specs: list[tuple[str, dict[str, Any]]], t5_length: int) -> dict[str, Any]:
    """Pipeline parts text_encoder(_2, _3) and tokenizer(_2, _3), in the preset's order."""
    parts: dict[str, Any] = {}
    for index, (kind, config) in enumerate(specs):
        suffix = "" if index == 0 else f"_{index + 1}"
        if kind == "t5":
            tokenizer, encoder = random_t5(config, t5_length)
        else:
            pad = "<|endoftext|>" if index == 0 else "!"  # OpenCLIP bigG pads with "!"
            tokenizer, encoder = random_clip(config, pad, projection=kind == "clip_projection")
        parts[f"tokenizer{suffix}"], parts[f"text_encoder{suffix}"] = tokenizer, encoder
    return parts


class _ClipEncoder(torch.nn.Module):
    """A diffusion transformer's CLIP: the penultimate hidden states and the pooled embedding
    (the projection's output where there is one, else CLIP's pooler output)."""

    def __init__(self, encoder: torch.nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.encoder(input_ids, output_hidden_states=True)
        pooled = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output
        return out.hidden_states[-2], pooled


class _T5Encoder(torch.nn.Module):
    def __init__(self, encoder: torch.nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.encoder(input_ids)[0]


def text_encoder_components(pipe: Any, t5_length: int) -> list[Component]:
    """One graph per text encoder of `pipe`: CLIPs give hidden states and a pooled embedding,
    T5 its last hidden states over `t5_length` tokens."""
    found = []
    for suffix in ("", "_2", "_3"):
        encoder = getattr(pipe, f"text_encoder{suffix}", None)
        if encoder is None:
            continue
        name = f"text_encoder{suffix}"
        if encoder.config.model_type == "t5":
            length, width = t5_length, encoder.config.d_model
            module, pooled = _T5Encoder(encoder), None
        else:
            length = getattr(pipe, f"tokenizer{suffix}").model_max_length
            width = encoder.config.hidden_size
            module = _ClipEncoder(encoder)
            projected = hasattr(encoder, "text_projection")
            pooled = encoder.config.projection_dim if projected else width
        outputs = [TensorSpec("text_embeddings", "float32", ["batch", length, width])]
        if pooled is not None:
            outputs.append(TensorSpec("pooled_embeddings", "float32", ["batch", pooled]))
        inputs = [TensorSpec("input_ids", "int32", ["batch", length])]
        found.append(Component(name, module, inputs, outputs))
    return found


def vocab_size(pipe: Any) -> int:
    """The smallest vocabulary of the pipeline's tokenizers and text encoders: sample token
    ids below it are valid for every encoder."""
    sizes = []
    for suffix in ("", "_2", "_3"):
        encoder = getattr(pipe, f"text_encoder{suffix}", None)
        if encoder is not None:
            sizes += [encoder.config.vocab_size, len(getattr(pipe, f"tokenizer{suffix}"))]
    return min(sizes)
