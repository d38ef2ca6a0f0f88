"""Host-side watch over what a sandboxed run has written, for the limits no mount option sets.

- bwrap mode: tmpfs ``size=`` caps bytes, but not inodes (bwrap 0.8 cannot pass ``nr_inodes``;
  the default is half the machine's RAM pages), and each empty file or directory costs about
  1 KiB of kernel memory. The watch reads the inodes in use of the sandbox's ``/tmp`` and
  ``/dev/shm`` with one ``statvfs`` each through ``/proc/PID/root`` of the namespace's PID 1.
- fallback: the work dir is on the host's disk, bounded per file by RLIMIT_FSIZE only. The watch
  walks it (at most ``max_files + 1`` entries) and adds up allocated blocks and entries.

It is a poll (every ``interval_s``): a fast writer overshoots by what it writes in one interval.
"""

from __future__ import annotations

import os
import time



class WriteWatch:
    """Says when a run has gone past ``max_files`` entries (or ``max_bytes`` in the fallback)."""

    def __init__(self, max_files: int, max_bytes: int, bwrap_mounts: dict[str, int], interval_s: float = 0.1) -> None:
        """``bwrap_mounts``: the sandbox's writable mounts (path relative to its root -> size in
        bytes); a mount whose size differs is not the sandbox's (its pid was reused) and is skipped."""
        self.max_files = max_files
        self.max_bytes = max_bytes
        self.bwrap_mounts = bwrap_mounts
        self.interval_s = interval_s
        self._last = 0.0

    def exceeded(self, root_pid: int | None = None, work_dir: str | None = None) -> bool:
        """True when over a limit; checks at most once per interval (False in between).

        ``root_pid``: host pid of the bwrap namespace's PID 1 (None until known).
        ``work_dir``: the fallback's host work dir."""
        now = time.monotonic()
        if now - self._last < self.interval_s:
            return False
        self._last = now
        if work_dir is not None:
            return self._work_dir_over(work_dir)
        return root_pid is not None and self._inodes_in_use(root_pid) > self.max_files

    def _inodes_in_use(self, root_pid: int) -> int:
        used = 0
        for mount, size in self.bwrap_mounts.items():
            try:
                stats = os.statvfs(f"/proc/{root_pid}/root/{mount}")
            except OSError:
                continue  # the namespace is gone or not visible: nothing to count
            if stats.f_blocks * stats.f_frsize == size:
                used += stats.f_files - stats.f_ffree
        return used

    def _work_dir_over(self, work_dir: str) -> bool:
        entries, allocated = 0, 0
        pending = [work_dir]
        while pending:
            try:
                with os.scandir(pending.pop()) as listing:
                    for entry in listing:
                        entries += 1
                        try:
                            allocated += entry.stat(follow_symlinks=False).st_blocks * 512
                            if entry.is_dir(follow_symlinks=False):
                                pending.append(entry.path)
                        except OSError:
                            continue  # removed meanwhile
                        if entries > self.max_files or allocated > self.max_bytes:
                            return True
            except OSError:
                continue
        return False
