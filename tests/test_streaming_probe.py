"""The streamed attentive probe (`recipes.attentive_probe --stream`,
`keras_aim.training.streaming_probe`) and the feature-size checks and
bfloat16 storage of the cached probe."""

import re

import numpy as np
import pytest

import keras_aim
from keras_aim.training import probing

SMALL = dict(image_shape=(16, 16, 3), patch_size=4, hidden_dim=32, num_layers=2, num_heads=2)
QUIET = ["--probe-layers", "0,1", "--verbose", "0"]


@pytest.fixture
def small_trunk(tmp_path):
    keras_aim.AIMBackbone(**SMALL).save_to_preset(str(tmp_path / "trunk"))
    return str(tmp_path / "trunk")


def top1_top5(printed: str) -> tuple[float, float]:
    """The last `top-1 X%, top-5 Y%` figures a run printed."""
    found = re.findall(r"top-1 ([\d.]+)%, top-5 ([\d.]+)%", printed)
    assert found, printed
    return float(found[-1][0]), float(found[-1][1])


def run_probe(argv, capsys) -> str:
    from recipes import attentive_probe

    code = attentive_probe.main(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


@pytest.mark.slow
def test_streamed_probe_on_the_digits_learns(small_trunk, capsys):
    """16-pixel digits train without augmentation by default: the streamed
    probe sees what the cached probe sees, one batch at a time, and on a
    random tiny trunk reaches far above chance (10%) on the held-out digits."""
    printed = run_probe(["--backbone", small_trunk, "--stream", "--epochs", "15",
                         "--batch-size", "32", "--learning-rate", "3e-3", *QUIET], capsys)
    assert "streaming probe: 1,438 images, 44 steps of 32 per epoch, augmentation none" in printed
    assert "probe features:" not in printed  # no features computed or held
    top1, top5 = top1_top5(printed)
    assert top1 > 50.0, printed
    assert top5 >= top1
    assert printed.strip().endswith("(359 images)")


def _jpeg_folder(root, rng, classes=3, per_class=12):
    """`root/<class>/<i>.jpg`: each class a color, with noise, of varied sizes."""
    from PIL import Image

    colors = [(200, 40, 40), (40, 200, 40), (40, 40, 200), (200, 200, 40)]
    for label in range(classes):
        (root / f"class_{label}").mkdir(parents=True)
        for i in range(per_class):
            h, w = 64 + 4 * (i % 3), 72 + 8 * (i % 2)
            image = np.clip(rng.normal(colors[label], 30, (h, w, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(image).save(root / f"class_{label}" / f"{i}.jpg", quality=90)
    return f"folder:{root}"


def test_streamed_probe_on_a_jpeg_folder_with_the_aim_augmentation(tmp_path, capsys):
    keras_aim.AIMBackbone(image_shape=(64, 64, 3), patch_size=16, hidden_dim=32,
                          num_layers=2, num_heads=2).save_to_preset(str(tmp_path / "trunk"))
    folder = _jpeg_folder(tmp_path / "images", np.random.RandomState(0))
    printed = run_probe(["--backbone", str(tmp_path / "trunk"), "--data", folder, "--stream",
                         "--epochs", "8", "--batch-size", "8", "--learning-rate", "1e-2",
                         *QUIET], capsys)
    # 64 px: the paper's augmentation by default; 20% of each class held out.
    assert "streaming probe: 30 images, 3 steps of 8 per epoch, augmentation aim" in printed
    top1, _ = top1_top5(printed)
    assert printed.strip().endswith("(6 images)")
    assert top1 > 34.0, printed  # three colors: chance is 33%


@pytest.mark.slow
def test_streamed_evaluation_of_a_saved_head_equals_the_feature_evaluation(
        tmp_path, small_trunk, capsys):
    out = tmp_path / "probe"
    trained = run_probe(["--backbone", small_trunk, "--stream", "--epochs", "2",
                         "--augmentation", "shift", "--out", str(out), *QUIET], capsys)
    assert "augmentation shift" in trained
    head = str(out / "probe.weights.h5")
    evaluate = ["--backbone", small_trunk, "--evaluate-only", "--head", head, *QUIET]
    streamed = run_probe(evaluate + ["--stream"], capsys)
    from_features = run_probe(evaluate, capsys)
    assert "probe features:" in from_features and "probe features:" not in streamed
    assert top1_top5(streamed) == top1_top5(from_features) == top1_top5(trained)
    assert streamed.strip().endswith("(359 images)")


def test_options_that_exclude_each_other_are_refused(small_trunk, capsys):
    from recipes import attentive_probe

    for extra, message in [
        (["--stream", "--cache-dir", "cache"], "--cache-dir and --stream exclude each other"),
        (["--cache-dtype", "bfloat16"], "--cache-dtype needs --cache-dir"),
        (["--augmentation", "aim"], "--augmentation applies to training with --stream"),
    ]:
        with pytest.raises(SystemExit) as exited:
            attentive_probe.main(["--backbone", small_trunk, *extra])
        assert exited.value.code == 2
        assert message in capsys.readouterr().err


def test_features_that_do_not_fit_are_refused_naming_stream(
        tmp_path, small_trunk, capsys, monkeypatch):
    from recipes import attentive_probe

    cache = tmp_path / "cache"
    argv = ["--backbone", small_trunk, "--epochs", "1", "--cache-dir", str(cache), *QUIET]
    monkeypatch.setattr(probing, "free_disk_bytes", lambda path: 1_000_000)
    assert attentive_probe.main(argv) == 1
    captured = capsys.readouterr()
    # 1,438 + 359 digits x 16 tokens x 32 wide x 4 bytes: 3.7 MB; nothing written.
    assert "probe features: 1,438 + 359 images x 16 tokens x 32 x 4 bytes (float32) = 3.7 MB" \
        in captured.out
    assert "The feature cache needs 3.7 MB but" in captured.err
    assert "--stream" in captured.err and "--cache-dtype bfloat16" in captured.err
    assert not cache.exists() or not any(cache.iterdir())

    # Without a cache, the features must fit in memory.
    monkeypatch.setattr(probing, "available_memory_bytes", lambda: 999)
    assert attentive_probe.main(argv[:4] + QUIET) == 1
    captured = capsys.readouterr()
    assert "need 3.7 MB of memory but 999 bytes is available. Train with --stream" \
        in captured.err


def test_feature_sizes_and_free_space():
    assert probing.feature_bytes(10, 256, 1536, "float32") == 10 * 256 * 1536 * 4
    assert probing.feature_bytes(10, 256, 1536, "bfloat16") == 10 * 256 * 1536 * 2
    assert probing.free_disk_bytes("/no/such/folder/below/root") > 0  # the root's
    assert (probing.available_memory_bytes() or 1) > 0


def test_bfloat16_cache_is_half_the_size_and_close_to_float32(tmp_path):
    backbone = keras_aim.AIMBackbone(**SMALL)
    (images, labels), _ = keras_aim.data.digits(16)
    batches = keras_aim.data.classification_dataset(
        images[:40], labels[:40], 16, 16, training=False)
    wide, wide_labels = probing.cached_probe_features(
        backbone, batches, [0, 1], str(tmp_path), "d", cache_dtype="float32")
    narrow, narrow_labels = probing.cached_probe_features(
        backbone, batches, [0, 1], str(tmp_path), "d", cache_dtype="bfloat16")
    assert narrow.dtype.name == "bfloat16" and narrow.shape == wide.shape == (40, 16, 32)
    np.testing.assert_array_equal(narrow_labels, wide_labels)
    np.testing.assert_allclose(np.asarray(narrow, "float32"), wide, rtol=1e-2, atol=1e-2)
    files = list(tmp_path.rglob("features.*"))
    assert sorted(p.name for p in files) == ["features.bf16", "features.f32"]
    sizes = {p.suffix: p.stat().st_size for p in files}
    assert sizes[".bf16"] * 2 == sizes[".f32"]
    # Read back from the cache; the probe's logits take bfloat16 rows.
    again, _ = probing.cached_probe_features(
        backbone, batches, [0, 1], str(tmp_path), "d", cache_dtype="bfloat16")
    assert again.dtype.name == "bfloat16"
    from keras_aim.layers import AIMAttentionProbe

    probe = AIMAttentionProbe(32, 10, 2)
    np.testing.assert_allclose(probing.probe_logits(probe, narrow),
                               probing.probe_logits(probe, wide), atol=0.05)


def test_bfloat16_cache_gives_about_the_float32_top1(tmp_path, small_trunk, capsys):
    base = ["--backbone", small_trunk, "--epochs", "10", "--batch-size", "32",
            "--learning-rate", "3e-3", "--cache-dir", str(tmp_path / "cache"), *QUIET]
    wide = run_probe(base, capsys)
    narrow = run_probe(base + ["--cache-dtype", "bfloat16"], capsys)
    assert "x 2 bytes (bfloat16) = 1.8 MB" in narrow
    assert "feature cache written" in narrow  # its own entries, not the float32 ones
    assert abs(top1_top5(wide)[0] - top1_top5(narrow)[0]) <= 3.0, (wide, narrow)


def test_a_resumed_stream_starts_at_the_epoch_its_backup_restores(tmp_path):
    """`backup_epoch` reads what `BackupAndRestore` will restore (also from
    its second copy), so the recipe starts the stream at that epoch."""
    import json

    from keras_aim.training.checkpointing import backup_epoch

    assert backup_epoch(None) == 0 and backup_epoch(str(tmp_path)) == 0
    (tmp_path / "backup").mkdir()
    (tmp_path / "backup" / "training_metadata.json.bkp").write_text(json.dumps({"epoch": 2}))
    assert backup_epoch(str(tmp_path)) == 2
    (tmp_path / "backup" / "training_metadata.json").write_text(json.dumps({"epoch": 3}))
    assert backup_epoch(str(tmp_path)) == 3
    (tmp_path / "backup-process1").mkdir()
    (tmp_path / "backup-process1" / "training_metadata.json").write_text(json.dumps({"epoch": 1}))
    assert backup_epoch(str(tmp_path), process_index=1) == 1
