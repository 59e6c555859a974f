"""The AIMv2 LiT model against Apple's outputs (fixtures/aimv2_tiny/lit),
its tokenizer, zero-shot classification and bad inputs."""

import keras
import numpy as np
import pytest

import keras_aim
from keras_aim.models.aimv2 import aimv2_presets
from keras_aim.models.aimv2.aimv2_lit import first_end_token
from tests import aimv2_tiny
from tests.conftest import PARITY_ATOL, to_numpy


@pytest.fixture(scope="module")
def lit():
    return aimv2_tiny.lit_model(), aimv2_tiny.outputs("lit")


def close(got, want):
    np.testing.assert_allclose(to_numpy(got), want, atol=PARITY_ATOL)


def test_every_saved_output_matches(lit):
    model, ref = lit
    images, ids = ref["images_nhwc"], ref["input_ids"].astype("int32")
    tokens = model.vision_encoder(images)
    close(tokens, ref["image_tokens"])
    for got, want in zip(model.vision_encoder.block_outputs(images), ref["image_block_outputs"]):
        close(got, want)
    close(model.image_pool(tokens), ref["image_pooled"])
    close(model.encode_image(images), ref["image_embeds"])
    text_tokens = model.text_encoder(ids)
    close(text_tokens, ref["text_tokens"])
    for got, want in zip(model.text_encoder.block_outputs(ids), ref["text_block_outputs"]):
        close(got, want)
    close(model.text_encoder.pool(text_tokens, ids), ref["text_eos"])
    close(model.encode_text(ids), ref["text_embeds"])
    per_image, per_text = model.similarity(images, ids)
    close(per_image, ref["logits_per_image"])
    close(per_text, ref["logits_per_text"])
    outputs = model({"images": images, "token_ids": ids})
    close(outputs["logits_per_image"], ref["logits_per_image"])
    close(outputs["logits_per_text"], ref["logits_per_text"])


def test_first_end_token_is_pooled_and_padding_after_it_is_ignored(lit):
    model, ref = lit
    ids = ref["input_ids"].astype("int32")
    index = np.argmax(ids == 63, axis=1)
    np.testing.assert_array_equal(index, ref["eos_index"])
    padded = ids.copy()
    padded[0, 5:] = [1, 2, 3, 4, 5]  # anything after the first end token
    close(model.encode_text(padded), ref["text_embeds"])
    tokens = np.arange(2 * 3 * 2, dtype="float32").reshape(2, 3, 2)
    got = to_numpy(first_end_token(tokens, np.array([[1, 7, 7], [1, 2, 3]]), 7))
    np.testing.assert_array_equal(got, [tokens[0, 1], tokens[1, 0]])  # none: position 0


def test_logit_scale_is_clamped_at_100(lit):
    model, ref = lit
    images, ids = ref["images_nhwc"], ref["input_ids"].astype("int32")
    saved = to_numpy(model.logit_scale.log_logit_scale)
    try:
        model.logit_scale.log_logit_scale.assign(5.0)
        close(model.similarity(images, ids)[0], ref["logits_per_image_clamped"])
    finally:
        model.logit_scale.log_logit_scale.assign(saved)


def test_tokenizer_packs_the_reference_ids_with_either_special_token_spelling():
    want = aimv2_tiny.outputs("lit")["input_ids"]
    for spelling in ({}, {"start": "<start_of_text>", "end": "<end_of_text>"}):
        tokenizer = aimv2_tiny.tiny_tokenizer(**spelling)
        assert (tokenizer.start_token_id, tokenizer.end_token_id) == (62, 63)
        np.testing.assert_array_equal(tokenizer.pack(aimv2_tiny.REFERENCE_TEXTS, 12), want)


