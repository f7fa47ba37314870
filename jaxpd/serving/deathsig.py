"""`python -m jaxpd.serving.deathsig PARENT_PID COMMAND...`: run COMMAND so that it receives
SIGTERM when its launcher dies, even by kill -9 (Linux `PR_SET_PDEATHSIG`, kept across exec).

Why a shim and not `subprocess.Popen(preexec_fn=...)`: a preexec_fn forces Python to fork()
the launcher, and the launcher runs gRPC threads; gRPC's fork handlers can then restart its
poller in the child and abort it before exec (grpc/grpc#43055: "epoll_wait error: Bad file
descriptor", SIGABRT). Without a preexec_fn Popen spawns through vfork/posix_spawn, which runs
no fork handlers; this module then sets the death signal and execs the real command in the same
process (same pid), importing nothing but the standard library.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def set_death_signal(parent: int) -> None:
    """Ask for SIGTERM when the parent dies; if it already died (we were re-parented), exit."""
    if sys.platform.startswith("linux"):
        try:
            prctl = ctypes.CDLL(None, use_errno=True).prctl
        except (OSError, AttributeError):
            prctl = None
        if prctl is not None:
            prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
            prctl.restype = ctypes.c_int
            prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    if os.getppid() != parent:  # the launcher died before the death signal took effect
        os._exit(128 + signal.SIGTERM)


def wrap(argv: list[str]) -> list[str]:
    """`argv` run through this shim, tied to the calling process."""
    return [sys.executable, "-m", __name__, str(os.getpid()), *argv]


def main() -> None:
    if len(sys.argv) < 3 or not sys.argv[1].isdigit():
        sys.exit("usage: python -m jaxpd.serving.deathsig PARENT_PID COMMAND [ARGS...]")
    set_death_signal(int(sys.argv[1]))
    command = sys.argv[2:]
    try:
        os.execvp(command[0], command)
    except OSError as e:
        sys.exit(f"error: cannot run {command[0]}: {e.strerror or e}")


if __name__ == "__main__":
    main()
