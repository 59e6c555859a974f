"""Runs `recipes.pretrain` several times in this one process, for
tests/test_interrupts.py, which signals each run from outside.

    python -m tests.signal_child WORKDIR RUNS [pretrain flags...]

For run i it prints `started i` at the first step end, then `exit i CODE
STEP` when the run returns (STEP: the optimizer's step at the end). The
parent sends SIGINT or SIGTERM at a moment of its choosing after
`started`; each run has enough steps to still be training then. One
process for all runs: the frameworks are imported once.
"""

import os
import sys

import keras

from recipes import pretrain


class Announce(keras.callbacks.Callback):
    def __init__(self, run: int):
        super().__init__()
        self.run, self.told = run, False
        self.step = 0

    def on_train_batch_end(self, batch, logs=None):
        self.step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
        if not self.told:
            self.told = True
            print(f"started {self.run}", flush=True)


def main() -> None:
    workdir, runs, flags = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    for run in range(runs):
        announce = Announce(run)
        code = pretrain.main(flags + ["--workdir", os.path.join(workdir, str(run))], [announce])
        print(f"exit {run} {code} {announce.step}", flush=True)


if __name__ == "__main__":
    main()
