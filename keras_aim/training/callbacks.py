"""A one-line progress bar for `fit`, with the loss.

Keras' own progress output (`verbose=1`) draws one bar per epoch; runs of
many short epochs (checkpoint intervals, probes) want one bar for the whole
run. Written on tqdm, which keras_aim already uses for downloads.
"""

from __future__ import annotations

import sys

import keras


class ProgressBar(keras.callbacks.Callback):
    """One tqdm bar over `total_steps` training steps of one or more `fit`
    calls, showing the latest loss; pass `verbose=0` to `fit`.

    Args:
        total_steps: steps of the whole run (all epochs and `fit` calls).
        description: the bar's label.
        initial_step: steps already done (a resumed run).
    """

    def __init__(self, total_steps: int, description: str = "training", initial_step: int = 0):
        super().__init__()
        from tqdm.auto import tqdm

        self.bar = tqdm(
            total=total_steps,
            initial=initial_step,
            desc=description,
            unit="step",
            file=sys.stderr,
            dynamic_ncols=True,
            leave=True,
        )

    def on_train_batch_end(self, batch, logs=None):
        self.bar.update(1)
        if logs and "loss" in logs:
            self.bar.set_postfix(loss=f"{float(logs['loss']):.4f}", refresh=False)

    def close(self) -> None:
        self.bar.close()


class StopAtStep(keras.callbacks.Callback):
    """Ends `fit` right after the optimizer's `total`-th weight update, also
    in the middle of an epoch (the last checkpoint interval of a run may be
    shorter than the others); the epoch's end callbacks still run."""

    def __init__(self, total: int):
        super().__init__()
        self.total = total

    def on_train_batch_end(self, batch, logs=None):
        if int(keras.ops.convert_to_numpy(self.model.optimizer.iterations)) >= self.total:
            self.model.stop_training = True
