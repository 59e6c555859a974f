"""Peak memory and speed of converting and loading a full-size AIM or AIMv2 preset.

Writes a full-size trunk with random weights in the released format (for
`aim_600m` a torch `.pth` state dict, 2.7 GB; for an AIMv2 preset such as
`aimv2_huge_patch14_224` Apple's `model.safetensors`, put where a download
would be), then, in a fresh process per backend and step, measures peak
resident memory (VmHWM) of:

  convert: released file -> Keras -> cached keras-hub preset directory
           (what the first `AIMBackbone.from_preset("aim_600m")` /
           `AIMv2Backbone.from_preset(...)` does)
  load:    cached preset directory -> AIMBackbone / AIMv2Backbone (every
           later call)

and prints a table with peak RSS, RSS after imports, their difference, the
ratios to the float32 weight bytes and the time. Targets: peak at most 1.3x
(convert) and 1.15x (load) the weight bytes.

    python benchmarks/preset_memory.py [--backends jax tensorflow torch]
        [--preset aim_600m | aimv2_huge_patch14_224 | ...] [--workdir DIR] [--csv FILE]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = r"""
import json, os, sys, time
def status(field):  # bytes; VmHWM is this process's own peak (ru_maxrss
    # can carry the parent's peak across fork + exec)
    with open("/proc/self/status") as f:
        line = next(l for l in f if l.startswith(field + ":"))
    return int(line.split()[1]) * 1024
def rss():
    return status("VmRSS")
step, name, release_dir = sys.argv[1:4]
import keras_aim
from keras_aim.loading import preset_cache
from keras_aim.models.aim.aim_backbone import AIMBackbone, cached_release_preset
from keras_aim.models.aimv2 import aimv2_backbone
after_imports = rss()
start = time.perf_counter()
v2 = name in keras_aim.AIMV2_PRESETS
if step == "convert" and v2:
    aimv2_backbone.cached_release_preset(keras_aim.AIMv2Backbone, name, None, progress=False)
elif step == "convert":
    cached_release_preset(AIMBackbone, name, None, release_dir, progress=False)
else:
    cls = keras_aim.AIMv2Backbone if v2 else keras_aim.AIMBackbone
    backbone = cls.from_preset(preset_cache.preset_cache_dir(name))
