"""Loads the tiny released preset in a process of its own and prints its
logits on the reference images as JSON (for tests/test_cache_concurrency.py).

    python tests/load_tiny_preset.py [--wait-for FILE] [--slow-conversion]

KERAS_AIM_HOME and KERAS_AIM_BASE_URL (a local release server) come from the
environment. `--wait-for FILE`: creates FILE.ready.PID, then waits for FILE
to exist before loading (so that several processes start loading at the
same moment). `--slow-conversion`: the conversion pauses for a minute after
writing the preset's files into its staging folder (a test kills it there).
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

import keras_aim  # noqa: E402
from tests.conftest import FIXTURES, to_numpy  # noqa: E402
from tests.tiny_release import NAME, register_tiny_preset  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--wait-for")
    parser.add_argument("--slow-conversion", action="store_true")
    args = parser.parse_args()
    register_tiny_preset()
    if args.slow_conversion:
        save = keras_aim.AIMImageClassifierPreprocessor.save_to_preset

        def save_then_pause(self, preset_dir):
            save(self, preset_dir)
            print(f"converted into {preset_dir}", flush=True)
            time.sleep(60)

        keras_aim.AIMImageClassifierPreprocessor.save_to_preset = save_then_pause
    if args.wait_for:
        open(f"{args.wait_for}.ready.{os.getpid()}", "w").close()
        while not os.path.exists(args.wait_for):
            time.sleep(0.01)
    classifier = keras_aim.AIMImageClassifier.from_preset(NAME, probe_layers="best")
    images = np.load(FIXTURES / "images_nhwc.npy")
    print(json.dumps({"logits": to_numpy(classifier(images)).tolist()}))


if __name__ == "__main__":
    main()
