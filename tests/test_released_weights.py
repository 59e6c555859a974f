"""from_preset with released weights: download from a local server, verify,
convert, cache, resume, offline use."""

import hashlib
import os
import shutil

import keras
import keras_hub
import numpy as np
import pytest

import keras_aim
from keras_aim.loading import preset_cache
from keras_aim.loading.download import ChecksumError, DownloadError, OfflineError
from keras_aim.models.aim.aim_presets import AIM_PRESETS, register_preset
from tests.conftest import fixture_path, to_numpy
from tests.tiny_release import FILES, NAME

def cache_entries():
    home = preset_cache.keras_aim_home()
    found = []
    for root, _, files in os.walk(home):
        found += [os.path.relpath(os.path.join(root, f), home) for f in files]
    return sorted(f for f in found if not f.startswith(".locks"))  # writers' locks


def assert_reference_logits(classifier, reference):
    np.testing.assert_allclose(
        to_numpy(classifier(reference["images_nhwc"])), reference["logits"], atol=1e-4
    )


def test_first_load_downloads_converts_caches_second_is_offline(
    release, reference, monkeypatch
):
    classifier = keras_aim.AIMImageClassifier.from_preset(NAME, probe_layers="last")
    assert_reference_logits(classifier, reference)
    assert [r[0] for r in release.requests] == [
        FILES["backbone"][0], FILES["head_last"][0]
    ]
    cached = cache_entries()
    preset_dir = os.path.join("presets", NAME)
    for name in ("config.json", "metadata.json", "model.weights.h5",
                 "preprocessor.json", "heads/probe_last.weights.h5"):
        assert os.path.join(preset_dir, name) in cached
    assert not [f for f in cached if ".part" in f or ".tmp" in f]

    count = len(release.requests)
    monkeypatch.setenv("KERAS_AIM_OFFLINE", "1")
    again = keras_aim.AIMImageClassifier.from_preset(NAME, probe_layers="last")
    assert_reference_logits(again, reference)
    backbone = keras_aim.AIMBackbone.from_preset(NAME)
    np.testing.assert_allclose(
        to_numpy(backbone(reference["images_nhwc"])),
        reference["final_normed_tokens"],
        atol=1e-4,
    )
    assert len(release.requests) == count  # no connection opened

    # The cache is a standard keras-hub preset directory.
    cache_dir = preset_cache.preset_cache_dir(NAME)
    restored = keras_hub.models.Backbone.from_preset(cache_dir)
    assert isinstance(restored, keras_aim.AIMBackbone)


def test_corrupted_download_fails_with_checksum_error_and_caches_nothing(release):
    served = FILES["backbone"][0]
    data = bytearray(release.files[served])
    data[5000] ^= 0xFF
    release.files[served] = bytes(data)
    expected = AIM_PRESETS[NAME]["files"]["backbone"][1]
    with pytest.raises(ChecksumError) as info:
        keras_aim.AIMBackbone.from_preset(NAME)
    message = str(info.value)
    assert served in message and expected in message
    assert hashlib.sha256(bytes(data)).hexdigest() in message
    assert cache_entries() == []


def test_download_cut_in_the_middle_resumes(release, reference):
    served = FILES["backbone"][0]
    release.cut_next[served] = 300_000
    backbone = keras_aim.AIMBackbone.from_preset(NAME)
    ranges = [r for name, r in release.requests if name == served]
    assert ranges == [None, "bytes=300000-"]
    np.testing.assert_allclose(
        to_numpy(backbone(reference["images_nhwc"])),
        reference["final_normed_tokens"],
        atol=1e-4,
    )


def test_partial_file_from_an_earlier_run_resumes(release):
    served = FILES["backbone"][0]
    partial = preset_cache.downloaded_path(served) + ".part"
    os.makedirs(os.path.dirname(partial))
    with open(partial, "wb") as handle:
        handle.write(release.files[served][:123_456])
    keras_aim.AIMBackbone.from_preset(NAME)
    assert release.requests == [(served, "bytes=123456-")]


