"""AIMv2 checkpoints: strict conversion (every problem listed), transformers'
names, and releases served from 127.0.0.1 in the Hub's layout: download,
check, convert, cache, offline use, damaged downloads."""

import os

import numpy as np
import pytest

import keras_aim
from keras_aim.loading import preset_cache
from keras_aim.loading.download import CorruptDownloadError, OfflineError
from tests import aimv2_tiny
from tests.conftest import PARITY_ATOL, to_numpy

# --- strict conversion -----------------------------------------------------


def test_missing_extra_and_misshaped_keys_are_listed_in_one_error():
    state = aimv2_tiny.state_dict("fixed")
    del state["trunk.blocks.1.mlp.fc3.weight"]
    del state["preprocessor.patchifier.norm.weight"]
    state["trunk.blocks.9.attn.qkv.weight"] = np.zeros((144, 48), "float32")
    state["trunk.blocks.0.attn.proj.weight"] = np.zeros((48, 47), "float32")
    state["trunk.post_trunk_norm.weight"] = np.zeros((50,), "float32")
    backbone = aimv2_tiny.fixed_backbone(load=False)
    before = [to_numpy(w) for w in backbone.weights]
    with pytest.raises(keras_aim.WeightLoadingError) as info:
        keras_aim.load_aimv2_weights(backbone, state)
    message = str(info.value)
    assert "nothing was loaded" in message
    assert "2 missing keys" in message and "1 unexpected keys" in message
    assert "2 shape mismatches" in message
    for key in ("trunk.blocks.1.mlp.fc3.weight", "preprocessor.patchifier.norm.weight",
                "trunk.blocks.9.attn.qkv.weight", "trunk.blocks.0.attn.proj.weight",
                "trunk.post_trunk_norm.weight"):
        assert key in message
    assert "expected shape (48, 48), found (48, 47)" in message
    for old, new in zip(before, backbone.weights):
        np.testing.assert_array_equal(old, to_numpy(new))


def test_native_checkpoint_does_not_load_into_a_fixed_size_model():
    backbone = aimv2_tiny.fixed_backbone(load=False)
    with pytest.raises(keras_aim.WeightLoadingError, match=r"1 missing keys:\n  preprocessor.pos_embed"):
        keras_aim.load_aimv2_weights(backbone, aimv2_tiny.path("native"))


def test_load_aimv2_weights_refuses_other_models():
    with pytest.raises(TypeError, match="AIMv2Backbone or AIMv2LiT"):
        keras_aim.load_aimv2_weights(object(), {})


# --- transformers' names (spec section 7) -----------------------------------

_BLOCK = {
    "norm_1": "rms_norm1", "norm_2": "rms_norm2", "attn.proj": "attention.out_proj",
    "mlp.fc1": "ffn.gate_proj", "mlp.fc3": "ffn.up_proj", "mlp.fc2": "ffn.down_proj",
}


def to_transformers(state: dict, encoder_prefix: str = "") -> dict:
    """Apple's names -> transformers', as transformers' converter renames
    them (qkv split in three row blocks, the position table squeezed)."""
    out = {}
    for key, value in state.items():
        rest = key
        if rest.startswith("trunk.blocks."):
            _, _, index, rest = rest.split(".", 3)
            prefix = f"encoder.layers.{index}."
            if rest == "attn.qkv.weight":
                for name, part in zip("qkv", np.split(value, 3)):
                    out[f"{encoder_prefix}{prefix}attention.{name}_proj.weight"] = part
                continue
            module, param = rest.rsplit(".", 1)
            out[f"{encoder_prefix}{prefix}{_BLOCK[module]}.{param}"] = value
            continue
        renamed = {
            "preprocessor.patchifier.proj.weight": "embeddings.patch_embed.weight",
            "preprocessor.patchifier.proj.bias": "embeddings.patch_embed.bias",
            "preprocessor.patchifier.norm.weight": "embeddings.rms_norm.weight",
            "preprocessor.pos_embed": "embeddings.position_embedding.weight",
            "preprocessor.text_embedding.weight": "embeddings.token_embedding.weight",
            "preprocessor.positional_embedding": "embeddings.position_embedding.weight",
            "trunk.post_trunk_norm.weight": "rms_norm.weight",
            "head.cls_token": "head.cls_token",
            "head.k.weight": "head.k_proj.weight",
            "head.v.weight": "head.v_proj.weight",
            "head.linear.weight": "head.output_proj.weight",
            "head.linear.bias": "head.output_proj.bias",
        }[rest]
        out[encoder_prefix + renamed] = value[0] if rest == "preprocessor.pos_embed" else value
    return out


