"""`AIMv2Tokenizer`: keras-hub's `CLIPTokenizer` with the LiT release's files.

The LiT model's Hub repository holds a CLIP byte-level BPE vocabulary
(`vocab.json`, 49408 tokens) and `merges.txt`; its tokenizer config names
the special tokens `<start_of_text>` / `<end_of_text>` (ids 49406 / 49407)
and pads with the end token. keras-hub's `CLIPTokenizer` looks the special
tokens up as `<|startoftext|>` / `<|endoftext|>`: a vocabulary that spells
them the other way gets them renamed here (same ids), so either spelling
works. Packing follows the release's `tokenizer(texts, truncation=True,
padding=True)`: start token, text, end token, at most 77 ids, padded with
the end token to the longest text of the batch.
"""

from __future__ import annotations

import json
from typing import Sequence

import keras
import numpy as np
from keras_hub.tokenizers import CLIPTokenizer

from keras_aim.loading import preset_cache
from keras_aim.models.aimv2 import aimv2_presets

START_TOKEN = "<|startoftext|>"
END_TOKEN = "<|endoftext|>"
# Other spellings of the special tokens in CLIP-style vocabularies.
TOKEN_ALIASES = {START_TOKEN: ("<start_of_text>",), END_TOKEN: ("<end_of_text>",)}


def canonical_vocabulary(vocabulary: dict) -> dict:
    """`vocabulary` with the special tokens spelled as keras-hub's
    `CLIPTokenizer` looks them up (ids unchanged); a clear error if it has
    them in no known spelling."""
    vocabulary = dict(vocabulary)
    for token, aliases in TOKEN_ALIASES.items():
        if token in vocabulary:
            continue
        for alias in aliases:
            if alias in vocabulary:
                vocabulary[token] = vocabulary.pop(alias)
                break
        else:
            raise ValueError(
                f"The vocabulary has no {token} token (nor {', '.join(aliases)}); "
                "pass the LiT release's vocab.json (a CLIP BPE vocabulary)."
            )
    return vocabulary


@keras.saving.register_keras_serializable(package="keras_aim")
class AIMv2Tokenizer(CLIPTokenizer):
    """The AIMv2 LiT tokenizer: lower-cased CLIP byte-level BPE.

    Args:
        vocabulary: dict token -> id, or the path of `vocab.json`.
        merges: list of merge rules, or the path of `merges.txt`.
        pad_with_end_token: pad with the end token (the release's choice).

    Calling it tokenizes without special tokens (keras-hub's convention);
    `pack(texts)` gives the model's `token_ids`.

    Example:
    ```python
    tokenizer = keras_aim.AIMv2Tokenizer.from_preset("aimv2_large_patch14_224_lit")
    token_ids = tokenizer.pack(["a photo of a cat.", "a photo of a dog."])
    ```
    """

    def __init__(self, vocabulary=None, merges=None, pad_with_end_token=True, **kwargs):
        super().__init__(
            vocabulary=vocabulary,
            merges=merges,
            pad_with_end_token=pad_with_end_token,
            **kwargs,
        )

    def set_vocabulary_and_merges(self, vocabulary, merges):
        if isinstance(vocabulary, str):
            with open(vocabulary, encoding="utf-8") as handle:
                vocabulary = json.load(handle)
        if isinstance(vocabulary, dict):
            vocabulary = canonical_vocabulary(vocabulary)
        super().set_vocabulary_and_merges(vocabulary, merges)

    def pack(
        self,
        texts: str | Sequence[str],
        sequence_length: int = aimv2_presets.LIT_TEXT["sequence_length"],
        truncate: bool = True,
    ) -> np.ndarray:
        """int32 `token_ids` `(B, T)`: start token, the text's tokens, end
        token, padded with the end token to the longest row (`T <=
        sequence_length`).

        A text with more than `sequence_length - 2` tokens is cut to fit
        (keeping the end token) when `truncate`, else it is an error that
        names it.
        """
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError("pack() takes a string or a non-empty list of strings.")
        room = sequence_length - 2
        rows = []
        for text, tokens in zip(texts, self.tokenize(texts)):
            tokens = [int(t) for t in tokens]
            if len(tokens) > room:
                if not truncate:
                    raise ValueError(
                        f"The text {text[:60]!r}{'...' if len(text) > 60 else ''} "
                        f"has {len(tokens)} tokens; with the start and end tokens "
                        f"that is more than the model's {sequence_length}. Shorten "
                        "it, or pass truncate=True to cut it."
                    )
                tokens = tokens[:room]
            rows.append([self.start_token_id, *tokens, self.end_token_id])
        width = max(len(row) for row in rows)
        return np.array(
            [row + [self.pad_token_id] * (width - len(row)) for row in rows], "int32"
        )

    @classmethod
    def from_preset(cls, preset, **kwargs):
        """The tokenizer of a released LiT preset (its `vocab.json` and
        `merges.txt`, downloaded at the pinned revision and cached), or of a
        keras-hub preset directory / handle."""
        if not aimv2_presets.is_preset_name(preset):
            return super().from_preset(preset, **kwargs)
        vocabulary, merges = release_tokenizer_files(preset)
        return cls(vocabulary=vocabulary, merges=merges, **kwargs)


def release_tokenizer_files(name: str, progress: bool = True) -> tuple[str, str]:
    """Local paths of a LiT preset's `vocab.json` and `merges.txt`,
    downloaded at the pinned revision and checked (no digests are recorded:
    the vocabulary must parse and hold the model's vocabulary size, every
    merge rule must be a pair)."""
    entry = aimv2_presets.get_preset(name)
    if "tokenizer_files" not in entry:
        raise ValueError(f"{name} has no tokenizer (only the LiT preset has one).")
    size = entry["text_config"]["vocabulary_size"]

    def check_vocabulary(path: str) -> None:
        with open(path, encoding="utf-8") as handle:
            vocabulary = json.load(handle)
        if not isinstance(vocabulary, dict) or len(vocabulary) != size:
            raise ValueError(f"vocab.json should map {size} tokens to ids.")
        canonical_vocabulary(vocabulary)

    def check_merges(path: str) -> None:
        with open(path, encoding="utf-8") as handle:
            bad = [n for n, line in enumerate(handle, 1)
                   if line.strip() and not line.startswith("#") and len(line.split()) != 2]
        if bad:
            raise ValueError(f"merges.txt line {bad[0]} is not a pair of tokens.")

    paths = []
    for filename, check in zip(entry["tokenizer_files"], (check_vocabulary, check_merges)):
        paths.append(
            preset_cache.url_file(
                aimv2_presets.download_path(entry, filename),
                aimv2_presets.hub_url(entry["repo_id"], entry["revision"], filename),
                None,
                verify=check,
                progress=progress,
            )
        )
    return paths[0], paths[1]
