"""`keras-aim` with AIMv2 presets: info, zero-shot, features, download,
classify (refused), export."""

import numpy as np
import pytest
from keras import ops

import keras_aim
from keras_aim import cli
from tests import aimv2_tiny
from tests.test_cli import write_images


@pytest.fixture
def hub(tmp_path, monkeypatch):
    yield from aimv2_tiny.serve_releases(tmp_path, monkeypatch)


def test_info_lists_both_families(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "AIM-v1" in out and "AIMv2" in out
    for name, params, reported in [
        ("aimv2_large_patch14_224 ", "309,197,824", "86.6"),
        ("aimv2_3b_patch14_448 ", "2,723,017,728", "89.5"),
        ("aimv2_large_patch14_native ", "308,935,680", "87.3"),
        ("aimv2_large_patch14_224_lit ", "436,680,193", "77.0 zero-shot"),
        ("aimv2_large_patch14_336_distilled ", "309,525,504", "- (distilled)"),
    ]:
        line = next(l for l in out.splitlines() if l.startswith(name))
        assert params in line and reported in line and "not yet recorded" in line
    assert "native" in next(l for l in out.splitlines() if l.startswith("aimv2_large_patch14_native"))
    assert sum(l.startswith("aimv2_") for l in out.splitlines()) == 16


def test_zero_shot_command_ranks_the_labels(hub, tmp_path, capsys):
    jpeg, png, corrupt = write_images(tmp_path)
    labels = ",".join(aimv2_tiny.REFERENCE_TEXTS)
    code = cli.main(["zero-shot", jpeg, corrupt, png, "--labels", labels,
                     "--preset", aimv2_tiny.LIT_PRESET, "--template", "{}", "--top-k", "2"])
    captured = capsys.readouterr()
    assert code == 1 and "not a readable image" in captured.err
    lines = captured.out.splitlines()
    assert lines[0] == jpeg and lines[3] == png
    # The same ranking as the classifier on the converter's image.
    lit = keras_aim.AIMv2LiT.from_preset(aimv2_tiny.LIT_PRESET)
    classifier = keras_aim.zero_shot_classifier(
        lit, aimv2_tiny.REFERENCE_TEXTS, ["{}"], aimv2_tiny.tiny_tokenizer()
    )
    image = keras_aim.AIMv2ImageConverter(image_size=(28, 28))(cli.read_image(jpeg))
    probs = ops.convert_to_numpy(ops.softmax(classifier(image[None]), axis=-1))[0]
    best = aimv2_tiny.REFERENCE_TEXTS[int(np.argmax(probs))]
    assert lines[1].split(". ", 1)[1].startswith(best)
    assert abs(float(lines[1].split()[-1]) - probs.max()) < 1e-3


def test_zero_shot_command_bad_labels_and_preset(hub, tmp_path, capsys):
    jpeg, _, _ = write_images(tmp_path)
    assert cli.main(["zero-shot", jpeg, "--labels", "a,,b", "--preset",
                     aimv2_tiny.LIT_PRESET]) == 1
    assert "non-empty and distinct" in capsys.readouterr().err
    assert cli.main(["zero-shot", jpeg, "--labels", "a,b", "--preset",
                     aimv2_tiny.FIXED_PRESET]) == 1
    assert "is a vision encoder" in capsys.readouterr().err


def test_features_of_an_aimv2_preset_and_resampling(hub, tmp_path, capsys):
    jpeg, png, _ = write_images(tmp_path)
    out = tmp_path / "f.npz"
    assert cli.main(["features", jpeg, png, "--preset", aimv2_tiny.FIXED_PRESET,
                     "--out", str(out), "--pooling", "none"]) == 0
    assert np.load(out)["features"].shape == (2, 16, 48)  # the preset's 28x28
    assert int(np.load(out)["image_size"]) == 28
    assert cli.main(["features", jpeg, "--preset", aimv2_tiny.FIXED_PRESET,
                     "--out", str(out), "--image-size", "42"]) == 1
    assert "learned position table for 28x28 images" in capsys.readouterr().err
    assert cli.main(["features", jpeg, "--preset", aimv2_tiny.FIXED_PRESET, "--out", str(out),
                     "--image-size", "42", "--resample-positions", "--blocks", "1,2"]) == 0
    assert np.load(out)["features"].shape == (1, 48)


def test_download_and_classify_refusal(hub, capsys):
    assert cli.main(["download", aimv2_tiny.LIT_PRESET, "--files-only"]) == 0
    paths = capsys.readouterr().out.split()
    assert [p.rsplit("/", 1)[1] for p in paths] == ["model.safetensors", "vocab.json", "merges.txt"]
    assert cli.main(["download", aimv2_tiny.FIXED_PRESET]) == 0
    assert "float32" in capsys.readouterr().out
    assert cli.main(["classify", "x.jpg", "--preset", "aimv2_large_patch14_224"]) == 1
    assert "no ImageNet heads for AIMv2" in capsys.readouterr().err


def test_export_command_of_the_lit_preset(hub, tmp_path, capsys):
    assert cli.main(["export", "--preset", aimv2_tiny.LIT_PRESET,
                     "--out", str(tmp_path / "serving")]) == 0
    out = capsys.readouterr().out
    assert "text_embedding" in out and "zero_shot_logits" in out
    assert (tmp_path / "serving" / "1" / "saved_model.pb").is_file()
