"""The process's open-file limit against the connections the caps allow.

Each connection is a descriptor; so are the database, the CRL worker, log files and the listening
sockets. With the soft default of 1,024 and `--max-connections 4096`, a flood would meet EMFILE long
before the cap: accepts fail, and every listener (probes included) stops answering. At start the soft
limit is raised as far as the hard one allows; what still does not fit is said once, with the numbers.
"""
from __future__ import annotations

import resource
from typing import Callable

from twisted.logger import Logger

log = Logger()
RESERVED = 128   # descriptors that are not connections: database, worker, logs, listeners, a margin


def fit_open_file_limit(max_connections: int, listeners: int,
                        get: Callable[[int], tuple[int, int]] = resource.getrlimit,
                        set_: Callable[[int, tuple[int, int]], None] = resource.setrlimit) -> int:
    """Raise RLIMIT_NOFILE's soft limit toward what `listeners` x `max_connections` need (never past the hard
    limit); returns the soft limit in force, and warns when it still cannot hold them."""
    soft, hard = get(resource.RLIMIT_NOFILE)
    connections = max_connections * listeners
    wanted = connections + RESERVED
    if soft != resource.RLIM_INFINITY and soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        if target > soft:
            try:
                set_(resource.RLIMIT_NOFILE, (target, hard))
                log.info("raised the open-file limit from {old} to {new} for up to {connections} connections",
                         old=soft, new=target, connections=connections)
                soft = target
            except (ValueError, OSError) as e:
                log.warn("could not raise the open-file limit from {old}: {error}", old=soft, error=e)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        log.warn("the open-file limit ({limit}, hard {hard}) cannot hold the {connections} connections the caps "
                 "allow plus {reserved} for the daemon itself: a flood would end in EMFILE, refusing everyone. "
                 "Raise it (LimitNOFILE= in the systemd unit, ulimit -n) or lower --max-connections to {fits}",
                 limit=soft, hard=hard, connections=connections, reserved=RESERVED,
                 fits=max(1, (soft - RESERVED) // listeners))
    return int(soft)
