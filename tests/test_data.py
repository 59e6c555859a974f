"""keras_aim.data: embedded digits, augmentations, folders, tfds."""

import numpy as np
import pytest
from PIL import Image

from keras_aim import data


def test_digits_is_embedded_rgb_and_stratified():
    (x_train, y_train), (x_test, y_test) = data.digits(16)
    assert x_train.shape[1:] == (16, 16, 3) and x_train.dtype == np.uint8
    assert len(x_train) + len(x_test) == 1797
    assert set(np.bincount(y_test)) <= {35, 36, 37}
    with pytest.raises(ValueError, match="multiple of 8"):
        data.digits(12)


@pytest.mark.parametrize("augmentation", ["aim", "shift", "none"])
def test_pretraining_stream_shapes_and_exact_resume(augmentation):
    (x_train, _), _ = data.digits(16)
    full = [b.numpy() for b in data.pretraining_dataset(
        x_train, 8, 16, augmentation, seed=3).take(4)]
    assert full[0].shape == (8, 16, 16, 3) and full[0].dtype == np.float32
    resumed = [b.numpy() for b in data.pretraining_dataset(
        x_train, 8, 16, augmentation, seed=3, start_step=2).take(2)]
    np.testing.assert_array_equal(full[2], resumed[0])
    np.testing.assert_array_equal(full[3], resumed[1])
    other = next(iter(data.pretraining_dataset(x_train, 8, 16, augmentation, seed=4)))
    assert not np.array_equal(full[0], other.numpy())


def test_shards_of_a_stream_are_the_parts_of_its_global_batches():
    (x_train, _), _ = data.digits(16)
    full = [b.numpy() for b in data.pretraining_dataset(
        x_train, 8, 16, "shift", seed=3, start_step=1).take(3)]
    parts = [[b.numpy() for b in data.pretraining_dataset(
        x_train, 8, 16, "shift", seed=3, start_step=1, shard=(i, 4)).take(3)]
        for i in range(4)]
    for step in range(3):
        np.testing.assert_array_equal(
            np.concatenate([part[step] for part in parts]), full[step])
    with pytest.raises(ValueError, match=r"shard \(0, 3\) does not split batches of 8"):
        data.pretraining_dataset(x_train, 8, 16, shard=(0, 3))


def test_aim_augmentation_takes_any_image_size():
    import tensorflow as tf

    images = tf.data.Dataset.from_generator(
        lambda: (np.full((h, w, 3), 128, np.uint8) for h, w in [(40, 60), (90, 30)]),
        output_signature=tf.TensorSpec((None, None, 3), tf.uint8),
    )
    batch = next(iter(data.pretraining_dataset(images, 2, 32, "aim", shuffle_buffer=2)))
    assert batch.shape == (2, 32, 32, 3)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="augmentation must be one of"):
        data.pretraining_dataset(np.zeros((2, 8, 8, 3), np.uint8), 2, 8, "mixup")
    with pytest.raises(ValueError, match="empty"):
        data.pretraining_dataset(np.zeros((0, 8, 8, 3), np.uint8), 2, 8)
    with pytest.raises(ValueError, match=r"shape \(n, height, width, 3\)"):
        data.pretraining_dataset(np.zeros((2, 8, 8), np.uint8), 2, 8)
    with pytest.raises(ValueError, match=r"Labels must be in \[0, 10\); found 0..12"):
        data.classification_dataset(
            np.zeros((2, 8, 8, 3), np.uint8), [0, 12], 2, 8, True, num_classes=10
        )
    with pytest.raises(ValueError, match="empty"):
        data.classification_dataset(np.zeros((0, 8, 8, 3), np.uint8), [], 2, 8, True)


def test_image_folder_skips_and_counts_corrupt_files(tmp_path):
    for label, color in (("cat", 10), ("dog", 200)):
        folder = tmp_path / label
        folder.mkdir()
        Image.fromarray(np.full((20, 30, 3), color, np.uint8)).save(folder / "a.png")
        Image.fromarray(np.full((24, 24, 3), color, np.uint8)).save(folder / "b.jpg")
    (tmp_path / "dog" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    (tmp_path / "dog" / "notes.txt").write_text("ignored")
    # A TIFF named .png: Pillow reads it, the pipeline's decoder does not.
    Image.fromarray(np.full((24, 24, 3), 9, np.uint8)).save(tmp_path / "cat" / "c.png", "TIFF")
    ds, classes, skipped = data.image_folder(str(tmp_path))
    assert classes == ["cat", "dog"]
    assert len(skipped) == 2
    assert skipped[0].startswith(str(tmp_path / "cat" / "c.png") + ": not a readable image")
    assert skipped[1].startswith(str(tmp_path / "dog" / "broken.jpg") + ": not a readable image")
    items = [(image.numpy(), int(label)) for image, label in ds]
    assert sorted(label for _, label in items) == [0, 0, 1, 1]
    assert items[0][0].shape == (20, 30, 3)
    stream = data.pretraining_dataset(ds.map(lambda image, label: image), 2, 16, "aim")
    assert next(iter(stream)).shape == (2, 16, 16, 3)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.image_folder(str(tmp_path / "missing"))


def test_skipped_files_are_named_in_the_data_spec_report(tmp_path, capsys):
    from keras_aim.data.sources import labeled_images

    (tmp_path / "a").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a" / "ok.png")
    for i in range(7):
        (tmp_path / "a" / f"bad{i}.jpg").write_bytes(b"no")
    labeled_images(f"folder:{tmp_path}")
    printed = capsys.readouterr().out
    assert f"skipped 7 unreadable image file(s) in {tmp_path}:" in printed
    for i in range(5):
        assert str(tmp_path / "a" / f"bad{i}.jpg") in printed
    assert "bad5.jpg" not in printed and "... and 2 more" in printed


def test_decoding_gives_the_pixels_of_the_released_evaluation(tmp_path):
    """8-bit files decode to exactly the pixels PIL's `convert("RGB")` gives
    (what the released evaluation read with): JPEG with the accurate IDCT,
    also grayscale and CMYK JPEG, palette and alpha PNG. 16-bit PNG keeps
    the high byte (PIL would clip it to white)."""
    from keras_aim.data.images import read_image

    rng = np.random.RandomState(0)
    rgb = rng.randint(0, 256, (30, 41, 3), dtype=np.uint8)
    files = {"rgb.jpg": Image.fromarray(rgb), "gray.jpg": Image.fromarray(rgb).convert("L"),
             "cmyk.jpg": Image.fromarray(rgb).convert("CMYK"),
             "palette.png": Image.fromarray(rgb).convert("P"),
             "alpha.png": Image.fromarray(np.dstack([rgb, rgb[..., :1]])),
             "gif.gif": Image.fromarray(rgb)}
    for name, image in files.items():
        image.save(tmp_path / name)
        with Image.open(tmp_path / name) as stored:
            expected = np.asarray(stored.convert("RGB"))
        np.testing.assert_array_equal(read_image(str(tmp_path / name)), expected, err_msg=name)
    deep = (rng.rand(12, 9) * 65535).astype(np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    np.testing.assert_array_equal(read_image(str(tmp_path / "deep.png")),
                                  np.repeat((deep >> 8)[..., None], 3, -1))


def test_tfds_names_load_through_tensorflow_datasets():
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=4):
        ds, names = data.tfds_images("mnist", "train")
        images = [image.numpy() for image, _ in ds.take(4)]
    assert len(images) == 4 and images[0].shape == (28, 28, 3)
    assert names == [str(i) for i in range(10)]
