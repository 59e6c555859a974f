"""The tiny AIMv2 reference models (fixtures/aimv2_tiny: Apple's code on
tiny configs, see meta.json there): builders, weights and outputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np

import keras_aim

FIXTURES = Path(__file__).parent / "fixtures" / "aimv2_tiny"

# fixed/ and native/: 28x28 images (native: any multiple of 7), patch 7,
# D=48, 3 blocks, 4 heads, SwiGLU 128.
TINY_VISION = dict(
    patch_size=7, hidden_dim=48, num_layers=3, num_heads=4, intermediate_dim=128
)
TINY_FIXED = dict(TINY_VISION, image_shape=(28, 28, 3))
TINY_NATIVE = dict(TINY_VISION, image_shape=(None, None, 3), position_embedding="sincos")
# lit/: the same vision tower with 2 blocks; text 32 wide, 2 blocks, 2 heads,
# SwiGLU 96, vocabulary 64, context 12, end token 63 (start token 62).
TINY_LIT_VISION = dict(TINY_FIXED, num_layers=2)
TINY_LIT_TEXT = dict(
    vocabulary_size=64, sequence_length=12, hidden_dim=32, num_layers=2,
    num_heads=2, intermediate_dim=96, end_token_id=63,
)
TINY_LIT_PROJECTION = 32


def path(folder: str, name: str = "model.safetensors") -> str:
    return str(FIXTURES / folder / name)


def outputs(folder: str) -> dict[str, np.ndarray]:
    """Every .npy array of a reference folder, by file stem."""
    return {p.stem: np.load(p) for p in (FIXTURES / folder).glob("*.npy")}


def state_dict(folder: str) -> dict[str, np.ndarray]:
    """A reference folder's model.safetensors as a dict of arrays."""
    from safetensors.numpy import load_file

    return load_file(path(folder))


def fixed_backbone(load: bool = True, **overrides) -> keras_aim.AIMv2Backbone:
    backbone = keras_aim.AIMv2Backbone(**{**TINY_FIXED, **overrides})
    if load:
        keras_aim.load_aimv2_weights(backbone, path("fixed"))
    return backbone


def native_backbone(load: bool = True) -> keras_aim.AIMv2Backbone:
    backbone = keras_aim.AIMv2Backbone(**TINY_NATIVE)
    if load:
        keras_aim.load_aimv2_weights(backbone, path("native"))
    return backbone


def lit_model(load: bool = True, **vision_overrides) -> keras_aim.AIMv2LiT:
    lit = keras_aim.AIMv2LiT(
        keras_aim.AIMv2Backbone(**{**TINY_LIT_VISION, **vision_overrides}),
        keras_aim.AIMv2TextEncoder(**TINY_LIT_TEXT),
        projection_dim=TINY_LIT_PROJECTION,
    )
    if load:
        keras_aim.load_aimv2_weights(lit, path("lit"))
    return lit


# A 64-token vocabulary under which the reference `input_ids` are the
# tokenization of three texts: every letter a-m is a one-letter word token
# with the id the reference rows use; ids 62/63 are the special tokens. The
# other ids: the bare letters a-z (ids in order of the free slots), "th"
# and "the</w>" (from the two merge rules), then fillers up to 64 tokens.
WORD_IDS = {"a": 5, "b": 17, "c": 9, "d": 40, "e": 2, "f": 33, "g": 8,
            "h": 21, "i": 50, "j": 11, "k": 7, "l": 60, "m": 1}
REFERENCE_TEXTS = ["a b c", "d e f f g h i j", "k k l m"]
TINY_MERGES = ["#version: 0.2", "t h", "th e</w>"]


def tiny_vocabulary(start="<|startoftext|>", end="<|endoftext|>") -> dict[str, int]:
    vocabulary = {f"{letter}</w>": index for letter, index in WORD_IDS.items()}
    free = iter(i for i in range(62) if i not in WORD_IDS.values())
    for token in [*"abcdefghijklmnopqrstuvwxyz", "th", "the</w>"]:
        vocabulary[token] = next(free)
    vocabulary.update({f"#{i}": i for i in free})  # fillers no text produces
    vocabulary.update({start: 62, end: 63})
    return vocabulary


def tiny_tokenizer(**kwargs) -> keras_aim.AIMv2Tokenizer:
    return keras_aim.AIMv2Tokenizer(vocabulary=tiny_vocabulary(**kwargs), merges=TINY_MERGES)


# --- the tiny models as releases on 127.0.0.1, in the Hub's layout ----------

FIXED_PRESET = "aimv2_test_tiny_28"
LIT_PRESET = "aimv2_test_tiny_lit"
REVISION = "0123456789abcdef0123456789abcdef01234567"


def register_presets(monkeypatch) -> None:
    """Adds the tiny fixed-size and LiT models to the presets table (undone
    after the test), with the released presets' other entries."""
    from keras_aim.models.aimv2 import aimv2_presets

    table = aimv2_presets.AIMV2_PRESETS
    monkeypatch.setitem(table, FIXED_PRESET, dict(
        table["aimv2_large_patch14_224"],
        model_id="aimv2-test-tiny", repo_id="apple/aimv2-test-tiny", revision=REVISION,
        config=dict(TINY_FIXED, position_embedding="learned", norm_epsilon=1e-5),
        image_size=28,
    ))
    monkeypatch.setitem(table, LIT_PRESET, dict(
        table["aimv2_large_patch14_224_lit"],
        model_id="aimv2-test-lit", repo_id="apple/aimv2-test-lit", revision=REVISION,
        config=dict(TINY_LIT_VISION, position_embedding="learned", norm_epsilon=1e-5),
        text_config=dict(TINY_LIT_TEXT), projection_dim=TINY_LIT_PROJECTION,
        pool_num_heads=4, image_size=28,
    ))


def served_files() -> dict[str, bytes]:
    import json

    vocabulary = tiny_vocabulary("<start_of_text>", "<end_of_text>")  # the release's spelling
    fixed = f"apple/aimv2-test-tiny/resolve/{REVISION}/"
    lit = f"apple/aimv2-test-lit/resolve/{REVISION}/"
    return {
        fixed + "model.safetensors": open(path("fixed"), "rb").read(),
        lit + "model.safetensors": open(path("lit"), "rb").read(),
        lit + "vocab.json": json.dumps(vocabulary).encode(),
        lit + "merges.txt": "\n".join(TINY_MERGES).encode(),
    }


def serve_releases(tmp_path, monkeypatch):
    """Registers the tiny presets, serves their files from 127.0.0.1 and
    points an empty cache at tmp_path; yields the server."""
    from tests.release_server import ReleaseServer

    register_presets(monkeypatch)
    monkeypatch.setenv("KERAS_AIM_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("KERAS_AIM_OFFLINE", raising=False)
    with ReleaseServer(served_files()) as server:
        monkeypatch.setenv("KERAS_AIM_HUB_URL", server.url)
        yield server
