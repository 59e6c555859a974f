"""keras_aim.data: embedded digits, augmentations, folders, tfds."""

import os

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


def _folder(root, classes, size=(20, 30), fmt="jpg", seed=0):
    """`root/<class>/...` with `classes[name]` images each (nested one level
    for every second image); returns the root as a string."""
    rng = np.random.RandomState(seed)
    for name, count in classes.items():
        for i in range(count):
            folder = root / name / ("deeper" if i % 2 else "")
            folder.mkdir(parents=True, exist_ok=True)
            coarse = rng.randint(0, 256, (size[0] // 4, size[1] // 4, 3), dtype=np.uint8)
            Image.fromarray(coarse).resize(size[::-1], Image.BICUBIC).save(folder / f"{i}.{fmt}")
    return str(root)


def test_image_folder_lists_every_depth_without_decoding(tmp_path):
    from keras_aim.data.listing import list_folder

    root = _folder(tmp_path / "data", {"cat": 3, "dog": 2})
    (tmp_path / "data" / "dog" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    (tmp_path / "data" / "dog" / "notes.txt").write_text("ignored")
    (tmp_path / "data" / "cat" / "deeper" / "loop").symlink_to(tmp_path / "data" / "cat")
    listing = list_folder(root)
    assert listing.class_names == ["cat", "dog"]
    assert [os.path.relpath(p, root) for p in listing.paths] == [
        "cat/0.jpg", "cat/2.jpg", "cat/deeper/1.jpg",
        "dog/0.jpg", "dog/broken.jpg", "dog/deeper/1.jpg"]  # nothing decoded to list
    assert listing.labels == [0, 0, 0, 1, 1, 1]
    assert len(listing.problems) == 1 and "a loop" in listing.problems[0]
    ds, classes, problems = data.image_folder(root)  # a broken file is left out when met
    assert sorted(int(label) for _, label in ds) == [0, 0, 0, 1, 1]
    (tmp_path / "data" / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(ValueError, match="class folder.*empty hold no image"):
        list_folder(root)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list_folder(str(tmp_path / "missing"))


def test_folder_stream_resumes_exactly_and_shards_cover_every_batch(tmp_path):
    root = _folder(tmp_path, {"a": 7, "b": 6}, size=(40, 52))
    spec = f"folder:{root}"
    full = [b.numpy() for b in data.pretraining_dataset(spec, 8, 16, "aim", seed=5).take(5)]
    assert full[0].shape == (8, 16, 16, 3) and np.isfinite(full[0]).all()
    resumed = [b.numpy() for b in data.pretraining_dataset(
        spec, 8, 16, "aim", seed=5, start_step=3).take(2)]
    np.testing.assert_array_equal(resumed[0], full[3])
    np.testing.assert_array_equal(resumed[1], full[4])
    # A step far beyond the data starts at once: its batch is a pure function
    # of (seed, position), the same whether reached by resuming or not.
    far = next(iter(data.pretraining_dataset(spec, 8, 16, "aim", seed=5, start_step=10**6)))
    assert far.shape == (8, 16, 16, 3)
    parts = [[b.numpy() for b in data.pretraining_dataset(
        spec, 8, 16, "aim", seed=5, shard=(i, 4)).take(5)] for i in range(4)]
    for step in range(5):
        np.testing.assert_array_equal(np.concatenate([p[step] for p in parts]), full[step])


def test_each_process_reads_only_its_share():
    """The positions a shard reads are disjoint from the others' and cover
    every global batch, without touching the rest."""
    from keras_aim.data.pipelines import _shard_positions

    batch, count = 12, 4
    seen = [list(_shard_positions(7, batch, (i, count)).take(6).as_numpy_iterator())
            for i in range(count)]
    everything = sorted(p for share in seen for p in share)
    assert everything == list(range(7 * batch, 9 * batch))  # two whole global batches
    assert all(len(set(a) & set(b)) == 0 for i, a in enumerate(seen) for b in seen[i + 1:])


def test_fused_jpeg_crop_equals_a_full_decode_then_crop():
    """Same crop box; pixels equal inside the crop; on its one-pixel edge
    ring, where chroma upsampling sees no neighbour outside the crop, 4:4:4
    JPEGs are equal too and 4:2:0 ones differ by little on average."""
    import io

    import tensorflow as tf

    from keras_aim.data import augment

    rng = np.random.RandomState(1)
    for subsampling in (0, 2):  # 4:4:4 and 4:2:0
        for trial in range(6):
            coarse = rng.randint(0, 256, (20, 24, 3), dtype=np.uint8)
            buffer = io.BytesIO()
            Image.fromarray(coarse).resize((97 + trial, 83), Image.BICUBIC).save(
                buffer, "JPEG", quality=90, subsampling=subsampling)
            encoded = tf.constant(buffer.getvalue())
            seed = tf.constant([3, trial], tf.int64)
            fused = augment.random_crop(encoded, seed).numpy().astype(int)
            whole = augment.random_crop(
                tf.io.decode_jpeg(encoded, channels=3, dct_method="INTEGER_ACCURATE"), seed
            ).numpy().astype(int)
            assert fused.shape == whole.shape
            difference = np.abs(fused - whole)
            np.testing.assert_array_equal(difference[1:-1, 1:-1], 0)
            if subsampling == 0:
                np.testing.assert_array_equal(difference, 0)
            assert difference.max() <= 48 and difference.mean() < 1.0


def test_unreadable_images_are_skipped_named_and_counted(tmp_path):
    from keras_aim.data.pipelines import BadImages, BadImagesError

    root = _folder(tmp_path / "data", {"a": 6, "b": 6})
    (tmp_path / "data" / "a" / "3.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    Image.fromarray(np.zeros((9, 9, 3), np.uint8)).save(tmp_path / "data" / "b" / "x.png", "TIFF")
    bad = BadImages(stream=open(os.devnull, "w"))
    batches = [b.numpy() for b in data.pretraining_dataset(
        f"folder:{root}", 4, 16, "aim", seed=0, bad_images=bad).take(14)]  # 4 passes of 14
    assert all(b.shape == (4, 16, 16, 3) and np.isfinite(b).all() for b in batches)
    assert 8 <= bad.count <= 12  # two bad files, met once per pass (and in read-ahead)
    assert set(bad.names) == {str(tmp_path / "data" / "a" / "3.jpg"),
                              str(tmp_path / "data" / "b" / "x.png")}
    # Evaluation leaves them out: every readable image once, none twice.
    from keras_aim.data.sources import labeled_images

    source = labeled_images(f"folder:{root}").source
    labels = np.concatenate([y.numpy() for _, y in data.pipelines.evaluation_batches(
        source, 5, 16, bad_images=BadImages(stream=open(os.devnull, "w")))])
    assert sorted(labels.tolist()) == [0] * 6 + [1] * 6
    # Past the limit the stream stops with a clear error.
    with pytest.raises(Exception, match="unreadable.*max_bad_fraction"):
        for _ in data.pretraining_dataset(
                f"folder:{root}", 4, 16, "aim", max_bad_fraction=0.0,
                bad_images=BadImages(0.0, stream=open(os.devnull, "w"))).take(40):
            pass
    for i in range(6):  # every image of a class unreadable: 4 in a row fail
        (tmp_path / "data" / "a" / ("deeper" if i % 2 else "") / f"{i}.jpg").write_bytes(b"x")
    with pytest.raises(Exception, match="images in a row are unreadable"):
        for _ in data.pretraining_dataset(f"folder:{root}", 4, 16, "aim",
                                          max_bad_fraction=1.0).take(40):
            pass
    assert isinstance(BadImagesError("x"), RuntimeError)


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