def test_offline_with_empty_cache_names_the_missing_file(release, monkeypatch):
    monkeypatch.setenv("KERAS_AIM_OFFLINE", "1")
    served = FILES["backbone"][0]
    with pytest.raises(OfflineError) as info:
        keras_aim.AIMBackbone.from_preset(NAME)
    message = str(info.value)
    assert served in message
    assert preset_cache.downloaded_path(served) in message
    assert release.requests == []


def test_missing_remote_file_is_a_download_error(release):
    del release.files[FILES["backbone"][0]]
    with pytest.raises(DownloadError, match="HTTP 404.*KERAS_AIM_BASE_URL"):
        keras_aim.AIMBackbone.from_preset(NAME)
    assert cache_entries() == []


def test_directory_of_released_files(release, reference, tmp_path, monkeypatch):
    folder = tmp_path / "released"
    folder.mkdir()
    for served, fixture in FILES.values():
        shutil.copy(fixture_path(fixture), folder / served)
    monkeypatch.setenv("KERAS_AIM_BASE_URL", "http://127.0.0.1:9/")  # unused
    classifier = keras_aim.AIMImageClassifier.from_preset(str(folder))
    assert_reference_logits(classifier, reference)
    assert release.requests == []


def test_directory_with_unknown_pth_files_is_refused(release, tmp_path):
    (tmp_path / "mystery.pth").write_bytes(b"x")
    with pytest.raises(ValueError, match="no released AIM backbone file"):
        keras_aim.AIMBackbone.from_preset(str(tmp_path))


def test_bfloat16_converts_and_caches_in_bfloat16(release, reference):
    backbone = keras_aim.AIMBackbone.from_preset(NAME, dtype="bfloat16")
    assert backbone.blocks[0].mlp.fc1.kernel.dtype == "bfloat16"
    assert os.path.isdir(preset_cache.preset_cache_dir(NAME, "bfloat16"))
    tokens = to_numpy(keras.ops.cast(backbone(reference["images_nhwc"]), "float32"))
    np.testing.assert_allclose(tokens, reference["final_normed_tokens"], atol=0.1)


def test_float32_cache_serves_bfloat16(release):
    keras_aim.AIMBackbone.from_preset(NAME)
    count = len(release.requests)
    backbone = keras_aim.AIMBackbone.from_preset(NAME, dtype="bfloat16")
    assert backbone.blocks[0].attn.qkv.kernel.dtype == "bfloat16"
    assert len(release.requests) == count
    assert not os.path.exists(preset_cache.preset_cache_dir(NAME, "bfloat16"))


def test_probe_layers_without_released_head_is_refused(release):
    with pytest.raises(ValueError, match="No released head averages"):
        keras_aim.AIMImageClassifier.from_preset(NAME, probe_layers=(0, 1))


def test_new_num_classes_builds_untrained_probe_without_head(release):
    classifier = keras_aim.AIMImageClassifier.from_preset(
        NAME, num_classes=3, probe_layers=(0, 1)
    )
    assert classifier.num_classes == 3
    assert [r[0] for r in release.requests] == [FILES["backbone"][0]]


def test_server_errors_are_retried_then_reported(release, monkeypatch):
    from keras_aim.loading import download

    monkeypatch.setattr(download.time, "sleep", lambda seconds: None)
    served = FILES["backbone"][0]
    release.cut_next[served] = 0  # first response: headers, then nothing
    keras_aim.AIMBackbone.from_preset(NAME)  # second attempt succeeds
    assert [r for r in release.requests if r[0] == served] == [(served, None)] * 2

    monkeypatch.setattr(
        download, "_fetch_into",
        lambda *args: (_ for _ in ()).throw(ConnectionResetError("reset")),
    )
    target = preset_cache.downloaded_path("x.pth")
    with pytest.raises(DownloadError, match="after 5 attempts .*reset.*no network") as info:
        download.download_file("http://127.0.0.1:9/x.pth", target, "0" * 8)
    assert ".part" not in str(info.value)  # nothing was received, nothing kept
    with open(target + ".part", "wb") as handle:
        handle.write(b"12345")
    with pytest.raises(DownloadError, match="The 5 bytes received so far are kept in "
                       f".*x.pth.part; run again to resume"):
        download.download_file("http://127.0.0.1:9/x.pth", target, "0" * 8)