# Sentences and the ids a CLIP tokenizer (lower-cased, whitespace collapsed,
# byte-level BPE with "</w>" word ends, unknown pieces -> the end token)
# gives under tests/aimv2_tiny.py's vocabulary: "the</w>" (id 37) comes from
# the merges t+h -> th, th+e</w> -> the</w>; "x</w>" and "," are not in it.
TOKENIZER_CASES = [
    ("The  a\tTHE", [62, 37, 5, 37, 63]),
    ("b, the", [62, 17, 63, 37, 63]),
    ("x", [62, 63, 63]),
    ("A B", [62, 5, 17, 63]),
]


@pytest.mark.parametrize("text,ids", TOKENIZER_CASES)
def test_tokenizer_ids_match_the_clip_rules(text, ids):
    np.testing.assert_array_equal(aimv2_tiny.tiny_tokenizer().pack(text, 12), [ids])


def test_long_text_is_cut_with_truncation_and_an_error_without():
    tokenizer = aimv2_tiny.tiny_tokenizer()
    text = "a b c d e f g h i j k l m"
    packed = tokenizer.pack(text, 12)
    np.testing.assert_array_equal(packed, [[62, 5, 17, 9, 40, 2, 33, 8, 21, 50, 11, 63]])
    with pytest.raises(ValueError, match="has 13 tokens.*more than the model's 12.*truncate=True"):
        tokenizer.pack(text, 12, truncate=False)


def test_bad_token_ids_get_clear_errors(lit):
    model, _ = lit
    with pytest.raises(ValueError, match=r"Token id 64 is outside the vocabulary .*\(ids 0..63\)"):
        model.encode_text(np.array([[62, 64, 63]], "int32"))
    with pytest.raises(ValueError, match="Token id -1 is outside"):
        model.text_encoder(np.array([[-1, 63]], "int32"))
    with pytest.raises(ValueError, match="takes at most 12 tokens; received 13.*truncate=True"):
        model.encode_text(np.full((1, 13), 63, "int32"))
    with pytest.raises(ValueError, match=r"shape \(batch, length\)"):
        model.encode_text(np.array([62, 63], "int32"))


def test_zero_shot_classifier_logits_equal_the_reference(lit):
    model, ref = lit
    classifier = keras_aim.zero_shot_classifier(
        model, aimv2_tiny.REFERENCE_TEXTS, templates=["{}"],
        tokenizer=aimv2_tiny.tiny_tokenizer(),
    )
    close(classifier(ref["images_nhwc"]), ref["logits_per_image"])
    by_ids = keras_aim.zero_shot_classifier(
        model, class_token_ids=[row[None] for row in ref["input_ids"]]
    )
    close(by_ids(ref["images_nhwc"]), ref["logits_per_image"])


def test_zero_shot_averages_normalized_prompts(lit):
    model, ref = lit
    tokenizer = aimv2_tiny.tiny_tokenizer()
    templates = ["{}", "the {}"]
    classifier = keras_aim.zero_shot_classifier(model, ["a", "b c"], templates, tokenizer)
    texts = [t.format(n) for n in ["a", "b c"] for t in templates]
    embeddings = to_numpy(model.encode_text(tokenizer.pack(texts, 12)))
    embeddings /= np.linalg.norm(embeddings, axis=-1, keepdims=True)
    classes = embeddings.reshape(2, 2, -1).mean(1)
    classes /= np.linalg.norm(classes, axis=-1, keepdims=True)
    image = to_numpy(model.encode_image(ref["images_nhwc"]))
    image /= np.linalg.norm(image, axis=-1, keepdims=True)
    scale = float(np.exp(to_numpy(model.logit_scale.log_logit_scale)))
    close(classifier(ref["images_nhwc"]), scale * image @ classes.T)


def test_zero_shot_bad_inputs(lit):
    model, _ = lit
    tokenizer = aimv2_tiny.tiny_tokenizer()
    with pytest.raises(ValueError, match="exactly one '{}'"):
        keras_aim.zero_shot_classifier(model, ["a"], ["a photo"], tokenizer)
    with pytest.raises(ValueError, match="non-empty and distinct"):
        keras_aim.zero_shot_classifier(model, ["a", "a"], tokenizer=tokenizer)
    with pytest.raises(ValueError, match="needs class_names and the model's tokenizer"):
        keras_aim.zero_shot_classifier(model, ["a"])