def lit_to_transformers(state: dict) -> dict:
    out = {
        "visual_projection.weight": state.pop("image_projector.weight"),
        "text_projection.weight": state.pop("text_projector.weight"),
        "logit_scale": state.pop("log_logit_scale"),
    }
    for apple, hf in (("image_encoder.", "vision_model."), ("text_encoder.", "text_model.")):
        part = {k[len(apple):]: v for k, v in state.items() if k.startswith(apple)}
        out.update(to_transformers(part, hf))
    return out


def test_transformers_named_checkpoint_gives_the_same_outputs():
    state = to_transformers(aimv2_tiny.state_dict("fixed"))
    assert "encoder.layers.0.attention.q_proj.weight" in state
    assert state["embeddings.position_embedding.weight"].shape == (16, 48)
    backbone = aimv2_tiny.fixed_backbone(load=False)
    keras_aim.load_aimv2_weights(backbone, state)
    ref = aimv2_tiny.outputs("fixed")
    np.testing.assert_allclose(
        to_numpy(backbone(ref["images_nhwc"])), ref["final_tokens"], atol=PARITY_ATOL
    )


def test_transformers_named_native_and_lit_checkpoints_load(tmp_path):
    from safetensors.numpy import save_file

    native = aimv2_tiny.native_backbone(load=False)
    keras_aim.load_aimv2_weights(native, to_transformers(aimv2_tiny.state_dict("native")))
    ref = aimv2_tiny.outputs("native")
    np.testing.assert_allclose(
        to_numpy(native(ref["images_a_nhwc"])), ref["final_tokens_a"], atol=PARITY_ATOL
    )
    path = str(tmp_path / "model.safetensors")  # as a user's file on disk
    save_file(lit_to_transformers(aimv2_tiny.state_dict("lit")), path)
    lit = aimv2_tiny.lit_model(load=False)
    keras_aim.load_aimv2_weights(lit, path)
    ref = aimv2_tiny.outputs("lit")
    logits, _ = lit.similarity(ref["images_nhwc"], ref["input_ids"].astype("int32"))
    np.testing.assert_allclose(to_numpy(logits), ref["logits_per_image"], atol=PARITY_ATOL)


def test_transformers_checkpoint_errors_list_the_problems():
    state = to_transformers(aimv2_tiny.state_dict("fixed"))
    del state["encoder.layers.2.attention.k_proj.weight"]
    state["encoder.layers.0.ffn.up_proj.weight"] = np.zeros((127, 48), "float32")
    with pytest.raises(keras_aim.WeightLoadingError) as info:
        keras_aim.load_aimv2_weights(aimv2_tiny.fixed_backbone(load=False), state)
    message = str(info.value)
    assert "transformers' names" in message
    assert "trunk.blocks.2.attn.qkv.weight  expected shape (144, 48)" in message  # missing
    for leftover in ("encoder.layers.2.attention.q_proj.weight",
                     "encoder.layers.2.attention.v_proj.weight"):
        assert leftover in message  # unexpected: its group is incomplete
    assert "trunk.blocks.0.mlp.fc3.weight  expected shape (128, 48), found (127, 48)" in message


# --- releases served from 127.0.0.1 -------------------------------------------

TINY_NAME = aimv2_tiny.FIXED_PRESET
REVISION = aimv2_tiny.REVISION


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """The tiny models as released presets in the Hub's layout
    (`<repo>/resolve/<revision>/<file>`) on a local server."""
    yield from aimv2_tiny.serve_releases(tmp_path, monkeypatch)


def cache_files():
    """Files in the cache, without the writers' lock files."""
    home = preset_cache.keras_aim_home()
    found = (
        os.path.relpath(os.path.join(root, f), home)
        for root, _, files in os.walk(home) for f in files
    )
    return sorted(f for f in found if not f.startswith(".locks"))


def test_release_downloads_checks_converts_caches_then_loads_offline(hub, monkeypatch):
    ref = aimv2_tiny.outputs("fixed")
    backbone = keras_aim.AIMv2Backbone.from_preset(TINY_NAME)
    np.testing.assert_allclose(to_numpy(backbone(ref["images_nhwc"])), ref["final_tokens"], atol=PARITY_ATOL)
    assert [r[0] for r in hub.requests] == [
        f"apple/aimv2-test-tiny/resolve/{REVISION}/model.safetensors"
    ]
    files = cache_files()
    assert f"downloads/aimv2-test-tiny/{REVISION}/model.safetensors" in files
    for name in ("config.json", "model.weights.h5", "preprocessor.json", "image_converter.json"):
        assert f"presets/{TINY_NAME}/{name}" in files
    assert not [f for f in files if ".part" in f or ".tmp" in f]

    monkeypatch.setenv("KERAS_AIM_OFFLINE", "1")
    again = keras_aim.AIMv2Backbone.from_preset(TINY_NAME)
    np.testing.assert_allclose(to_numpy(again(ref["images_nhwc"])), ref["final_tokens"], atol=PARITY_ATOL)
    classifier = keras_aim.AIMv2ImageClassifier.from_preset(TINY_NAME, num_classes=3)
    assert classifier.preprocessor.image_converter.pipeline == "clip"
    assert len(hub.requests) == 1


