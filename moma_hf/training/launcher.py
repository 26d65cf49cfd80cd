"""How a training process cooperates with the launcher that started it (`accelerate launch`, `torchrun`).

A pre-empted job must end with a complete checkpoint and exit code 143 whichever process got the SIGTERM:

- **The launcher dies** (SIGTERM to it alone, or SIGKILL, or the OOM killer): `follow_launcher` asks Linux to
  send this process SIGTERM when its parent dies (`prctl(PR_SET_PDEATHSIG)`), so it checkpoints instead of
  training on as an orphan. `reroute_orphaned_output` then points output pipes that the launcher read (and
  that now have no reader) elsewhere, or the first write to them would crash the checkpoint.
- **Only this process got the signal**: it checkpoints and exits 143, but both launchers turn a failed child
  into exit code 1. `notify_launcher` then sends the launcher SIGTERM, once the checkpoint is complete, and
  both launchers exit 128 + SIGTERM = 143 on it (accelerate's simple launcher and its torchrun agent alike).

Both act only when the parent process is such a launcher (read from /proc, so Linux only); run directly with
`python`, the process itself exits 143 and nothing else is signalled.
"""

from __future__ import annotations

import ctypes
import fcntl
import logging
import os
import select
import signal
import struct
import sys
import termios
import time

logger = logging.getLogger(__name__)

PREEMPTED_EXIT_CODE = 128 + signal.SIGTERM  # 143: what schedulers expect from a job that stopped on their signal
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
_LAUNCHER_MARKERS = ("accelerate.commands.launch", "torch.distributed.run", "torch.distributed.launch")
_launcher_pid: int | None = None


def launcher_pid() -> int | None:
    """The parent's pid when the parent is `accelerate launch` or `torchrun` (Linux), else None."""
    parent = os.getppid()
    try:
        with open(f"/proc/{parent}/cmdline", "rb") as f:
            argv = [arg.decode(errors="replace") for arg in f.read().split(b"\0") if arg]
    except OSError:
        return None
    names = [os.path.basename(arg) for arg in argv[:3]]
    is_launcher = (
        any(marker in argv[:3] for marker in _LAUNCHER_MARKERS)
        or "torchrun" in names
        or ("accelerate" in names and "launch" in argv[:4])
    )
    return parent if is_launcher else None


def follow_launcher() -> None:
    """Under a launcher, get SIGTERM when it dies (Linux `PR_SET_PDEATHSIG`). Call from the main thread."""
    global _launcher_pid
    _launcher_pid = launcher_pid()
    if _launcher_pid is None:
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    except (OSError, AttributeError) as error:
        logger.warning("Cannot follow the launcher (%s): if it dies first, this process trains on.", error)
        return
    if os.getppid() != _launcher_pid:  # it died before prctl took effect: no signal will come
        os.kill(os.getpid(), signal.SIGTERM)


def notify_launcher() -> None:
    """After a pre-empted run's checkpoint is complete: SIGTERM the launcher, so that it exits 143, not 1.

    Sent by local rank 0 only (one signal per node) and only to the launcher `follow_launcher` saw, if it is
    still this process's parent. The launcher then stops the other ranks, which have already checkpointed.
    """
    if _launcher_pid is None or os.getppid() != _launcher_pid or int(os.environ.get("LOCAL_RANK", "0")) != 0:
        return
    # accelerate's launcher relays its child's stderr through a pipe and stops relaying when it gets SIGTERM:
    # let it take the last lines (the resume command) first.
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
        _wait_until_read(stream.fileno())
    os.kill(_launcher_pid, signal.SIGTERM)


def _wait_until_read(fd: int, timeout: float = 10.0) -> None:
    """Wait until the reader of the pipe `fd` has taken everything written to it (at most `timeout` s), plus a
    moment for it to pass the bytes on. Returns at once when `fd` is not a pipe."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            unread = struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0" * 4))[0]
        except OSError:
            return
        if unread == 0:
            time.sleep(0.2)
            return
        time.sleep(0.05)


def reroute_orphaned_output() -> None:
    """If the launcher died, send stdout/stderr that went to a pipe with no reader left to a live one or /dev/null.

    Writing to such a pipe raises `BrokenPipeError`; a checkpoint's progress bar on stderr would end the save.
    """
    if _launcher_pid is None or os.getppid() == _launcher_pid:
        return
    broken = [fd for fd in (1, 2) if _has_no_reader(fd)]
    healthy = [fd for fd in (1, 2) if fd not in broken]
    for fd in broken:
        target = healthy[0] if healthy else os.open(os.devnull, os.O_WRONLY)
        os.dup2(target, fd)


def _has_no_reader(fd: int) -> bool:
    poller = select.poll()
    try:
        poller.register(fd, select.POLLOUT)
    except (OSError, ValueError):
        return False
    return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
