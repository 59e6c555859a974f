"""Runs that stop cleanly on Ctrl-C and SIGTERM, and never save NaN.

A signal handler that raises `KeyboardInterrupt` lands wherever Python
happens to be: inside a framework's step, a data thread's hand-off, a
checkpoint write. That is how a Ctrl-C gets ignored, or ends a run with an
unrelated `TypeError` and no checkpoint. Here the handlers only set a flag;
`StopOnSignal` checks it between steps (or epochs) and ends `fit` there,
so the run's own code writes its checkpoint and exits with the shell's
code for the signal (130 for SIGINT, 143 for SIGTERM). A second Ctrl-C
stops at once, as users expect of a program that seems stuck.

In a multi-process JAX run the processes agree on the step to stop at:
every step, `StopOnSignal` gathers the flag of every process (one tiny
all-gather), so a signal that reaches only some hosts stops all of them
at the same step, and their checkpoint (Orbax, with its barriers) is one.

`StopOnNonFinite` is Keras' `TerminateOnNaN` made an error: it raises
`NonFiniteError` naming the step, so no later callback saves the broken
weights and the run exits non-zero instead of reporting a result.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import threading

import keras
import numpy as np

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}
NAMES = {signal.SIGINT: "Ctrl-C (SIGINT)", signal.SIGTERM: "SIGTERM"}


class NonFiniteError(RuntimeError):
    """Training produced a NaN or infinite loss or weight."""


class Interrupted(KeyboardInterrupt):
    """A run stopped on a signal after saving what resumes it;
    `exit_code` is 130 (SIGINT) or 143 (SIGTERM)."""

    def __init__(self, exit_code: int, message: str = ""):
        super().__init__(message)
        self.exit_code = exit_code


class Interrupts:
    """Context manager for a run's signals. While a `fit` watched by
    `callback()` runs (the callback arms it), SIGINT and SIGTERM only set
    `received` (the first signal's number) and the fit stops at the next
    check; a second SIGINT raises `KeyboardInterrupt` at once. Outside a
    fit, SIGINT raises `KeyboardInterrupt` and SIGTERM ends the process as
    usual (nothing to save yet). `armed=True` keeps it armed for the whole
    `with` block (a run of several fits that checks `received` between
    them). Outside the main thread (where Python cannot install handlers)
    it does nothing.

        with Interrupts() as interrupts:
            model.fit(..., callbacks=[interrupts.callback()])
            if interrupts.received:
                save_checkpoint(); return interrupts.exit_code
    """

    def __init__(self, say=None, armed: bool = False):
        self.received: int | None = None
        self.armed = armed
        self._say = say or (lambda text: print(text, file=sys.stderr, flush=True))
        self._previous: dict[int, object] = {}
        self._at = "step"

    def __enter__(self) -> "Interrupts":
        if threading.current_thread() is threading.main_thread():
            for number in EXIT_CODES:
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    def _handle(self, number, frame) -> None:
        if not self.armed or (self.received is not None and number == signal.SIGINT):
            previous = self._previous.get(number)
            self.__exit__()
            if callable(previous):
                previous(number, frame)  # Python's own SIGINT handler raises
            elif number == signal.SIGINT:
                raise KeyboardInterrupt
            else:  # the default action of SIGTERM: end the process
                signal.signal(number, signal.SIG_DFL)
                os.kill(os.getpid(), number)
            return
        if self.received is None:
            self.received = number
            self._say(f"\n{NAMES[number]}: stopping after this {self._at} and saving "
                      "what resumes the run (Ctrl-C again: stop at once, without it)")

    @property
    def exit_code(self) -> int:
        """130 after SIGINT, 143 after SIGTERM, 0 without a signal."""
        return EXIT_CODES.get(self.received, 0) if self.received else 0

    def callback(self, at: str = "batch", across_processes: bool = False):
        """A `StopOnSignal` watching this flag (see there)."""
        return StopOnSignal(self, at, across_processes)


class StopOnSignal(keras.callbacks.Callback):
    """Arms its `Interrupts` for the length of `fit` and ends the fit
    after a signal:

    - `at="batch"`: at the next step end (`model.stop_training`); Keras
      still runs the epoch-end callbacks of the epoch it stops in, so a
      `StepCheckpoint` there saves the step reached, and `fit` returns;
      the caller checks `interrupts.received`.
    - `at="epoch"`: at the next epoch end, by raising `Interrupted` after
      the other callbacks' `on_epoch_end` (put this callback last): a
      `BackupAndRestore` before it has saved the epoch, and `fit` does not
      reach `on_train_end`, where that backup would be deleted.

    With `across_processes=True` (a multi-process JAX run) every process
    takes part in a one-integer all-gather at each check and all stop when
    any received a signal."""

    def __init__(self, interrupts: Interrupts, at: str = "batch",
                 across_processes: bool = False):
        super().__init__()
        if at not in ("batch", "epoch"):
            raise ValueError(f"at must be 'batch' or 'epoch'; received {at!r}.")
        self.interrupts = interrupts
        self.at = at
        self.across_processes = across_processes
        self._arms = False

    def _received(self) -> bool:
        received = self.interrupts.received is not None
        if self.across_processes:
            from jax.experimental import multihost_utils

            flags = multihost_utils.process_allgather(np.int32(received))
            if np.any(flags) and not received:
                self.interrupts.received = signal.SIGTERM  # another host's signal
            received = bool(np.any(flags))
        return received

    def on_train_begin(self, logs=None):
        self._arms = not self.interrupts.armed  # an armed run keeps it armed
        self.interrupts.armed = True
        self.interrupts._at = "step" if self.at == "batch" else "epoch"

    def on_train_end(self, logs=None):
        if self._arms:
            self.interrupts.armed = False

    def on_train_batch_end(self, batch, logs=None):
        if self.at == "batch" and self._received():
            self.model.stop_training = True

    def on_epoch_end(self, epoch, logs=None):
        if self.at == "epoch" and self._received():
            self.interrupts.armed = False
            raise Interrupted(
                self.interrupts.exit_code,
                f"stopped after epoch {epoch + 1}",
            )


class StopOnNonFinite(keras.callbacks.Callback):
    """Raises `NonFiniteError` at the first step whose loss is NaN or
    infinite, naming the step and `advice` (e.g. lower the learning rate).
    Keras' running mean of the loss stays non-finite once one step was, so
    checking the logged loss is enough."""

    def __init__(self, advice: str = "lower the learning rate"):
        super().__init__()
        self.advice = advice

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is None:
            return
        value = float(keras.ops.convert_to_numpy(loss))
        if not math.isfinite(value):
            step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
            raise NonFiniteError(
                f"The loss became {value} at step {step}; training stopped and "
                f"nothing was saved from it. Fix: {self.advice}."
            )


def check_finite_weights(model, what: str) -> None:
    """Raises `NonFiniteError` naming the first variables of `model` that
    hold a NaN or infinity (call before saving `what`). One reduction per
    variable, read back in one transfer (not one per variable)."""
    floats = [variable for variable in model.weights if "float" in str(variable.dtype)]
    if not floats:
        return
    finite = keras.ops.convert_to_numpy(keras.ops.stack(
        [keras.ops.all(keras.ops.isfinite(variable)) for variable in floats]))
    broken = [variable.path for variable, ok in zip(floats, finite) if not ok]
    if broken:
        names = ", ".join(broken[:3]) + (", ..." if len(broken) > 3 else "")
        raise NonFiniteError(
            f"{len(broken)} variables hold NaN or infinite values ({names}); "
            f"{what} was not saved. Lower the learning rate and start again from "
            "the last good checkpoint."
        )