@pytest.mark.parametrize("damage", ["truncated", "wrong_shape"])
def test_damaged_download_is_rejected_and_leaves_no_cache_entry(hub, damage):
    served = next(k for k in hub.files if "aimv2-test-tiny/" in k)
    if damage == "truncated":
        hub.files[served] = hub.files[served][:-1000]
        expected = "not a complete safetensors file"
    else:  # a complete file of another architecture
        hub.files[served] = open(aimv2_tiny.path("native"), "rb").read()
        expected = "missing preprocessor.pos_embed"
    with pytest.raises(CorruptDownloadError, match=expected) as info:
        keras_aim.AIMv2Backbone.from_preset(TINY_NAME)
    assert "was deleted" in str(info.value)
    assert cache_files() == []


def test_offline_without_cache_names_the_file_and_url(hub, monkeypatch):
    monkeypatch.setenv("KERAS_AIM_OFFLINE", "1")
    with pytest.raises(OfflineError, match=rf"resolve/{REVISION}/model.safetensors"):
        keras_aim.AIMv2Backbone.from_preset(TINY_NAME)
    assert hub.requests == []


def test_local_checkpoint_loads_instead_of_the_release(hub):
    ref = aimv2_tiny.outputs("fixed")
    state = to_transformers(aimv2_tiny.state_dict("fixed"))
    backbone = keras_aim.AIMv2Backbone.from_preset(TINY_NAME, checkpoint=state)
    np.testing.assert_allclose(to_numpy(backbone(ref["images_nhwc"])), ref["final_tokens"], atol=PARITY_ATOL)
    assert hub.requests == []


def test_unknown_and_wrong_kind_presets_get_clear_errors():
    with pytest.raises(ValueError, match="is the LiT image-text model"):
        keras_aim.AIMv2Backbone.from_preset("aimv2_large_patch14_224_lit", load_weights=False)
    with pytest.raises(ValueError, match="is a vision encoder"):
        keras_aim.AIMv2LiT.from_preset("aimv2_large_patch14_224", load_weights=False)
    with pytest.raises(ValueError, match="no classifier heads for AIMv2"):
        keras_aim.AIMv2ImageClassifier.from_preset("aimv2_large_patch14_224")


# --- the safetensors reader ---------------------------------------------------


def test_safetensors_reader_reads_what_the_library_wrote(tmp_path):
    import ml_dtypes
    from safetensors.numpy import load_file, save_file

    from keras_aim.loading.safetensors_file import SafetensorsFile

    path = str(tmp_path / "t.safetensors")
    rng = np.random.RandomState(0)
    state = {
        "a": rng.randn(3, 4).astype("float32"),
        "b": rng.randn(5).astype(ml_dtypes.bfloat16),
        "scalar": np.array(2.5, "float32"),
        "ids": np.arange(6, dtype="int64").reshape(2, 3),
    }
    save_file(state, path, metadata={"format": "pt"})
    reader = SafetensorsFile(path)
    try:
        assert sorted(reader.keys()) == sorted(state)
        assert reader.dtype("b") == "BF16" and reader.shape("scalar") == ()
        for key, value in load_file(path).items():
            np.testing.assert_array_equal(reader.array(key), value)
            assert reader.array(key).dtype == value.dtype
    finally:
        reader.close()


@pytest.mark.parametrize("change,problem", [
    (lambda data: data[:-4], "header describes .* bytes of tensor data but the file holds"),
    (lambda data: data + b"\0" * 4, "header describes"),
    (lambda data: data[:6], "only 6 bytes long"),
    (lambda data: b"\xff" * 8 + data[8:], "header length .* does not fit"),
])
def test_damaged_safetensors_files_are_named(tmp_path, change, problem):
    path = tmp_path / "model.safetensors"
    path.write_bytes(change(open(aimv2_tiny.path("fixed"), "rb").read()))
    with pytest.raises(keras_aim.WeightLoadingError, match=problem):
        keras_aim.load_aimv2_weights(aimv2_tiny.fixed_backbone(load=False), str(path))
