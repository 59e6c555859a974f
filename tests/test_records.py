"""Record files: `keras-aim prepare-data` and `--data records:DIR`."""

import functools
import json
import os
import signal
import time

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from keras_aim import cli
from keras_aim.data import records
from keras_aim.data.pipelines import BadImages, pretraining_dataset
from keras_aim.data.random_access import RECORDS_INDEX
from keras_aim.data.sources import labeled_images


def _image_folder(root, corrupt: bool = False):
    """3 classes of JPEG and PNG files of several sizes, one class with a
    nested sub-folder; with `corrupt`, one file that is not an image."""
    rng = np.random.RandomState(0)
    layout = {
        "ant": ["0.jpg", "1.png", "2.jpg"],
        "bee": ["a.png", "deeper/b.jpg", "deeper/c.png"],
        "cow": ["x.jpg", "y.jpeg"],
    }
    for name, files in layout.items():
        for file in files:
            path = root / name / file
            path.parent.mkdir(parents=True, exist_ok=True)
            h, w = rng.randint(18, 40, size=2)
            Image.fromarray(rng.randint(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    if corrupt:
        (root / "bee" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return _image_folder(tmp_path_factory.mktemp("images"))


def _examples(source):
    """`(image bytes, label, name)` of every record of a RecordSource."""
    found = []
    for i in range(len(source)):
        feature = tf.train.Example.FromString(source.reader[i]).features.feature
        name = feature["name"].bytes_list.value if "name" in feature else [b""]
        found.append((feature["image"].bytes_list.value[0],
                      feature["label"].int64_list.value[0], name[0].decode()))
    return found


def _batches(spec_or_source, count, **options):
    options = {"batch_size": 4, "image_size": 16, "seed": 7, **options}
    return [b.numpy() for b in pretraining_dataset(spec_or_source, **options).take(count)]


def test_records_hold_the_folders_files_labels_and_order(folder, tmp_path):
    out = tmp_path / "records"
    index = records.write_records(f"folder:{folder}", str(out), shards=3)
    assert index["count"] == 8 and len(index["files"]) == 3 and index["path"] == str(out)
    assert sorted(os.listdir(out)) == [
        "images-00000-of-00003.array_record", "images-00001-of-00003.array_record",
        "images-00002-of-00003.array_record", RECORDS_INDEX]
    stored = labeled_images(f"records:{out}")
    listed = labeled_images(f"folder:{folder}")
    assert stored.class_names == listed.class_names == ["ant", "bee", "cow"]
    assert len(stored) == len(listed) == 8
    # Listing order, the files' bytes unchanged, their labels and names.
    expected = [(open(p, "rb").read(), label, os.path.relpath(p, folder))
                for p, label in zip(listed.source.paths, listed.source.labels)]
    assert _examples(stored.source) == expected
    assert "bee/deeper/b.jpg" in [name for _, _, name in expected]
    assert stored.fingerprint == f"records:{listed.fingerprint.removeprefix('folder:')}"
    # Default shards: by bytes (all 8 images fit one file).
    one = records.write_records(f"folder:{folder}", str(tmp_path / "one"))
    assert one["files"] == ["images-00000-of-00001.array_record"]
    two = records.write_records(f"folder:{folder}", str(tmp_path / "two"), shard_bytes=1)
    assert len(two["files"]) == 8 and two["fingerprint"] == one["fingerprint"]


def test_records_stream_the_folders_batches_and_resume_exactly(folder, tmp_path):
    out = tmp_path / "records"
    records.write_records(f"folder:{folder}", str(out), shards=2)
    # 5 batches of 4 from 8 images: past a full pass, into the next order.
    from_records = _batches(f"records:{out}", 5)
    from_folder = _batches(f"folder:{folder}", 5)
    for a, b in zip(from_records, from_folder, strict=True):
        np.testing.assert_array_equal(a, b)
    assert from_records[0].shape == (4, 16, 16, 3) and from_records[0].std() > 0.1
    resumed = _batches(f"records:{out}", 2, start_step=3)
    np.testing.assert_array_equal(resumed[0], from_records[3])
    np.testing.assert_array_equal(resumed[1], from_records[4])
    # A process's part of each global batch reads only its images.
    part = _batches(f"records:{out}", 2, shard=(1, 2))
    np.testing.assert_array_equal(part[1], from_records[1][2:])


def test_a_corrupt_image_in_the_records_is_skipped_counted_and_named(tmp_path):
    source = _image_folder(tmp_path / "images", corrupt=True)
    out = tmp_path / "records"
    index = records.write_records(f"folder:{source}", str(out))
    assert index["count"] == 9 and index["skipped"] == []  # bytes kept as they are
    bad = BadImages(max_fraction=1.0)
    batches = _batches(f"records:{out}", 3, batch_size=3, bad_images=bad)  # one pass
    assert len(batches) == 3 and all(np.isfinite(b).all() for b in batches)
    assert bad.count >= 1  # met once per pass (the stream reads ahead)
    assert bad.names[0].startswith("bee/broken.jpg (records ") and "record " in bad.names[0]
    # The folder's stream skips the same image and gives the same pixels.
    folder_bad = BadImages(max_fraction=1.0)
    for a, b in zip(batches, _batches(f"folder:{source}", 3, batch_size=3,
                                      bad_images=folder_bad)):
        np.testing.assert_array_equal(a, b)
    assert folder_bad.count >= 1


def test_an_unreadable_file_is_left_out_and_reported(folder, tmp_path, monkeypatch):
    opened = open

    def failing_open(path, *args, **kwargs):
        if str(path).endswith("1.png"):
            raise PermissionError(13, "Permission denied")
        return opened(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", failing_open)
    messages = []
    stream = type("Stream", (), {"write": lambda self, s: messages.append(s),
                                 "flush": lambda self: None})()
    index = records.write_records(f"folder:{folder}", str(tmp_path / "out"), stream=stream)
    monkeypatch.undo()
    assert index["count"] == 7
    assert index["skipped"] == ["ant/1.png (cannot be read: Permission denied)"]
    assert "warning: skipping ant/1.png" in "".join(messages)
    clean = records.write_records(f"folder:{folder}", str(tmp_path / "clean"))
    assert index["fingerprint"] != clean["fingerprint"]
    assert "1 unreadable file(s) left out" in records.summary(index)


def test_an_existing_output_is_refused_and_only_records_are_overwritten(folder, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    records.write_records(f"folder:{folder}", str(out))  # an empty folder is fine
    with pytest.raises(ValueError, match="is not empty .* pass --overwrite"):
        records.write_records(f"folder:{folder}", str(out))
    index = records.write_records(f"folder:{folder}", str(out), shards=2, overwrite=True)
    assert len(index["files"]) == 2
    assert sorted(os.listdir(out))[:2] == ["images-00000-of-00002.array_record",
                                           "images-00001-of-00002.array_record"]
    assert len(os.listdir(out)) == 3  # the old single file is gone
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a keras_aim records folder .*notes.txt"):
        records.write_records(f"folder:{folder}", str(other), overwrite=True)
    assert os.listdir(other) == ["notes.txt"]
    with pytest.raises(ValueError, match="lies inside the image folder"):
        records.write_records(f"folder:{folder}", str(folder / "records"))
    with pytest.raises(ValueError, match="is a file"):
        records.write_records(f"folder:{folder}", str(other / "notes.txt"))
    with pytest.raises(ValueError, match="digits live in memory"):
        records.write_records("digits", str(tmp_path / "digits"))
    assert not (tmp_path / "digits").exists() and not (folder / "records").exists()


@pytest.mark.parametrize("interrupt", ["error", "ctrl-c", "sigterm"])
def test_an_interrupted_write_leaves_no_folder(folder, tmp_path, monkeypatch, interrupt):
    example = records._example
    written = []

    def failing(*args):
        written.append(1)
        if len(written) == 4:
            if interrupt == "sigterm":
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(10)  # the handler raises at once
            raise KeyboardInterrupt() if interrupt == "ctrl-c" else OSError("disk full")
        return example(*args)

    previous = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(records, "_example", failing)
    with pytest.raises(KeyboardInterrupt if interrupt != "error" else OSError):
        records.write_records(f"folder:{folder}", str(tmp_path / "out"), shard_bytes=1)
    assert os.listdir(tmp_path) == []  # no folder, no hidden staging folder
    assert signal.getsignal(signal.SIGTERM) == previous
    # A failed overwrite keeps the previous records.
    monkeypatch.setattr(records, "_example", example)
    records.write_records(f"folder:{folder}", str(tmp_path / "out"))
    monkeypatch.setattr(records, "_example", failing)
    written.clear()
    with pytest.raises(KeyboardInterrupt if interrupt != "error" else OSError):
        records.write_records(f"folder:{folder}", str(tmp_path / "out"), overwrite=True)
    assert os.listdir(tmp_path) == ["out"]
    assert len(labeled_images(f"records:{tmp_path / 'out'}")) == 8


def test_missing_or_incomplete_records_are_refused_clearly(folder, tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no keras_aim record files.*prepare-data"):
        labeled_images(f"records:{tmp_path}")
    out = tmp_path / "records"
    records.write_records(f"folder:{folder}", str(out), shards=2)
    first, second = sorted(f for f in os.listdir(out) if f.endswith(".array_record"))
    data = (out / second).read_bytes()
    (out / second).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"record file .*{second} cannot be read"):
        labeled_images(f"records:{out}")
    (out / second).unlink()
    with pytest.raises(FileNotFoundError, match=f"{second} listed in .* missing"):
        labeled_images(f"records:{out}")
    (out / second).write_bytes(data)
    index = json.loads((out / RECORDS_INDEX).read_text())
    (out / RECORDS_INDEX).write_text(json.dumps({**index, "count": 9}))
    with pytest.raises(ValueError, match="hold 8 records but .* says 9; the folder is incomplete"):
        labeled_images(f"records:{out}")
    (out / RECORDS_INDEX).write_text(json.dumps(index)[:-20])
    with pytest.raises(ValueError, match="not readable JSON"):
        labeled_images(f"records:{out}")


def test_prepare_data_command(folder, tmp_path, capsys):
    out = tmp_path / "records"
    argv = ["prepare-data", "--data", f"folder:{folder}", "--out", str(out), "--shards", "2"]
    assert cli.main(argv) == 0
    line = capsys.readouterr().out.strip()
    assert line == (f"{out}: 8 images of 3 classes in 2 record files, "
                    f"{records._size(json.loads((out / RECORDS_INDEX).read_text())['bytes'])} "
                    f"of image bytes; train on it with --data records:{out}")
    assert len(labeled_images(f"records:{out}")) == 8
    assert cli.main(argv) == 1
    assert "error: --out" in capsys.readouterr().err
    assert cli.main(argv + ["--overwrite"]) == 0
    assert cli.main(["prepare-data", "--data", f"folder:{tmp_path / 'none'}",
                     "--out", str(tmp_path / "x")]) == 1
    assert "does not exist" in capsys.readouterr().err and not (tmp_path / "x").exists()
    with pytest.raises(SystemExit):
        cli.main(["prepare-data", "--data", f"folder:{folder}", "--out", "x", "--shards", "0"])


@functools.cache
def _tiny_tfds_builder():
    import tensorflow_datasets as tfds

    class KerasAimTinyRecordImages(tfds.core.GeneratorBasedBuilder):
        """Seven 20x24 RGB images of 3 classes, generated locally."""

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
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            rng = np.random.RandomState(0)
            for i in range(7):
                yield i, {"image": rng.randint(0, 256, (20, 24, 3)).astype(np.uint8),
                          "label": i % 3}

    return KerasAimTinyRecordImages


def _prepared_tfds(data_dir, file_format):
    builder = _tiny_tfds_builder()(data_dir=str(data_dir), file_format=file_format)
    builder.download_and_prepare()
    return builder


def test_a_tfds_split_streams_and_prepares_as_records(tmp_path, capsys):
    data_dir = tmp_path / "tfds"
    name = _prepared_tfds(data_dir, "array_record").name
    split = labeled_images(f"tfds:{name}", tfds_data_dir=str(data_dir))
    assert split.class_names == ["a", "b", "c"] and len(split) == 7
    direct = _batches(split.source, 3, batch_size=3)
    assert direct[0].shape == (3, 16, 16, 3) and direct[0].std() > 0.1
    np.testing.assert_array_equal(_batches(split.source, 1, batch_size=3, start_step=2)[0],
                                  direct[2])

    out = tmp_path / "records"
    assert cli.main(["prepare-data", "--data", f"tfds:{name}:train", "--out", str(out),
                     "--tfds-data-dir", str(data_dir)]) == 0
    assert "7 images of 3 classes in 1 record file" in capsys.readouterr().out
    stored = labeled_images(f"records:{out}")
    assert stored.class_names == ["a", "b", "c"]
    tfds_examples = _examples(split.source)
    assert [(d, l) for d, l, _ in _examples(stored.source)] == [(d, l) for d, l, _ in tfds_examples]
    assert sorted(l for _, l, _ in tfds_examples) == [0, 0, 0, 1, 1, 2, 2]
    assert stored.fingerprint == f"records:tfds:{name}:train:1.0.0:7"
    for a, b in zip(_batches(f"records:{out}", 3, batch_size=3), direct, strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_tfds_split_stored_as_tfrecord_prepares_as_records(tmp_path):
    import tensorflow_datasets as tfds

    data_dir = tmp_path / "tfds"
    builder = _prepared_tfds(data_dir, "tfrecord")
    with pytest.raises(ValueError, match="stored as tfrecord.*prepare-data --data tfds:"):
        labeled_images(f"tfds:{builder.name}", tfds_data_dir=str(data_dir))
    index = records.write_records(f"tfds:{builder.name}", str(tmp_path / "records"),
                                  tfds_data_dir=str(data_dir))
    assert index["count"] == 7 and index["class_names"] == ["a", "b", "c"]
    stored = labeled_images(f"records:{tmp_path / 'records'}")
    expected = [(e["image"], e["label"]) for e in builder.as_dataset(
        "train", decoders={"image": tfds.decode.SkipDecoding()}).as_numpy_iterator()]
    assert [(d, l) for d, l, _ in _examples(stored.source)] == expected
    with pytest.raises(ValueError, match="has no split 'test'"):
        records.write_records(f"tfds:{builder.name}:test", str(tmp_path / "x"),
                              tfds_data_dir=str(data_dir))
