"""Downstream use: cached probe features, evaluating and resuming probes,
data specs (tfds included) and mixed-precision fine-tuning."""

import functools
import os

import keras
import numpy as np
import pytest

import keras_aim
from keras_aim.training import probing
from keras_aim.training.checkpointing import fit_callbacks
from keras_aim.data.sources import labeled_images
from tests.conftest import (
    TINY_CONFIG,
    TINY_NUM_CLASSES,
    fixture_path,
    make_tiny_classifier,
    to_numpy,
)


SMALL = dict(image_shape=(16, 16, 3), patch_size=4, hidden_dim=32, num_layers=2, num_heads=2)


def _counting(backbone):
    """Counts the trunk's feature-extraction calls."""
    calls = []
    original = backbone.extract_features

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    backbone.extract_features = counted
    return calls


def _digit_batches(image_size=16, count=40):
    (images, labels), _ = keras_aim.data.digits(image_size)
    return keras_aim.data.classification_dataset(
        images[:count], labels[:count], 16, image_size, training=False
    )


def test_feature_cache_hits_and_never_serves_stale_features(tmp_path):
    backbone = keras_aim.AIMBackbone(**SMALL)
    calls = _counting(backbone)
    batches = _digit_batches()
    expected, expected_labels = probing.probe_features(
        backbone, batches, [0, 1], return_labels=True
    )
    first = len(calls)
    cache = str(tmp_path / "cache")

    features, labels = probing.cached_probe_features(backbone, batches, [0, 1], cache, "d1")
    assert len(calls) == 2 * first  # computed and written
    np.testing.assert_array_equal(np.asarray(features), expected)
    np.testing.assert_array_equal(labels, expected_labels)
    again, _ = probing.cached_probe_features(backbone, batches, [0, 1], cache, "d1")
    assert len(calls) == 2 * first  # served from disk
    assert isinstance(again, np.memmap)
    np.testing.assert_array_equal(np.asarray(again), expected)

    # Other data, other blocks, other weights: new entries, never the old one.
    probing.cached_probe_features(backbone, batches, [0, 1], cache, "d2")
    assert len(calls) == 3 * first
    probing.cached_probe_features(backbone, batches, [1], cache, "d1")
    assert len(calls) == 4 * first
    kernel = backbone.blocks[0].mlp.fc1.kernel
    kernel.assign(kernel + 0.01)
    changed, _ = probing.cached_probe_features(backbone, batches, [0, 1], cache, "d1")
    assert len(calls) == 5 * first
    assert not np.allclose(np.asarray(changed), expected)
    assert len([p for p in os.listdir(cache) if p.startswith("features-")]) == 4
    assert not [p for p in os.listdir(cache) if p.startswith(".")]  # no staging left


def test_feature_cache_rebuilds_a_damaged_entry(tmp_path):
    backbone = keras_aim.AIMBackbone(**SMALL)
    batches = _digit_batches()
    cache = str(tmp_path / "cache")
    expected, _ = probing.cached_probe_features(backbone, batches, [1], cache, "d")
    expected = np.array(expected)
    (entry,) = [tmp_path / "cache" / p for p in os.listdir(cache)]
    with open(entry / "features.f32", "r+b") as handle:
        handle.truncate(100)  # e.g. a disk filled up while copying the cache
    messages = []
    features, _ = probing.cached_probe_features(
        backbone, batches, [1], cache, "d", log=messages.append
    )
    assert "wrong size" in messages[0] and "rebuilding" in messages[0]
    np.testing.assert_array_equal(np.asarray(features), expected)


def test_empty_data_is_refused_and_leaves_no_cache_entry(tmp_path):
    """No images, as an array or as a dataset that yields nothing: a clear
    error, and the feature cache keeps no entry (not even a staging one)."""
    backbone = keras_aim.AIMBackbone(**SMALL)
    no_batches = _digit_batches().take(0)
    message = "No images to extract features from: the data is empty"
    with pytest.raises(ValueError, match=message):
        probing.probe_features(backbone, np.zeros((0, 16, 16, 3), "float32"), [1])
    with pytest.raises(ValueError, match=message):
        probing.probe_features(backbone, no_batches, [1], return_labels=True)
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match=message):
        probing.cached_probe_features(backbone, no_batches, [1], str(cache), "d")
    assert not cache.exists() or not os.listdir(cache)


