"""The keras-aim command line."""

import numpy as np
import pytest
from PIL import Image

import keras_aim
from keras_aim import cli
from keras_aim.data.images import read_image
from tests.tiny_release import FILES, NAME


def test_info_lists_every_preset(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    for name, params in [
        ("aim_600m", "680,535,552"),
        ("aim_1b", "1,209,370,624"),
        ("aim_3b", "2,720,025,600"),
        ("aim_7b", "6,445,404,160"),
    ]:
        line = next(l for l in out.splitlines() if l.startswith(name))
        assert params in line
    assert "84.0 / 82.4" in out
    # Only 8-hex prefixes are recorded for Apple's files: said, not hidden.
    assert ("Checksums of aim_600m, aim_1b, aim_3b, aim_7b: SHA-256 prefix "
            "(32 bits) (all that is recorded") in out


def test_no_command_prints_help_and_fails(capsys):
    assert cli.main([]) == 2
    assert "info" in capsys.readouterr().out


def test_unknown_command_is_an_error(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["frobnicate"])
    assert info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def write_images(folder):
    """Two real image files (JPEG, PNG) and a corrupt one."""
    rng = np.random.RandomState(0)
    jpeg, png, corrupt = folder / "photo.jpg", folder / "drawing.png", folder / "broken.jpg"
    Image.fromarray(rng.randint(0, 256, (48, 64, 3), dtype=np.uint8)).save(jpeg)
    Image.fromarray(rng.randint(0, 256, (40, 30, 4), dtype=np.uint8)).save(png)
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    return str(jpeg), str(png), str(corrupt)


def test_classify_prints_top_k_and_reports_bad_files(release, tmp_path, capsys):
    jpeg, png, corrupt = write_images(tmp_path)
    code = cli.main(["classify", jpeg, corrupt, png, "--preset", NAME,
                     "--probe", "last", "--top-k", "3"])
    captured = capsys.readouterr()
    assert code == 1  # one file failed, the others were classified
    assert f"error: {corrupt}: not a readable image" in captured.err
    lines = captured.out.splitlines()
    assert lines[0] == jpeg and lines[4] == png
    scores = [float(line.split()[-1]) for line in lines[1:4]]
    assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1.0001
    assert lines[1].strip().startswith("1. class ")
    # Same top class as the classifier on the same preprocessed image.
    classifier = keras_aim.AIMImageClassifier.from_preset(NAME, probe_layers="last")
    image = read_image(jpeg)
    logits = classifier.predict(image[None], verbose=0)
    assert lines[1].split()[2] == str(int(np.argmax(logits)))


def test_classify_all_files_bad_fails(release, tmp_path, capsys):
    bad = tmp_path / "x.png"
    bad.write_text("no")
    assert cli.main(["classify", str(bad), "--preset", NAME]) == 1
    assert "not a readable image" in capsys.readouterr().err


def test_download_then_info_shows_cache(release, capsys):
    assert cli.main(["download", NAME]) == 0
    out = capsys.readouterr().out
    assert "float32" in out and "heads: best/last" in out
    assert cli.main(["info"]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith(NAME))
    assert "heads: best/last" in line


def test_download_files_only(release, capsys):
    assert cli.main(["download", NAME, "--files-only", "--probe", "none"]) == 0
    path = capsys.readouterr().out.strip()
    assert path.endswith(FILES["backbone"][0])


def test_features_command_at_two_sizes(release, tmp_path, capsys):
    jpeg, png, _ = write_images(tmp_path)
    for size, tokens in ((32, 16), (48, 36)):
        out = tmp_path / f"feats{size}.npz"
        assert cli.main(["features", jpeg, png, "--preset", NAME, "--out", str(out),
                         "--blocks", "2,3", "--pooling", "none",
                         "--image-size", str(size)]) == 0
        saved = np.load(out)
        assert saved["features"].shape == (2, tokens, 64)
        assert list(saved["paths"]) == [jpeg, png]
    pooled = tmp_path / "pooled.npz"
    assert cli.main(["features", jpeg, "--preset", NAME, "--out", str(pooled),
                     "--image-size", "32"]) == 0
    assert np.load(pooled)["features"].shape == (1, 64)
    # Not a multiple of the patch: the foundation's error, as one line.
    assert cli.main(["features", jpeg, "--preset", NAME, "--out", str(pooled),
                     "--image-size", "36"]) == 1
    err = capsys.readouterr().err
    assert "nearest valid sizes: 32 or 40" in err and "Traceback" not in err


def test_features_output_is_checked_before_any_work(tmp_path, capsys, monkeypatch):
    """A bad --out fails at once (no model loaded, no image read) and
    leaves nothing behind; it used to fail after computing everything."""
    from keras_aim.models.aim import aim_backbone

    monkeypatch.setattr(aim_backbone.AIMBackbone, "from_preset",
                        classmethod(lambda *a, **k: pytest.fail("loaded a model")))
    (tmp_path / "folder").mkdir()
    for out, problem in ((tmp_path / "x", "name an .npz file, e.g. "),
                         (tmp_path / "folder", "name an .npz file"),
                         (tmp_path / "folder.npz", None)):
        if problem is None:
            (tmp_path / "folder.npz").mkdir()
            problem = "is a folder; name an .npz file inside it"
        assert cli.main(["features", "any.jpg", "--out", str(out)]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"error: --out {out}") and problem in err, err
        assert len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "folder.npz"]
    with pytest.raises(SystemExit) as info:
        cli.main(["features", "any.jpg", "--out", str(tmp_path / "f.npz"), "--blocks", "2,x"])
    assert info.value.code == 2
    assert "comma-separated block indices like 14,15; got '2,x'" in capsys.readouterr().err


def test_every_command_error_is_one_line_with_exit_code_1(tmp_path, capsys, monkeypatch):
    """Errors of any type, from any command: `error: ...`, exit code 1, and
    the traceback only with --verbose."""
    import keras_aim.export.saved_model

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "ro" / "1"))

    # A read-only --out (root ignores the mode, so the refusal is simulated).
    monkeypatch.setattr(keras_aim.export.saved_model, "resolve_version", refuse)
    command = ["export", "--model", "m.keras", "--out", str(tmp_path / "ro")]
    assert cli.main(command) == 1
    err = capsys.readouterr().err
    assert err == f"error: [Errno 13] Permission denied: '{tmp_path / 'ro' / '1'}'\n"
    assert cli.main(["--verbose", *command]) == 1
    assert "Traceback" in capsys.readouterr().err
    assert cli.main(["features", "a.jpg", "--out", str(tmp_path / "f.npz"),
                     "--preset", "aim_60m"]) == 1
    assert capsys.readouterr().err.startswith("error: Unknown preset 'aim_60m'.")


@pytest.mark.parametrize(
    "options,problem",
    [
        (["--model", "m.keras", "--backbone"], "--backbone exports a preset's trunk"),
        (["--model", "m.keras", "--probe", "best"], "not with --model"),
        (["--preset", "aim_600m", "--backbone", "--probe", "best"], "not with --backbone"),
        (["--preset", "aim_600m", "--backbone", "--top-k", "3"], "--top-k applies to classifiers"),
    ],
)
def test_contradictory_export_options_are_refused(options, problem, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["export", *options, "--out", str(tmp_path / "served")])
    assert info.value.code == 2
    assert problem in capsys.readouterr().err
    assert not (tmp_path / "served").exists()
