"""SIGTERM and Ctrl-C as requests to stop at the next step boundary.

Preemptible clusters send SIGTERM and give a grace period; a run that dies there loses all
since its last periodic save. Inside `StopSignals`, the first SIGTERM or SIGINT only sets
`requested`; the loop finishes the step, saves a checkpoint and raises. A second Ctrl-C
interrupts at once (the default behaviour), for a user who does not want to wait. Handlers
are installed only from the main thread (Python allows no other) and restored only after the
final save, so that a late SIGTERM (torchrun signals each rank separately) is absorbed rather
than killing a rank in the middle of the collective save.
"""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType

HANDLED = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    def __init__(self) -> None:
        self.requested: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signum
        name = signal.Signals(signum).name
        print(f"\n[sddit] {name}: finishing this step, then saving a checkpoint "
              "(Ctrl-C again to abort without saving)", file=sys.stderr, flush=True)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in HANDLED:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