def test_data_fingerprints_follow_the_data(tmp_path):
    from PIL import Image

    first = labeled_images("digits", "train", seed=0)
    assert first.fingerprint == labeled_images("digits", "train", seed=0).fingerprint
    assert first.fingerprint != labeled_images("digits", "train", seed=1).fingerprint
    assert first.fingerprint != labeled_images("digits", "val", seed=0).fingerprint
    (tmp_path / "a").mkdir()
    path = tmp_path / "a" / "x.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(path)
    before = labeled_images(f"folder:{tmp_path}").fingerprint
    Image.fromarray(np.ones((8, 9, 3), np.uint8)).save(path)
    assert labeled_images(f"folder:{tmp_path}").fingerprint != before
    with pytest.raises(ValueError, match="Unknown data 'imagenet'.*tfds:NAME"):
        labeled_images("imagenet")


@functools.cache  # a tfds builder class registers its name once
def _tiny_tfds_builder():
    import tensorflow_datasets as tfds

    class KerasAimTinyImages(tfds.core.GeneratorBasedBuilder):
        """Six 20x24 RGB images of 3 classes, generated locally."""

        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return self.dataset_info_from_configs(
                features=tfds.features.FeaturesDict({
                    "image": tfds.features.Image(shape=(20, 24, 3)),
                    "label": tfds.features.ClassLabel(names=["a", "b", "c"]),
                }),
                supervised_keys=("image", "label"),
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(0),
                    "validation": self._generate_examples(1)}

        def _generate_examples(self, seed):
            rng = np.random.RandomState(seed)
            for i in range(6):
                image = rng.randint(0, 256, (20, 24, 3)).astype(np.uint8)
                yield i, {"image": image, "label": i % 3}

    return KerasAimTinyImages


def test_tfds_splits_feed_the_probe_recipe(tmp_path, capsys):
    """A split stored as ArrayRecord is read by index; one stored as TFRecord
    (read only from the start) is refused, naming the two fixes."""
    from recipes import attentive_probe

    builder = _tiny_tfds_builder()(data_dir=str(tmp_path / "tfds"), file_format="array_record")
    builder.download_and_prepare()
    name = builder.name
    sequential = _tiny_tfds_builder()(data_dir=str(tmp_path / "tfrecord"))
    sequential.download_and_prepare()
    with pytest.raises(ValueError, match="file_format=array_record.*keras-aim prepare-data"):
        labeled_images(f"tfds:{name}", tfds_data_dir=str(tmp_path / "tfrecord"))
    train = labeled_images(f"tfds:{name}", "train", tfds_data_dir=str(tmp_path / "tfds"))
    val = labeled_images(f"tfds:{name}", "val", tfds_data_dir=str(tmp_path / "tfds"))
    assert train.class_names == ["a", "b", "c"] and "validation (6 images)" in val.description
    with pytest.raises(ValueError, match="no split 'test'; it has"):
        labeled_images(f"tfds:{name}:test", tfds_data_dir=str(tmp_path / "tfds"))
    with pytest.raises(ValueError, match="not prepared"):
        labeled_images(f"tfds:{name}", tfds_data_dir=str(tmp_path / "empty"))

    keras_aim.AIMBackbone(**SMALL).save_to_preset(str(tmp_path / "trunk"))
    assert attentive_probe.main([
        "--backbone", str(tmp_path / "trunk"), "--data", f"tfds:{name}",
        "--tfds-data-dir", str(tmp_path / "tfds"), "--epochs", "1",
        "--probe-layers", "0,1", "--verbose", "0",
    ]) == 0
    assert capsys.readouterr().out.strip().endswith("(6 images)")


