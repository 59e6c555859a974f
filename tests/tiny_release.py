"""The tiny reference model registered as a released preset and served from
127.0.0.1, for download/cache/CLI tests."""

import hashlib

from keras_aim.models.aim.aim_presets import AIM_PRESETS, register_preset
from tests.conftest import TINY_CONFIG, fixture_path
from tests.release_server import ReleaseServer

NAME = "aim_test_tiny"
FILES = {  # released role -> (served name, fixture)
    "backbone": ("tiny_attnprobe_backbone.pth", "backbone.pth"),
    "head_best": ("tiny_attnprobe_head_best_layers.pth", "head.pth"),
    "head_last": ("tiny_attnprobe_head_last_layers.pth", "head.pth"),
}


def served_files():
    return {served: open(fixture_path(f), "rb").read() for served, f in FILES.values()}


def serve_tiny_release(tmp_path, monkeypatch):
    """Registers the tiny preset, serves its files from 127.0.0.1 and points
    an empty cache at tmp_path; yields the server (the `release` fixture)."""
    files = served_files()
    monkeypatch.setitem(AIM_PRESETS, NAME, None)  # restored after the test
    register_tiny_preset(files)
    monkeypatch.setenv("KERAS_AIM_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("KERAS_AIM_OFFLINE", raising=False)
    with ReleaseServer(files) as server:
        monkeypatch.setenv("KERAS_AIM_BASE_URL", server.url)
        yield server


def register_tiny_preset(files=None) -> None:
    """Adds the tiny model to the preset table as `aim_test_tiny` (released
    files: `served_files()`)."""
    files = files or served_files()
    register_preset(
        NAME,
        TINY_CONFIG,
        {
            role: (served, hashlib.sha256(files[served]).hexdigest())
            for role, (served, _) in FILES.items()
        },
        best_probe_layers=(2, 3),
        last_probe_layers=(2, 3),
        num_classes=10,
    )
