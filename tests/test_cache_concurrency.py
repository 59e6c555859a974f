"""The preset cache under concurrency: threads and processes loading one
uncached preset at once, processes killed while downloading or converting."""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import keras_aim
from keras_aim.loading import preset_cache
from keras_aim.models.aim.aim_presets import RELEASE_BASE_URL
from tests.conftest import once_in_jax_pass, to_numpy
from tests.tiny_release import FILES, NAME

ROOT = Path(__file__).resolve().parents[1]
LOADER = ROOT / "tests" / "load_tiny_preset.py"


def assert_nothing_partial():
    home = preset_cache.keras_aim_home()
    leftovers = [
        os.path.relpath(os.path.join(root, name), home)
        for root, folders, names in os.walk(home) for name in folders + names
        if ".part" in name or ".tmp" in name
    ]
    assert leftovers == []


def requests_for(release, role):
    return [r for r in release.requests if r[0] == FILES[role][0]]


def test_threads_share_one_download_and_one_conversion(release):
    release.seconds_per_chunk = 0.02
    filename, sha256 = keras_aim.AIM_PRESETS[NAME]["files"]["backbone"]
    writes, results, errors = [], [], []

    def write(staging, dtype):
        source = preset_cache.release_file(filename, sha256, RELEASE_BASE_URL, progress=False)
        writes.append(dtype)
        time.sleep(0.2)  # others arrive while this one converts
        shutil.copy(source, os.path.join(staging, "config.json"))

    def load():
        try:
            results.append(preset_cache.cached_preset(NAME, None, write))
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=load) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == [] and len(results) == 4 and len(set(results)) == 1
    assert writes == ["float32"]
    assert len(requests_for(release, "backbone")) == 1
    assert_nothing_partial()


def test_staging_folder_of_a_killed_conversion_is_removed_by_the_next_load(release, reference):
    presets = Path(preset_cache.keras_aim_home()) / "presets"
    stale = presets / f".{NAME}.tmp-killed"
    (stale / "assets").mkdir(parents=True)
    (stale / "config.json").write_text("{")  # what a killed conversion leaves
    classifier = keras_aim.AIMImageClassifier.from_preset(NAME, probe_layers="best")
    np.testing.assert_allclose(
        to_numpy(classifier(reference["images_nhwc"])), reference["logits"], atol=1e-4
    )
    assert not stale.exists()
    assert_nothing_partial()


def loader(release, *args, home=None):
    env = {
        **os.environ, "KERAS_BACKEND": "jax", "TF_CPP_MIN_LOG_LEVEL": "3",
        "KERAS_AIM_HOME": home or preset_cache.keras_aim_home(),
        "KERAS_AIM_BASE_URL": release.url,
    }
    return subprocess.Popen(
        [sys.executable, str(LOADER), *args], cwd=ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def end(processes) -> list[tuple[str, str]]:
    """Kills what still runs; returns each process's (stdout, stderr)."""
    for process in processes:
        if process.poll() is None:
            process.kill()
    return [process.communicate() for process in processes]


def wait_until(condition, processes, seconds, what):
    deadline = time.time() + seconds
    while not condition():
        if time.time() > deadline or any(p.poll() is not None for p in processes):
            errors = "\n".join(err[-2000:] for _, err in end(processes))
            pytest.fail(f"timed out waiting for {what}\n{errors}")
        time.sleep(0.02)


@pytest.mark.slow
@once_in_jax_pass
def test_processes_loading_one_uncached_preset_all_succeed(release, tmp_path, reference):
    release.seconds_per_chunk = 0.05  # a download takes ~1 s
    go = tmp_path / "go"
    processes = [loader(release, "--wait-for", str(go)) for _ in range(3)]
    try:
        wait_until(lambda: len(list(tmp_path.glob("go.ready.*"))) == 3, processes, 240,
                   "the loaders to start")
        go.touch()  # all three load at once
        outputs = [p.communicate(timeout=300) for p in processes]
    finally:
        end(processes)
    for process, (out, err) in zip(processes, outputs):
        assert process.returncode == 0, err[-3000:]
    logits = [json.loads(out.strip().splitlines()[-1])["logits"] for out, _ in outputs]
    assert logits[0] == logits[1] == logits[2]
    np.testing.assert_allclose(logits[0], reference["logits"], atol=1e-4)
    assert len(requests_for(release, "backbone")) == 1
    assert len(requests_for(release, "head_best")) == 1
    assert os.listdir(Path(preset_cache.keras_aim_home()) / "presets") == [NAME]
    assert_nothing_partial()


@pytest.mark.slow
@once_in_jax_pass
def test_processes_killed_while_downloading_or_converting_leave_nothing_in_the_way(
    release, reference
):
    home = Path(preset_cache.keras_aim_home())
    partial = home / "downloads" / (FILES["backbone"][0] + ".part")
    release.seconds_per_chunk = 1.0  # ~14 s for the backbone: killed in the middle
    downloading = loader(release)
    try:
        wait_until(lambda: partial.exists() and partial.stat().st_size > 0, [downloading],
                   240, "the download to start")
        downloading.send_signal(signal.SIGKILL)
    finally:
        end([downloading])
    release.seconds_per_chunk = 0.0
    classifier = keras_aim.AIMImageClassifier.from_preset(NAME, probe_layers="best")
    np.testing.assert_allclose(
        to_numpy(classifier(reference["images_nhwc"])), reference["logits"], atol=1e-4
    )
    ranges = [r for _, r in requests_for(release, "backbone")]
    assert ranges[0] is None and ranges[1].startswith("bytes=") and len(ranges) == 2
    assert_nothing_partial()

    # A conversion killed after writing its files, before the rename.
    shutil.rmtree(home / "presets")
    converting = loader(release, "--slow-conversion")
    staging = lambda: list((home / "presets").glob(f".{NAME}.tmp-*/preprocessor.json"))  # noqa: E731
    try:
        wait_until(lambda: (home / "presets").exists() and staging(), [converting], 240,
                   "the conversion")
        converting.send_signal(signal.SIGKILL)
    finally:
        end([converting])
    assert staging() and not (home / "presets" / NAME).exists()
    classifier = keras_aim.AIMImageClassifier.from_preset(NAME, probe_layers="best")
    np.testing.assert_allclose(
        to_numpy(classifier(reference["images_nhwc"])), reference["logits"], atol=1e-4
    )
    assert not staging()
    assert_nothing_partial()
