"""weights/: the manifest and model cards stay in sync with the presets, and
convert.py writes keras-hub presets ready for upload."""

import os
import sys
from pathlib import Path

import keras_hub
import numpy as np

from tests.conftest import to_numpy
from tests.tiny_release import NAME

WEIGHTS = Path(__file__).resolve().parents[1] / "weights"
sys.path.insert(0, str(WEIGHTS))

import build_manifest  # noqa: E402
import convert  # noqa: E402


def test_manifest_and_model_cards_are_current():
    for path, text in build_manifest.outputs().items():
        assert Path(path).read_text() == text, (
            f"{path} is stale: run python weights/build_manifest.py"
        )


def test_manifest_lists_released_files_with_urls():
    manifest = build_manifest.manifest()
    files = manifest["presets"]["aim_1b"]["files"]
    assert files["backbone"]["sha256_prefix"] == "d254ecd3"
    assert files["head_best"]["url"].endswith(
        "/aim_1b_5bimgs_attnprobe_head_best_layers.pth"
    )
    assert manifest["presets"]["aim_7b"]["trunk_params"] == 6_445_404_160


def test_convert_writes_loadable_presets_and_refuses_to_overwrite(
    release, reference, tmp_path, capsys
):
    out = tmp_path / "out"
    assert convert.main([NAME, str(out), "--probes", "last"]) == 0
    assert sorted(os.listdir(out)) == [NAME, f"{NAME}_probe_last"]
    classifier = keras_hub.models.ImageClassifier.from_preset(
        str(out / f"{NAME}_probe_last")
    )
    np.testing.assert_allclose(
        to_numpy(classifier(reference["images_nhwc"])), reference["logits"], atol=1e-4
    )
    backbone = keras_hub.models.Backbone.from_preset(str(out / NAME))
    np.testing.assert_allclose(
        to_numpy(backbone(reference["images_nhwc"])),
        reference["final_normed_tokens"],
        atol=1e-4,
    )
    assert os.path.exists(out / NAME / "preprocessor.json")

    before = sorted(os.listdir(out / NAME))
    assert convert.main([NAME, str(out), "--probes", "last"]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert sorted(os.listdir(out / NAME)) == before
    assert convert.main([NAME, str(out), "--probes", "last", "--overwrite"]) == 0
    assert sorted(os.listdir(out)) == [NAME, f"{NAME}_probe_last"]