def _class_folder(root, num_classes, rng, sizes=((40, 50), (33, 32))):
    from PIL import Image

    images = []
    for label in range(num_classes):
        (root / f"class_{label:02d}").mkdir(parents=True)
        for i, (h, w) in enumerate(sizes):
            image = rng.randint(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(image).save(root / f"class_{label:02d}" / f"{i}.png")
            images.append((image, label))
    return images


def test_evaluate_only_reproduces_the_classifiers_predictions(tmp_path, capsys):
    """A released-format head evaluated by the probe recipe gives exactly the
    predictions of the classifier holding it."""
    from recipes import attentive_probe

    from keras_aim.models.aim.aim_image_converter import AIMImageConverter

    classifier = make_tiny_classifier()
    keras_aim.load_official_weights(
        classifier, fixture_path("backbone.pth"), fixture_path("head.pth")
    )
    classifier.backbone.save_to_preset(str(tmp_path / "trunk"))
    pairs = _class_folder(tmp_path / "val", TINY_NUM_CLASSES, np.random.RandomState(0))
    converter = AIMImageConverter(image_size=TINY_CONFIG["image_shape"][:2])
    images = np.stack([to_numpy(converter(image)) for image, _ in pairs])
    labels = np.array([label for _, label in pairs])
    expected = to_numpy(classifier.predict(images, verbose=0))

    argv = ["--backbone", str(tmp_path / "trunk"), "--evaluate-only",
            "--head", fixture_path("head.pth"), "--probe-layers", "2,3",
            "--val", f"folder:{tmp_path / 'val'}"]
    args = _parsed(attentive_probe, argv)
    loaded = attentive_probe.classifier_with_head(args)
    _, val_set = attentive_probe.splits(args, 32, train=False)
    features, feature_labels = attentive_probe.features(
        loaded.backbone, val_set, loaded.probe_layers, 32, None
    )
    logits = probing.probe_logits(loaded.probe, features)
    np.testing.assert_array_equal(feature_labels, labels)
    np.testing.assert_allclose(logits, expected, atol=1e-5)
    np.testing.assert_array_equal(np.argmax(logits, -1), np.argmax(expected, -1))

    assert attentive_probe.main(argv) == 0
    top1 = float(np.mean(np.argmax(expected, -1) == labels))
    assert f"top-1 {top1:.2%}" in capsys.readouterr().out

    # One class folder too many: refused before any feature is computed.
    _class_folder(tmp_path / "val11", TINY_NUM_CLASSES + 1, np.random.RandomState(1))
    argv[-1] = f"folder:{tmp_path / 'val11'}"
    assert attentive_probe.main(argv) == 1
    assert "predicts 10 classes but folder" in capsys.readouterr().err


def _parsed(recipe, argv):
    import argparse

    captured = {}

    def run(args):
        captured["args"] = args
        return 0

    original = recipe.run
    recipe.run = run
    try:
        recipe.main(argv)
    finally:
        recipe.run = original
    assert isinstance(captured["args"], argparse.Namespace)
    return captured["args"]


def test_probe_recipe_keeps_its_probe_logs_and_refuses_to_overwrite(tmp_path, capsys):
    from recipes import attentive_probe

    keras_aim.AIMBackbone(**SMALL).save_to_preset(str(tmp_path / "trunk"))
    out = tmp_path / "run"
    base = ["--backbone", str(tmp_path / "trunk"), "--probe-layers", "0,1",
            "--verbose", "0", "--cache-dir", str(tmp_path / "cache")]
    assert attentive_probe.main(base + ["--epochs", "2", "--out", str(out)]) == 0
    trained = capsys.readouterr().out
    top1 = trained.split("top-1 ")[1].split(",")[0]
    assert (out / "probe.weights.h5").exists() and (out / "tensorboard").is_dir()
    assert len((out / "log.csv").read_text().strip().splitlines()) == 3  # header + 2 epochs
    assert not (out / "backup").exists()  # a finished run leaves no backup
    assert "feature cache written" in trained

    # The saved probe, evaluated: the same top-1, features from the cache.
    assert attentive_probe.main(base + ["--evaluate-only", "--head",
                                        str(out / "probe.weights.h5")]) == 0
    evaluated = capsys.readouterr().out
    assert "feature cache hit" in evaluated and f"top-1 {top1}," in evaluated

    assert attentive_probe.main(base + ["--out", str(out)]) == 1
    assert "holds the results of a finished run" in capsys.readouterr().err
    assert attentive_probe.main(base + ["--out", str(tmp_path / "new"), "--resume"]) == 1
    assert "Nothing to resume" in capsys.readouterr().err


def test_probe_learns_an_easy_task_far_above_chance():
    """Three classes, each marked by one feature channel: a probe trained on
    60 examples classifies 30 unseen ones almost perfectly (chance: 33%).
    Labels shifted or mixed up anywhere in training would not."""
    rng = np.random.RandomState(0)
    labels = rng.permutation(np.arange(90) % 3)
    features = rng.normal(scale=0.5, size=(90, 4, 8)).astype("float32")
    features[np.arange(90), :, labels] += 2.0
    model = probing.train_attentive_probe(
        features[:60], labels[:60], 3, 2, epochs=20, batch_size=20, learning_rate=1e-2
    )
    logits = probing.probe_logits(model.get_layer("probe"), features[60:])
    assert probing.topk_accuracy(logits, labels[60:], 1) >= 0.9
    assert probing.topk_accuracy(logits, labels[60:], 3) == 1.0


def test_an_interrupted_fit_resumes_at_its_epoch(tmp_path):
    features = np.random.RandomState(0).normal(size=(40, 4, 8)).astype("float32")
    labels = np.arange(40) % 3

    class Interrupt(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        probing.train_attentive_probe(
            features, labels, 3, 2, epochs=4, batch_size=10,
            callbacks=fit_callbacks(str(tmp_path), False) + [Interrupt()],
        )
    with pytest.raises(ValueError, match="interrupted run; pass --resume"):
        fit_callbacks(str(tmp_path), False)
    model = probing.train_attentive_probe(
        features, labels, 3, 2, epochs=4, batch_size=10,
        callbacks=fit_callbacks(str(tmp_path), True),
    )
    # 4 epochs of 4 steps in all: 2 before the interruption, 2 after.
    assert int(to_numpy(model.optimizer.iterations)) == 16
    rows = (tmp_path / "log.csv").read_text().strip().splitlines()
    assert [row.split(",")[0] for row in rows if row[0].isdigit()] == ["0", "1", "2", "3"]


def test_classifier_fit_in_mixed_precision():
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        classifier = keras_aim.AIMImageClassifier(keras_aim.AIMBackbone(**SMALL), 3, 2)
        assert classifier.backbone.blocks[0].attn.qkv.compute_dtype == "bfloat16"
        assert classifier.backbone.blocks[0].attn.qkv.kernel.dtype == "float32"
        classifier.compile(optimizer=keras.optimizers.AdamW(1e-3))
        images = np.random.RandomState(0).normal(size=(6, 16, 16, 3)).astype("float32")
        before = to_numpy(classifier.probe.linear.kernel).copy()
        history = classifier.fit(images, np.arange(6) % 3, epochs=1, verbose=0)
        assert np.isfinite(history.history["loss"][0])
        assert not np.allclose(to_numpy(classifier.probe.linear.kernel), before)
        assert to_numpy(classifier.predict(images, verbose=0)).shape == (6, 3)
    finally:
        keras.config.set_dtype_policy("float32")


def test_lora_recipe_in_mixed_precision_resumes_and_starts_from_a_probe(tmp_path, capsys):
    from recipes import finetune_lora

    backbone = keras_aim.AIMBackbone(**SMALL)
    backbone.save_to_preset(str(tmp_path / "trunk"))
    probe = keras_aim.AIMImageClassifier(backbone, 10, (0, 1))
    rng = np.random.RandomState(0)
    for weight in probe.probe.weights:  # values no fresh probe could have
        weight.assign(rng.normal(size=weight.shape).astype("float32"))
    probing.save_probe(probe, str(tmp_path / "probe"))
    out = tmp_path / "lora"
    (out / "backup").mkdir(parents=True)
    (out / "backup" / "junk").write_text("")  # an interrupted LoRA run
    (out / "run.json").write_text('{"recipe": "finetune_lora"}')
    # Learning rate 0: the probe saved at the end is the one it started from.
    argv = ["--backbone", str(tmp_path / "trunk"), "--out", str(out), "--epochs", "1",
            "--rank", "2", "--probe-layers", "0,1", "--dtype", "mixed_bfloat16",
            "--learning-rate", "0",
            "--init-probe", str(tmp_path / "probe" / "probe.weights.h5"), "--verbose", "0"]
    try:
        assert finetune_lora.main(argv) == 1
        assert "interrupted run; pass --resume" in capsys.readouterr().err
        (out / "backup" / "junk").unlink()
        assert finetune_lora.main(argv) == 0
    finally:
        keras.config.set_dtype_policy("float32")
    assert "LoRA r=2 fine-tuned probe: top-1 " in capsys.readouterr().out
    assert {"adapters.lora.h5", "probe.weights.h5", "log.csv"} <= set(os.listdir(out))
    with open(out / "log.csv") as handle:
        assert len(handle.read().strip().splitlines()) == 2
    # --init-probe was loaded: the saved probe is the initial one (but for
    # the batch-norm statistics, which training updates at any rate).
    started = keras_aim.AIMImageClassifier(keras_aim.AIMBackbone(**SMALL), 10, (0, 1))
    started.load_task_weights(str(out / "probe.weights.h5"))
    for got, expected in zip(started.probe.trainable_weights, probe.probe.trainable_weights):
        np.testing.assert_allclose(to_numpy(got), to_numpy(expected), atol=1e-6, err_msg=got.path)


@pytest.mark.skipif(keras.config.backend() != "torch", reason="PyTorch has no keras.distribution")
def test_probe_recipes_refuse_a_mesh_on_pytorch(tmp_path, capsys):
    from recipes import attentive_probe
    from recipes import finetune_lora

    keras_aim.AIMBackbone(**SMALL).save_to_preset(str(tmp_path / "trunk"))
    common = ["--backbone", str(tmp_path / "trunk"), "--mesh", "2x1"]
    assert attentive_probe.main(common) == 1
    assert "not available with the 'torch' backend" in capsys.readouterr().err
    assert finetune_lora.main(common + ["--out", str(tmp_path / "lora")]) == 1
    assert "not available with the 'torch' backend" in capsys.readouterr().err
    assert not (tmp_path / "lora").exists()  # refused before anything was written
