"""Stopping on a signal: Ctrl-C (SIGINT) and the preemption signal (`train.preemption_signal`, SIGTERM by default:
what Slurm sends before it preempts or cancels a job; NeMo Automodel's `DistributedSignalHandler` default).

Outside the train loop a signal raises `Interrupted` at once (nothing to save; resources close on the way out). Inside
it, the handler only sets a flag that the loop polls at step boundaries (no host sync): the step in flight finishes,
every process agrees on the step to stop at (`launcher.distributed.any_process`), the loop saves a checkpoint of it
and raises `Interrupted`. A second signal inside the loop stops at once, without that checkpoint.
"""
from __future__ import annotations

import logging
import signal
import threading

from automodel_jax.config import ConfigError
from automodel_jax.launcher.distributed import any_process
from automodel_jax.training.loop import TrainingError

log = logging.getLogger("automodel_jax.finetune")


class Interrupted(Exception):
    """The command stopped on signal `signum`; `agreed`: every process stopped after the same step (the train loop's
    stop), else this process stopped alone. `exit_code` is 128 + the signal number, the shell's convention (130 for
    SIGINT, 143 for SIGTERM)."""

    def __init__(self, message: str, signum: int, agreed: bool = False):
        super().__init__(message)
        self.signum, self.agreed, self.exit_code = signum, agreed, 128 + signum


def resolve_signal(name: str | int, key: str = "train.preemption_signal") -> signal.Signals:
    """'SIGTERM', 'term', 'SIGUSR1' or 15 -> the signal (names as NeMo Automodel's `resolve_signal` takes them);
    ConfigError naming `key` for anything else, or for a signal no program can handle (SIGKILL, SIGSTOP)."""
    try:
        if isinstance(name, int) or str(name).strip().isdigit():
            sig = signal.Signals(int(name))
        else:
            text = str(name).strip().upper()
            sig = signal.Signals[text if text.startswith("SIG") else f"SIG{text}"]
    except (KeyError, ValueError):
        raise ConfigError(f"{key}={name!r} is not a signal; give a name such as 'SIGTERM' or 'SIGUSR1'") from None
    if sig in (signal.SIGKILL, signal.SIGSTOP):
        raise ConfigError(f"{key}={name!r}: {sig.name} cannot be handled by any program; give a signal such as "
                          f"'SIGTERM' or 'SIGUSR1'")
    return sig


class SignalStop:
    """Handlers for SIGINT and the preemption signal while the `with` block runs (the main thread only; elsewhere a
    no-op), restored at exit. `at_step_end=False`: a signal raises `Interrupted` at once. `at_step_end=True` (the train
    loop): the first signal sets a flag for `agreed` to read at a step boundary; a second one raises at once."""

    def __init__(self, preemption_signal: str | int, *, at_step_end: bool = False):
        self.preemption = resolve_signal(preemption_signal)
        self.signals = sorted({signal.SIGINT, self.preemption})
        self.at_step_end = at_step_end
        self.received: signal.Signals | None = None
        self._previous: dict = {}

    def __enter__(self) -> SignalStop:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.signals}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum: int, frame) -> None:
        sig = signal.Signals(signum)
        if self.at_step_end and self.received is None:
            self.received = sig
            log.warning("%s: finishing the current step, then saving a checkpoint and stopping (%s again stops at "
                        "once, without saving it)", sig.name, sig.name)
            return
        where = "in the train loop, without saving the step in progress" if self.at_step_end else \
            "outside the train loop (no step in progress)"
        raise Interrupted(f"interrupted by {sig.name} {where}", signum)

    def agreed(self, step: int, timeout_s: float) -> bool:
        """At the boundary after `step`: whether any process received a signal (every process gets the same answer,
        so all stop after the same step). TrainingError if the processes do not all reach it within `timeout_s`."""
        try:
            return any_process(self.received is not None, f"stop-after-step-{step}", timeout_s)
        except TimeoutError as error:
            raise TrainingError(f"{error}; a process is stuck or much slower (raise distributed.timeout_s if steps "
                                f"are that uneven)") from None

    def interrupted(self, step: int, saved_to: str | None) -> Interrupted:
        """The exception to raise once the loop stopped after `step` (`saved_to`: its checkpoint, or None)."""
        sig = self.received or self.preemption  # stopped for another process's signal: exit as if preempted
        what = f"checkpoint {saved_to} saved" if saved_to else "no checkpoint saved (checkpoint.enabled is false)"
        by = sig.name if self.received else f"a signal to another process ({sig.name} assumed)"
        return Interrupted(f"interrupted by {by}: stopped after step {step}, {what}", sig, agreed=True)
