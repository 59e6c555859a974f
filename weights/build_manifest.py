"""Writes `weights/manifest.json` and `weights/model_cards/*.md` from
`keras_aim/models/aim/aim_presets.py`, and `weights/manifest_aimv2.json`
from `keras_aim/models/aimv2/aimv2_presets.py`: the single sources of the
released checkpoints.

    python weights/build_manifest.py           # rewrite the files
    python weights/build_manifest.py --check   # exit 1 if they are stale
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from keras_aim.models.aim.aim_presets import (
    AIM_PRESETS,
    RELEASE_BASE_URL,
    RELEASED_PRESETS as RELEASED,
)
from keras_aim.models.aimv2 import aimv2_presets
from keras_aim.utils.atomic_files import atomic_file

HERE = os.path.dirname(os.path.abspath(__file__))


def manifest() -> dict:
    presets = {}
    for name in RELEASED:
        entry = AIM_PRESETS[name]
        presets[name] = {
            "config": {k: list(v) if isinstance(v, tuple) else v
                       for k, v in entry["config"].items()},
            "trunk_params": entry["trunk_params"],
            "num_classes": entry["num_classes"],
            "best_probe_layers": list(entry["best_probe_layers"]),
            "last_probe_layers": list(entry["last_probe_layers"]),
            "pretraining_images": entry["pretraining_images"],
            "imagenet_top1_reported": entry["imagenet_top1"],
            "files": {
                role: {"name": filename, "url": RELEASE_BASE_URL + filename,
                       # A full digest where one is recorded, else its prefix.
                       ("sha256" if len(sha) == 64 else "sha256_prefix"): sha}
                for role, (filename, sha) in entry["files"].items()
            },
        }
    return {"source": "Apple AIM-v1 release", "base_url": RELEASE_BASE_URL,
            "presets": presets}


def manifest_aimv2() -> dict:
    """The AIMv2 releases: Hub repository, pinned revision, file URLs, and
    the digest and size once recorded (`null` until then)."""
    presets = {}
    for name, entry in aimv2_presets.AIMV2_PRESETS.items():
        files = [aimv2_presets.CHECKPOINT_FILENAME, *entry.get("tokenizer_files", ())]
        presets[name] = {
            "kind": entry["kind"],
            "repo_id": entry["repo_id"],
            "revision": entry["revision"],
            "license": entry["license"],
            "config": {k: list(v) if isinstance(v, tuple) else v
                       for k, v in entry["config"].items()},
            "params": entry["params"],
            "imagenet_top1_reported": entry["imagenet_top1"],
            **({"zero_shot_top1_reported": entry["zero_shot_top1"]}
               if "zero_shot_top1" in entry else {}),
            "files": {
                filename: {
                    "url": f"{aimv2_presets.HUB_URL}/{entry['repo_id']}/resolve/"
                           f"{entry['revision']}/{filename}",
                    "sha256": entry["sha256"] if filename == files[0] else None,
                    "size": entry["file_size"] if filename == files[0] else None,
                }
                for filename in files
            },
        }
    return {"source": "Apple AIMv2 release (Hub repositories at pinned revisions)",
            "presets": presets}


def model_card(name: str) -> str:
    entry = AIM_PRESETS[name]
    config, files, top1 = entry["config"], entry["files"], entry["imagenet_top1"]
    with open(os.path.join(HERE, "model_card_template.md")) as handle:
        template = handle.read()
    return template.format(
        preset=name,
        size=entry["size"],
        hidden_dim=config["hidden_dim"],
        num_layers=config["num_layers"],
        num_heads=config["num_heads"],
        patch_size=config["patch_size"],
        image_size=config["image_shape"][0],
        trunk_params=entry["trunk_params"],
        pretraining_images=entry["pretraining_images"],
        best_blocks=f"{entry['best_probe_layers'][0]}-{entry['best_probe_layers'][-1]}",
        last_blocks=f"{entry['last_probe_layers'][0]}-{entry['last_probe_layers'][-1]}",
        top1_best=top1["best"],
        top1_last=top1["last"],
        top1_lora=top1["lora_r8"],
        backbone_file=files["backbone"][0],
        backbone_sha=files["backbone"][1],
        head_best_file=files["head_best"][0],
        head_last_file=files["head_last"][0],
        base_url=RELEASE_BASE_URL,
    )


def outputs() -> dict[str, str]:
    files = {os.path.join(HERE, "manifest.json"):
             json.dumps(manifest(), indent=2) + "\n",
             os.path.join(HERE, "manifest_aimv2.json"):
             json.dumps(manifest_aimv2(), indent=2) + "\n"}
    for name in RELEASED:
        files[os.path.join(HERE, "model_cards", f"{name}.md")] = model_card(name)
    return files


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    stale = []
    for path, text in outputs().items():
        current = open(path).read() if os.path.exists(path) else None
        if current == text:
            continue
        stale.append(path)
        if not args.check:
            with atomic_file(path) as staging, open(staging, "w") as handle:
                handle.write(text)
    if args.check and stale:
        print("stale (run python weights/build_manifest.py):", *stale, sep="\n  ")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
