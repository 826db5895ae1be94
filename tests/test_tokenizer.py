"""The runtime CLIP tokenizer gives the ids transformers' CLIPTokenizer gives, on the real CLIP
vocabulary and on the byte-level vocabulary random-weight models ship."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from sdrt.errors import UserError
from sdrt.export.tokenizer_files import (
    ENGLISH_MERGES,
    bytes_to_unicode,
    write_byte_level_clip_vocab,
    write_clip_vocab_from_bpe,
)
from sdrt.tokenizer import ClipTokenizer

# open_clip ships OpenAI's BPE merges; any version works, the pin keeps the cache stable.
OPEN_CLIP_VERSION = "2.32.0"
BPE_MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"
CACHE = Path(__file__).parent / ".cache"

PROMPTS = [
    "",
    "a photo of a cat",
    "A Photo Of A CAT, HDR",
    "Hello, world! What's up? (masterpiece:1.2), [best quality]; {x} -- ~",
    "wow!!! amazing! !",
    "1024 x 768, 3.14159, 1st 2nd 100% $5",
    "  leading and trailing  ",
    "tabs\tand\nnewlines\r\n  multiple   spaces",
    "café crème brûlée, naïve résumé, Ångström, cafe\u0301 (decomposed)",
    "İstanbul ß ΣΑΣ ＦＵＬＬ-width",
    "東京の夜景, 漢字, 한국어, Ελληνικά, русский",
    "emoji 🐱🚀👍🏽 and ❤️",
    "it's a dog's life, don't, we're, they've, I'm, you'll, he'd, IT'S",
    "<|endoftext|> inside, <|startoftext|>, <|ENDOFTEXT|>, </w> suffix",
    "control \x00\x07 zero\u200bwidth non\u00a0breaking",
    " ".join(["cat"] * 75),  # exactly 77 ids with BOS and EOS
    " ".join(["cat"] * 76),  # one too many
    "a very detailed painting of a castle on a hill at sunset, " * 20,
]


@pytest.fixture(scope="session")
def real_clip_tokenizer_dir(tmp_path_factory):
    """The real CLIP tokenizer folder (49 408 tokens, SD 1.x configs), built from open_clip's
    BPE file; the wheel is downloaded once into tests/.cache/."""
    wheels = CACHE / "wheels"
    found = sorted(wheels.glob(f"open_clip_torch-{OPEN_CLIP_VERSION}-*.whl"))
    if not found:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        command += [f"open_clip_torch=={OPEN_CLIP_VERSION}", "-d", str(wheels)]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired) as error:
            pytest.skip(f"cannot download open_clip_torch for the CLIP vocabulary: {error}")
        found = sorted(wheels.glob(f"open_clip_torch-{OPEN_CLIP_VERSION}-*.whl"))
        if done.returncode != 0 or not found:
            reason = (done.stderr.strip().splitlines() or ["no output"])[-1]
            pytest.skip(f"cannot download open_clip_torch for the CLIP vocabulary: {reason}")
    work = tmp_path_factory.mktemp("real_clip")
    bpe_path = work / "bpe_simple_vocab_16e6.txt.gz"
    with zipfile.ZipFile(found[0]) as wheel:
        bpe_path.write_bytes(wheel.read(BPE_MEMBER))
    directory = work / "tokenizer"
    assert write_clip_vocab_from_bpe(directory, bpe_path) == 49408
    return directory


@pytest.fixture(scope="session")
def byte_level_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("byte_level") / "tokenizer"
    write_byte_level_clip_vocab(directory, merges=len(ENGLISH_MERGES))
    return directory


def reference_ids(directory, prompts, max_length=77):
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(directory))
    encoded = tokenizer(
        prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="np"
    )
    return encoded["input_ids"]


def added_token(content, normalized):
    return {"content": content, "lstrip": False, "normalized": normalized, "rstrip": False,
            "single_word": False}  # fmt: skip


def folder_in_style(base, style, tmp_path):
    """Copy a tokenizer folder, rewriting its configs the way one kind of checkpoint has them."""
    if style == "saved_by_transformers":  # transformers 5 writes tokenizer.json, no vocab.json
        from transformers import CLIPTokenizer

        saved = tmp_path / style
        CLIPTokenizer.from_pretrained(
            str(folder_in_style(base, "sd2_hub", tmp_path))
        ).save_pretrained(saved)
        assert not (saved / "vocab.json").exists()
        return saved
    directory = tmp_path / style
    shutil.copytree(base, directory)
    config = json.loads((directory / "tokenizer_config.json").read_text())
    special_map = json.loads((directory / "special_tokens_map.json").read_text())
    bos, eos = "<|startoftext|>", "<|endoftext|>"
    if style == "sd1_hub":  # runwayml/stable-diffusion-v1-5: AddedToken dicts matched lowercased
        for key, content in (("bos_token", bos), ("eos_token", eos), ("unk_token", eos)):
            config[key] = {"__type": "AddedToken", **added_token(content, normalized=True)}
            special_map[key] = added_token(content, normalized=True)
    elif style == "sd2_hub":  # stabilityai/stable-diffusion-2-1: pads with "!" (id 0)
        config["pad_token"] = special_map["pad_token"] = "!"
    elif style == "sd2_added_tokens_decoder":  # saved by transformers 4.34+
        config["pad_token"] = "!"
        config["added_tokens_decoder"] = {
            "0": {**added_token("!", normalized=False), "special": True},
            str(vocab_id(directory, bos)): {**added_token(bos, normalized=True), "special": True},
            str(vocab_id(directory, eos)): {**added_token(eos, normalized=True), "special": True},
        }
        special_map = {"pad_token": "<|startoftext|>"}  # ignored by transformers in this format
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    (directory / "special_tokens_map.json").write_text(json.dumps(special_map))
    return directory


def vocab_id(directory, token):
    return json.loads((directory / "vocab.json").read_text())[token]


STYLES = ["generated", "sd1_hub", "sd2_hub", "sd2_added_tokens_decoder", "saved_by_transformers"]


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("vocabulary", ["byte_level", "real_clip"])
def test_ids_match_transformers_clip_tokenizer(vocabulary, style, request, tmp_path):
    base = request.getfixturevalue(
        "byte_level_dir" if vocabulary == "byte_level" else "real_clip_tokenizer_dir"
    )
    directory = folder_in_style(base, style, tmp_path)
    ours = ClipTokenizer.from_dir(directory)
    for max_length in (77, 16):
        ids = ours.encode(PROMPTS, max_length)
        assert ids.dtype == np.int64 and ids.shape == (len(PROMPTS), max_length)
        expected = reference_ids(directory, PROMPTS, max_length)
        for prompt, row, expected_row in zip(PROMPTS, ids, expected, strict=True):
            assert row.tolist() == expected_row.tolist(), f"prompt {prompt!r}"


def test_byte_level_vocab_without_merges_matches_transformers(tmp_path):
    assert write_byte_level_clip_vocab(tmp_path, merges=0) == 514
    np.testing.assert_array_equal(
        ClipTokenizer.from_dir(tmp_path).encode(PROMPTS), reference_ids(tmp_path, PROMPTS)
    )


def test_real_clip_ids_are_the_published_ones(real_clip_tokenizer_dir):
    ids = ClipTokenizer.from_dir(real_clip_tokenizer_dir).encode(["a photo of a cat"])
    assert ids[0, :8].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407, 49407]


def test_sd1_pads_with_end_of_text_and_sd2_with_exclamation_mark(real_clip_tokenizer_dir, tmp_path):
    sd1 = ClipTokenizer.from_dir(folder_in_style(real_clip_tokenizer_dir, "sd1_hub", tmp_path))
    sd2 = ClipTokenizer.from_dir(folder_in_style(real_clip_tokenizer_dir, "sd2_hub", tmp_path))
    assert sd1.pad_token_id == 49407 and sd2.pad_token_id == 0
    assert sd1.encode(["a cat"])[0, 4:].tolist() == [49407] * 73
    assert sd2.encode(["a cat"])[0, 3:].tolist() == [49407] + [0] * 73


def test_truncation_keeps_bos_first_and_eos_last(byte_level_dir):
    tokenizer = ClipTokenizer.from_dir(byte_level_dir)
    ids = tokenizer.encode(["an extremely long prompt " * 50, "short"], max_length=77)
    assert ids[0, 0] == tokenizer.bos_token_id and ids[0, -1] == tokenizer.eos_token_id
    assert tokenizer.pad_token_id not in ids[0, 1:-1].tolist()
    assert ids[1, -1] == tokenizer.pad_token_id


def test_a_batch_row_equals_the_prompt_encoded_alone(byte_level_dir):
    tokenizer = ClipTokenizer.from_dir(byte_level_dir)
    batch = tokenizer.encode(PROMPTS)
    for prompt, row in zip(PROMPTS, batch, strict=True):
        assert tokenizer.encode([prompt])[0].tolist() == row.tolist()


def test_byte_level_vocab_layout_is_clips(tmp_path):
    size = write_byte_level_clip_vocab(tmp_path, merges=3)
    vocab = json.loads((tmp_path / "vocab.json").read_text())
    byte_chars = list(bytes_to_unicode().values())
    assert size == len(vocab) == 256 * 2 + 3 + 2
    assert [vocab[c] for c in byte_chars] == list(range(256))
    assert [vocab[c + "</w>"] for c in byte_chars] == list(range(256, 512))
    assert [vocab[t] for t in ("in", "th", "an", "<|startoftext|>", "<|endoftext|>")] == [
        512, 513, 514, 515, 516,
    ]  # fmt: skip
    assert (tmp_path / "merges.txt").read_text().splitlines() == [
        "#version: 0.2",
        "i n",
        "t h",
        "a n",
    ]


def test_byte_level_vocab_refuses_more_merges_than_it_has(tmp_path):
    with pytest.raises(ValueError, match="merges="):
        write_byte_level_clip_vocab(tmp_path, merges=len(ENGLISH_MERGES) + 1)


@pytest.mark.parametrize("prompts", [[1], ["a cat", None], [b"bytes"]])
def test_a_prompt_that_is_not_a_string_is_a_type_error(byte_level_dir, prompts):
    with pytest.raises(TypeError, match="not a string"):
        ClipTokenizer.from_dir(byte_level_dir).encode(prompts)


def test_a_bare_string_instead_of_a_list_is_a_type_error(byte_level_dir):
    with pytest.raises(TypeError, match=r"wrap a single prompt in a list"):
        ClipTokenizer.from_dir(byte_level_dir).encode("a cat")


@pytest.mark.parametrize("missing", ["vocab.json", "merges.txt"])
def test_a_missing_tokenizer_file_names_the_file_and_the_fix(byte_level_dir, tmp_path, missing):
    directory = tmp_path / "tokenizer"
    shutil.copytree(byte_level_dir, directory)
    (directory / missing).unlink()
    with pytest.raises(UserError, match=rf"{missing}.*is missing.*tokenizer/ folder"):
        ClipTokenizer.from_dir(directory)


def test_a_missing_tokenizer_folder_is_a_value_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        ClipTokenizer.from_dir(tmp_path / "nowhere")


@pytest.mark.parametrize("corrupt", ["vocab.json", "tokenizer_config.json", "merges.txt"])
def test_a_corrupt_tokenizer_file_names_the_file(byte_level_dir, tmp_path, corrupt):
    directory = tmp_path / "tokenizer"
    shutil.copytree(byte_level_dir, directory)
    (directory / corrupt).write_text(
        "{not json" if corrupt.endswith(".json") else "one two three\n"
    )
    with pytest.raises(UserError, match=corrupt):
        ClipTokenizer.from_dir(directory)


def test_a_pad_token_outside_the_vocabulary_is_refused(byte_level_dir, tmp_path):
    directory = tmp_path / "tokenizer"
    shutil.copytree(byte_level_dir, directory)
    (directory / "special_tokens_map.json").write_text(json.dumps({"pad_token": "<pad>"}))
    with pytest.raises(UserError, match="pad_token '<pad>'"):
        ClipTokenizer.from_dir(directory)


def test_the_runtime_tokenizer_imports_neither_torch_nor_transformers():
    check = (
        "import sys, sdrt.tokenizer; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    )
    output = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True)
    assert output.stdout.strip() == "[]", output.stderr