def test_no_network_says_how_to_work_offline(release, monkeypatch):
    """No connection at all: the error says so and how to go on without a
    network; following its advice works."""
    from keras_aim.loading import download

    monkeypatch.setattr(download.time, "sleep", lambda seconds: None)
    monkeypatch.setenv("KERAS_AIM_BASE_URL", "http://127.0.0.1:9/")  # closed port
    served = FILES["backbone"][0]
    target = preset_cache.downloaded_path(served)
    with pytest.raises(DownloadError) as info:
        keras_aim.AIMBackbone.from_preset(NAME)
    message = str(info.value)
    assert "no network" in message and "KERAS_AIM_OFFLINE=1" in message
    assert f"put it at {target} " in message and ".part" not in message
    os.makedirs(os.path.dirname(target), exist_ok=True)
    shutil.copy(fixture_path("backbone.pth"), target)
    monkeypatch.setenv("KERAS_AIM_OFFLINE", "1")
    keras_aim.AIMBackbone.from_preset(NAME)


def other_valid_checkpoint(path):
    """A well-formed checkpoint with the released keys and shapes but other
    values (every zip check passes; only the checksum can tell)."""
    import zipfile

    with zipfile.ZipFile(fixture_path("backbone.pth")) as source, \
            zipfile.ZipFile(path, "w") as target:
        for info in source.infolist():
            data = source.read(info)
            if "/data/" in info.filename:
                data = bytes(len(data))  # zeros
            target.writestr(info, data)


def test_file_put_into_downloads_by_hand_is_verified(release):
    """The offline advice sends users to downloads/: a wrong file there is
    refused (and kept) before it is converted, and nothing is cached."""
    served = FILES["backbone"][0]
    target = preset_cache.downloaded_path(served)
    os.makedirs(os.path.dirname(target))
    other_valid_checkpoint(target)
    with pytest.raises(ChecksumError) as info:
        keras_aim.AIMBackbone.from_preset(NAME)
    message = str(info.value)
    assert target in message and "delete it to download it again" in message
    assert AIM_PRESETS[NAME]["files"]["backbone"][1] in message  # the full digest
    assert cache_entries() == [os.path.join("downloads", served)]
    assert release.requests == []
    os.remove(target)  # as the message says: then it is downloaded again
    keras_aim.AIMBackbone.from_preset(NAME)
    assert [r[0] for r in release.requests] == [served]


def test_checksums_must_be_sha256_digests_or_prefixes():
    from keras_aim.loading.download import check_digest, digest_strength

    assert check_digest("0D6F6B8F") == "0d6f6b8f"
    assert digest_strength("0d6f6b8f") == "SHA-256 prefix (32 bits)"
    assert digest_strength("a" * 64) == "full SHA-256"
    for bad in ("0d6f", "xyz12345", "a" * 65):
        with pytest.raises(ValueError, match="not a SHA-256 digest"):
            check_digest(bad)
    with pytest.raises(ValueError, match="not a SHA-256 digest"):
        register_preset("bad", {}, {"backbone": ("b.pth", "abc")}, (), ())


def test_checksums_check_every_digit_given(tmp_path):
    """A full digest pins the whole file: a file that matches only its
    first 8 hex digits is refused; a prefix checks what it has."""
    from keras_aim.loading.download import sha256_file, verify_sha256

    path = tmp_path / "file.bin"
    path.write_bytes(b"released bytes")
    actual = sha256_file(str(path))
    verify_sha256(str(path), actual, "x", fix="")
    verify_sha256(str(path), actual[:8], "x", fix="")
    other = actual[:8] + ("0" if actual[8] != "0" else "1") + actual[9:]
    with pytest.raises(ChecksumError, match=f"expected SHA-256 {other}, got {actual}"):
        verify_sha256(str(path), other, "x", fix="")
    assert path.exists()  # a file on disk is never deleted by a check with a fix
