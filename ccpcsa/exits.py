"""Exit codes and interruption handling shared by `python -m ccpcsa` and search/run.py.

0   done
1   failed while running (one line on stderr: the cause, e.g. training diverged)
2   refused: a bad setting, bad data, a run folder in use or already holding a run
130 interrupted by SIGINT (Ctrl-C), 143 by SIGTERM (`kill`, `ray job stop`, Kubernetes):
    what was finished is kept; the search continues with --resume
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager

OK, FAILED, REFUSED = 0, 1, 2


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived; raised like Ctrl-C's KeyboardInterrupt so cleanup runs."""

    def __init__(self, signum: int = signal.SIGINT) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def interrupted_code(exc: BaseException) -> int:
    return 128 + getattr(exc, "signum", signal.SIGINT)


class _Termination:
    def __init__(self) -> None:
        self.signum: int | None = None
        self.forward_to_sigint = False  # while Tune runs: let its SIGINT handler stop it

    def install(self) -> None:
        """Make SIGTERM ours (again): connecting to Ray replaces the handler with Ray's,
        which aborts the process (exit 134) without a summary or saved state."""
        try:
            signal.signal(signal.SIGTERM, self.handle)
        except ValueError:  # not the main thread: leave signals alone
            pass

    def handle(self, signum: int, _frame) -> None:
        self.signum = signum
        if self.forward_to_sigint:
            signal.raise_signal(signal.SIGINT)
        else:
            raise Interrupted(signum)


@contextmanager
def terminate_as_interrupt() -> Iterator[_Termination]:
    """Inside the block SIGTERM raises Interrupted (as Ctrl-C raises KeyboardInterrupt), so
    `finally` blocks run: run locks are released and no half-written file is left. Set
    `forward_to_sigint` on the yielded object while a Ray Tune run is in progress: SIGTERM
    then becomes the SIGINT that Tune answers by saving its state and stopping. Call its
    `install()` after connecting to Ray."""
    state = _Termination()
    try:
        previous = signal.signal(signal.SIGTERM, state.handle)
    except ValueError:  # not the main thread: leave signals alone
        yield state
        return
    try:
        yield state
    finally:
        signal.signal(signal.SIGTERM, previous)


def one_line(exc: BaseException) -> str:
    """The message of an exception in one line. Errors re-raised by Ray or a DataLoader worker
    carry the original traceback in their message: its last line is the original error."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    return lines[-1] if len(lines) > 1 else lines[0]


def first_sentence(exc: BaseException) -> str:
    """The first sentence of an exception's first line: torch.load's errors go on with
    several sentences of advice after the cause."""
    line = first_line(exc)
    head, dot, _rest = line.partition(". ")
    return head if dot else line


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (torch's and the exporters' errors put the
    cause there and the details below), or its type when the message is empty."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__
