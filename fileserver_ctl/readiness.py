"""Waiting until file descriptors are readable, whatever their numbers.

select() refuses descriptors from 1024 on, and the kernel cache holds one descriptor (its lease)
per cached file, so with a thousand cached files every descriptor opened later is out of its
reach; poll() has no such limit.
"""

from __future__ import annotations

import select
from collections.abc import Iterable


def readable(fds: Iterable[int], timeout: float | None) -> list[int]:
    """Those of `fds` that are readable (or at end of file, or in error) within `timeout`
    seconds (None: no limit)."""
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    return [fd for fd, _ in poller.poll(None if timeout is None else timeout * 1000)]