seconds = time.perf_counter() - start
peak = status("VmHWM")
print(json.dumps({"after_imports": after_imports, "peak": peak, "seconds": seconds}))
"""


def write_released_checkpoint(name: str, folder: str) -> tuple[str, int]:
    """Random weights with the released key names and shapes, as torch.save
    (AIM-v1) or safetensors (AIMv2) writes them. Returns (path, float32
    weight bytes)."""
    from keras_aim.models.aimv2 import aimv2_presets

    if aimv2_presets.is_preset_name(name):
        return write_aimv2_checkpoint(name, folder)
    import torch

    from keras_aim.models.aim.aim_presets import get_preset

    config = get_preset(name)["config"]
    d, depth, p = config["hidden_dim"], config["num_layers"], config["patch_size"]
    shapes = {
        "preprocessor.patchifier.proj.weight": (d, 3, p, p),
        "preprocessor.patchifier.proj.bias": (d,),
        "preprocessor.patchifier.norm.weight": (d,),
        "preprocessor.patchifier.norm.bias": (d,),
        "trunk.post_trunk_norm.weight": (d,),
        "trunk.post_trunk_norm.bias": (d,),
    }
    for i in range(depth):
        b = f"trunk.blocks.{i}."
        shapes.update({
            b + "norm_1.weight": (d,), b + "norm_1.bias": (d,),
            b + "attn.qkv.weight": (3 * d, d), b + "attn.proj.weight": (d, d),
            b + "norm_2.weight": (d,), b + "norm_2.bias": (d,),
            b + "mlp.fc1.weight": (4 * d, d), b + "mlp.fc2.weight": (d, 4 * d),
        })
    generator = torch.Generator().manual_seed(0)
    state = {k: torch.randn(s, generator=generator) * 0.02 for k, s in shapes.items()}
    nbytes = sum(t.numel() * 4 for t in state.values())
    path = os.path.join(folder, get_preset(name)["files"]["backbone"][0])
    torch.save(state, path)
    return path, nbytes


def write_aimv2_checkpoint(name: str, folder: str) -> tuple[str, int]:
    """An AIMv2 release's `model.safetensors` (every key and shape of the
    preset, random float32 values)."""
    import numpy as np
    from safetensors.numpy import save_file

    from keras_aim.models.aimv2 import aimv2_presets

    shapes = aimv2_presets.state_dict_shapes(aimv2_presets.get_preset(name))
    rng = np.random.default_rng(0)
    state = {
        key: (rng.standard_normal(shape, dtype=np.float32) * 0.02) for key, shape in shapes.items()
    }
    nbytes = sum(value.nbytes for value in state.values())
    path = os.path.join(folder, "model.safetensors")
    save_file(state, path)
    return path, nbytes


def place_aimv2_download(name: str, path: str, home: str) -> None:
    """Links the written file where `from_preset` finds a finished download
    (so that `convert` measures converting, not downloading)."""
    from keras_aim.models.aimv2 import aimv2_presets

    target = os.path.join(home, "downloads", *aimv2_presets.download_path(
        aimv2_presets.get_preset(name)).split("/"))
    os.makedirs(os.path.dirname(target), exist_ok=True)
    if not os.path.exists(target):
        os.link(path, target)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", nargs="+", default=["jax", "tensorflow", "torch"])
    parser.add_argument("--preset", default="aim_600m")
    parser.add_argument("--workdir", default=None, help="needs ~2x the weights on disk")
    parser.add_argument("--csv", default=None, help="also write the table as CSV")
    args = parser.parse_args()

    sys.path.insert(0, ROOT)
    from keras_aim.loading.download import sha256_file
    from keras_aim.models.aim.aim_presets import get_preset
    from keras_aim.models.aimv2 import aimv2_presets

    v2 = aimv2_presets.is_preset_name(args.preset)

    workdir = args.workdir or tempfile.mkdtemp(prefix="aim_memory_")
    release_dir = os.path.join(workdir, "released")
    os.makedirs(release_dir, exist_ok=True)
    start = time.perf_counter()
    # In a child, so that this process stays small while it forks the others.
    written = subprocess.run(
        [sys.executable, "-c",
         "import json, sys; sys.path[:0] = sys.argv[1:2]; "
         "from preset_memory import write_released_checkpoint as w; "
         "print(json.dumps(w(sys.argv[2], sys.argv[3])))",
         os.path.dirname(os.path.abspath(__file__)), args.preset, release_dir],
        env={**os.environ, "PYTHONPATH": ROOT, "TF_CPP_MIN_LOG_LEVEL": "3"},
        capture_output=True, text=True, check=True,
    )
    path, nbytes = json.loads(written.stdout.strip().splitlines()[-1])
    print(f"wrote {path} ({nbytes / 1e9:.2f} GB of float32 weights) in "
          f"{time.perf_counter() - start:.0f} s")
    # The random file's checksum replaces the released one for this run
    # (AIM-v1; AIMv2 records none: the file sits where a download would).
    entry = None if v2 else get_preset(args.preset)
    sha = None if v2 else sha256_file(path)

    rows = []
    for backend in args.backends:
        home = os.path.join(workdir, f"home-{backend}")
        if v2:
            place_aimv2_download(args.preset, path, home)
        for step in ("convert", "load"):
            result = measure(step, backend, args.preset, release_dir, home, sha, entry)
            rows.append({
                "backend": backend, "step": step,
                "peak_gb": result["peak"] / 1e9,
                "imports_gb": result["after_imports"] / 1e9,
                "peak_ratio": result["peak"] / nbytes,
                "added_ratio": (result["peak"] - result["after_imports"]) / nbytes,
                "seconds": result["seconds"],
                "gb_per_s": nbytes / 1e9 / result["seconds"],
            })
            print(_format(rows[-1]), flush=True)

    print(f"\n{args.preset}: {nbytes / 1e9:.2f} GB float32 weights; targets: "
          "peak <= 1.3x (convert), <= 1.15x (load)")
    print(_format(None))
    for row in rows:
        print(_format(row))
    if args.csv:
        with open(args.csv, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return 0


def measure(step, backend, name, release_dir, home, sha, entry) -> dict:
    """Runs the child with the preset's checksum set to the random file's
    (AIM-v1)."""
    child = CHILD
    if entry is not None:
        child = CHILD.replace(
            "import keras_aim\n",
            "import keras_aim\n"
            f"keras_aim.AIM_PRESETS[{name!r}]['files']['backbone'] = "
            f"({entry['files']['backbone'][0]!r}, {sha!r})\n",
            1,
        )
    env = {**os.environ, "KERAS_BACKEND": backend, "KERAS_AIM_HOME": home,
           "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": ROOT}
    out = subprocess.run(
        [sys.executable, "-c", child, step, name, release_dir],
        env=env, capture_output=True, text=True, check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"{backend} {step} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _format(row) -> str:
    if row is None:
        return (f"{'backend':<11}{'step':<9}{'peak RSS':>10}{'imports':>9}"
                f"{'peak/weights':>14}{'(peak-imports)/weights':>24}{'time':>8}{'GB/s':>7}")
    return (f"{row['backend']:<11}{row['step']:<9}{row['peak_gb']:>8.2f}GB"
            f"{row['imports_gb']:>7.2f}GB{row['peak_ratio']:>13.2f}x"
            f"{row['added_ratio']:>23.2f}x{row['seconds']:>7.1f}s{row['gb_per_s']:>7.2f}")


if __name__ == "__main__":
    sys.exit(main())
