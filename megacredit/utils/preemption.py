"""The preemption flag of the RL loop: SIGTERM (Slurm preemption, ``scancel``) and SIGUSR1 (Slurm's
``--signal`` warning before the time limit) ask the run to save at the end of the current step
and stop (megacredit/trainer/loop.py, docs/reliability.md)."""

from __future__ import annotations

import signal

from megacredit.utils.comm import all_gather_objects


class PreemptionFlag:
    """Set by SIGTERM/SIGUSR1; checked by the loop between steps."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = {}

    def install(self) -> "PreemptionFlag":
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:  # noqa: ARG002 - signal handler signature
        self.requested = True

    def on_any_rank(self) -> bool:
        """True when any rank got the signal (collective: every rank must call it), so all
        ranks take the same save-and-stop decision."""
        return any(all_gather_objects(self.requested))

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
