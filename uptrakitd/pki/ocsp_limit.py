"""How many answers signed per request (a nonce, or a serial we never issued) one client address may ask for.

Every other OCSP answer is signed once and served from the cache, whoever asks. These two kinds cost a
signature each time (~0.16 ms of the reactor delegated, ~0.36 ms with the CA's P-384 key), so without a
limit anyone who can reach the PKI port decides how much of the reactor goes to signing. Each address
(IPv6: each /64, which one host usually holds whole) has a token bucket of `rate` a second that holds up
to two seconds' worth; an empty bucket gets `tryLater`, unsigned and nearly free.
"""
from __future__ import annotations

import ipaddress
from collections import OrderedDict
from typing import Callable

from twisted.logger import Logger

log = Logger()

MAX_ADDRESSES = 10_000   # buckets kept; the least recently seen goes first
LOG_EVERY = 60.0         # seconds between two log lines about the same address


class SigningRateLimit:
    """Token buckets by client address; `rate` 0 lets everything through."""

    def __init__(self, rate: int, clock: Callable[[], float], max_addresses: int = MAX_ADDRESSES) -> None:
        self.rate = rate
        self.burst = 2 * rate
        self.clock = clock
        self.max_addresses = max_addresses
        self._buckets: OrderedDict[str, list[float]] = OrderedDict()   # key -> [tokens, last refill, last logged]
        self.refused = 0

    def __len__(self) -> int:
        return len(self._buckets)

    @staticmethod
    def key(address: str) -> str:
        """The bucket an address counts against: itself (IPv4-mapped IPv6 as IPv4), or its /64 for IPv6."""
        try:
            parsed = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return address
        if isinstance(parsed, ipaddress.IPv6Address):
            if parsed.ipv4_mapped is None:
                return str(ipaddress.IPv6Network((parsed, 64), strict=False))
            parsed = parsed.ipv4_mapped
        return str(parsed)

    def allow(self, address: str | None) -> bool:
        """Take a token for `address`; False when its bucket is empty (then answer tryLater)."""
        if self.rate <= 0 or address is None:
            return True
        key = self.key(address)
        now = self.clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = [float(self.burst), now, -LOG_EVERY]
            while len(self._buckets) > self.max_addresses:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
            bucket[0] = min(float(self.burst), bucket[0] + (now - bucket[1]) * self.rate)
            bucket[1] = now
        if bucket[0] >= 1:
            bucket[0] -= 1
            return True
        self.refused += 1
        if now - bucket[2] >= LOG_EVERY:
            bucket[2] = now
            log.warn("OCSP: {client} asks for more than {rate} signed answers a second (nonce, or serials never "
                     "issued); the rest get tryLater (--ocsp-nonce-rate)", client=key, rate=self.rate)
        return False


class SigningBudget:
    """A share of one core for signing OCSP answers, all clients together.

    The per-address limit holds one address; fifty addresses each under it still took 84-100 % of the
    reactor (3,177-3,609 signed answers a second). Every signature's CPU time (`cpu()`, this thread's)
    is taken from a bucket refilled at `share` seconds a second, holding one second's worth; while it is
    empty, answers that would be signed per request get `tryLater`. Cached answers are never refused, but
    what building them costs is counted too. `share` 0 lets everything through.
    """

    def __init__(self, share: float, clock: Callable[[], float], cpu: Callable[[], float]) -> None:
        self.share = share
        self.clock = clock
        self.cpu = cpu
        self.tokens, self.stamp = share, clock()
        self.refused = 0
        self.used = 0.0   # CPU seconds signing, in all
        self._logged = -LOG_EVERY

    def allow(self) -> bool:
        """Whether one more answer may be signed per request now."""
        if self.share <= 0:
            return True
        now = self.clock()
        self.tokens = min(self.share, self.tokens + (now - self.stamp) * self.share)
        self.stamp = now
        if self.tokens > 0:
            return True
        self.refused += 1
        if now - self._logged >= LOG_EVERY:
            self._logged = now
            log.warn("OCSP: signing answers per request takes more than {percent:.0f} % of a core, all clients "
                     "together; the rest get tryLater (--ocsp-signing-share)", percent=self.share * 100)
        return False

    def spent(self, seconds: float) -> None:
        """A signature took `seconds` of CPU."""
        self.used += seconds
        if self.share > 0:
            self.tokens -= seconds
