"""Graceful stop on SIGTERM / Ctrl-C and on cloud preemption notices.

Design in plain words
---------------------
A signal handler must not do real work (it can fire in the middle of a jitted step or of a checkpoint write), so
the first SIGTERM or SIGINT only sets a flag and prints one line. The training loop polls
:meth:`PreemptionGuard.should_stop` once per step; when it says yes, the loop writes one final checkpoint, waits
for it, and returns normally (exit code 0, with a message saying where the checkpoint is). A second signal means
"now": the process exits at once with ``128 + signal`` without touching the disk further (the checkpoint being
written, if any, stays an ignored temporary directory; see :mod:`sftjax.train.checkpoint`).

With several JAX processes (a pod, a GPU cluster) every process must stop at the *same* step or the collective
save deadlocks. JAX's distributed runtime has a preemption service for that: the cluster's notice (SIGTERM on
TPU VMs and most schedulers) is turned into ``multihost_utils.reached_preemption_sync_point(step)`` returning True
on every process at one agreed step. :meth:`should_stop` uses it whenever more than one process runs, and falls
back to the local flag otherwise (one process, or the service unavailable, e.g. on CPU).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from typing import TextIO

log = logging.getLogger(__name__)

DEFAULT_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _multi_process() -> bool:
    try:
        import jax

        return jax.process_count() > 1
    except Exception:  # noqa: BLE001 - jax not initialised in an odd way: behave as a single process
        return False


class PreemptionGuard:
    """Context manager turning the first stop signal into a flag and a second one into an immediate exit.

    Usage in a training loop::

        with PreemptionGuard() as guard:
            for step in range(start, total):
                state = train_step(state, batch)
                manager.maybe_save(step, ...)
                if guard.should_stop(step):
                    manager.save(step, ..., force=True); manager.wait()
                    print(guard.stop_message(manager.directory / str(step)))
                    break
    """

    def __init__(self, signals=DEFAULT_SIGNALS, *, stream: TextIO | None = None, use_sync_point: bool | None = None):
        self.signals = tuple(signals)
        self.stream = stream
        self.use_sync_point = use_sync_point
        self._requested = threading.Event()
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}
        self._installed = False

    # -------------------------------------------------------------------------------------------- handlers

    def __enter__(self) -> PreemptionGuard:
        if threading.current_thread() is not threading.main_thread():
            log.warning("PreemptionGuard entered outside the main thread: signals are not intercepted")
            return self
        for sig in self.signals:
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handle)
        self._installed = True
        return self

    def __exit__(self, *exc) -> None:
        if self._installed:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)
            self._installed = False

    def _print(self, text: str) -> None:
        stream = self.stream or sys.stderr
        try:
            stream.write(text + "\n")
            stream.flush()
        except Exception:  # noqa: BLE001 - a closed stream must not break the handler
            pass

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self._requested.is_set():
            self._print(f"sftjax: second {name}: exiting now without a final checkpoint")
            os._exit(128 + signum)
        self.signal_name = name
        self._requested.set()
        self._print(f"sftjax: {name} received: finishing this step and writing a checkpoint (repeat to exit now)")

    # -------------------------------------------------------------------------------------------- queries

    def request(self, reason: str = "request") -> None:
        """Ask for a graceful stop from code (tests, a watchdog thread, a time limit)."""
        self.signal_name = self.signal_name or reason
        self._requested.set()

    @property
    def requested(self) -> bool:
        """A stop was asked for on this process (signal or :meth:`request`)."""
        return self._requested.is_set()

    def should_stop(self, step: int) -> bool:
        """Whether the loop must checkpoint and stop after ``step``; call it on every process at every step.

        With several processes the decision comes from JAX's preemption sync point, so all of them agree on the
        step; otherwise from the local flag.
        """
        use_sync = self.use_sync_point if self.use_sync_point is not None else _multi_process()
        if use_sync:
            try:
                from jax.experimental import multihost_utils

                if multihost_utils.reached_preemption_sync_point(step):
                    self.signal_name = self.signal_name or "preemption notice"
                    self._requested.set()
                    return True
                return False
            except RuntimeError as err:  # preemption service not enabled: fall back to the local flag
                log.warning("preemption sync point unavailable (%s); using the local stop flag", err)
                self.use_sync_point = False
        return self.requested

    def stop_message(self, checkpoint_path) -> str:
        """The one line to print after the final checkpoint was written."""
        what = self.signal_name or "stop request"
        return f"sftjax: stopped on {what}; checkpoint written to {checkpoint_path} (resume with resume=auto)"