def test_lit_saves_and_loads_as_keras_hub_preset(lit, tmp_path):
    model, ref = lit
    model.save_to_preset(str(tmp_path / "lit"))
    restored = keras_aim.AIMv2LiT.from_preset(str(tmp_path / "lit"))
    close(restored.similarity(ref["images_nhwc"], ref["input_ids"].astype("int32"))[0],
          ref["logits_per_image"])
    clone = keras_aim.AIMv2LiT.from_config(model.get_config())
    assert clone.get_config() == model.get_config()


def test_lit_preset_has_the_released_count_and_config():
    entry = aimv2_presets.get_preset("aimv2_large_patch14_224_lit")
    assert aimv2_presets.parameter_count(entry) == 436_680_193
    assert entry["text_config"]["end_token_id"] == 49407
    assert aimv2_presets.START_TOKEN_ID == 49406


LIT_NAME = aimv2_tiny.LIT_PRESET


@pytest.fixture
def lit_hub(tmp_path, monkeypatch):
    """The tiny models, the LiT's vocabulary and merges served in the Hub's
    layout, registered as presets."""
    yield from aimv2_tiny.serve_releases(tmp_path, monkeypatch)


def test_lit_release_with_tokenizer_downloads_caches_and_loads_offline(lit_hub, monkeypatch):
    ref = aimv2_tiny.outputs("lit")
    model = keras_aim.AIMv2LiT.from_preset(LIT_NAME)
    tokenizer = keras_aim.AIMv2Tokenizer.from_preset(LIT_NAME)
    ids = tokenizer.pack(aimv2_tiny.REFERENCE_TEXTS, 12)
    np.testing.assert_array_equal(ids, ref["input_ids"])
    close(model.similarity(ref["images_nhwc"], ids)[0], ref["logits_per_image"])
    assert len(lit_hub.requests) == 3

    monkeypatch.setenv("KERAS_AIM_OFFLINE", "1")
    from keras_aim.loading.preset_cache import preset_cache_dir

    cached = preset_cache_dir(LIT_NAME)
    again = keras_aim.AIMv2Tokenizer.from_preset(cached)
    np.testing.assert_array_equal(again.pack(aimv2_tiny.REFERENCE_TEXTS, 12), ref["input_ids"])
    converter = keras_aim.AIMv2ImageConverter.from_preset(cached)
    assert converter.image_size == (28, 28) and converter.pipeline == "clip"
    keras_aim.AIMv2LiT.from_preset(LIT_NAME)
    assert len(lit_hub.requests) == 3


def test_damaged_vocabulary_is_rejected(lit_hub):
    served = next(k for k in lit_hub.files if k.endswith("vocab.json"))
    lit_hub.files[served] = b'{"a": 1}'
    with pytest.raises(ValueError, match="vocab.json should map 64 tokens"):
        keras_aim.AIMv2Tokenizer.from_preset(LIT_NAME)


def test_keras_file_of_zero_shot_classifier_round_trips(lit, tmp_path):
    model, ref = lit
    classifier = keras_aim.zero_shot_classifier(
        model, class_token_ids=[row[None] for row in ref["input_ids"]]
    )
    path = str(tmp_path / "zero_shot.keras")
    classifier.save(path)
    loaded = keras.saving.load_model(path)
    close(loaded(ref["images_nhwc"]), ref["logits_per_image"])


def test_architecture_without_weights_is_randomly_initialized_offline(lit_hub):
    lit = keras_aim.AIMv2LiT.from_preset(LIT_NAME, load_weights=False)
    assert lit_hub.requests == []
    for layer in (lit.text_projection, lit.image_projection, lit.vision_encoder.blocks[0].mlp.fc3):
        assert np.abs(to_numpy(layer.kernel)).max() > 0
