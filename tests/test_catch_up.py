"""The cross-controller catch-up read (cluster.ClusterSync.catch_up): shared while it runs, not repeated
for a pair that was just looked for and not found. The reads go through a store the test answers."""
from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from uptrakitd.cluster import CATCH_UP_SECONDS, ClusterSync


class Reads:
    """A store whose reads wait until the test answers them."""

    def __init__(self) -> None:
        self.pending: list[tuple[str, Deferred]] = []

    def run(self, operation, key):
        d: Deferred = Deferred()
        self.pending.append((key, d))
        return d

    def answer(self, row) -> None:
        pending, self.pending = self.pending, []
        for _, d in pending:
            d.callback(row)


class Adopter:
    def __init__(self) -> None:
        self.adopted: list[str] = []

    def adopt_certificate(self, key, row):
        self.adopted.append(key)

    def refresh(self, key, values):
        self.adopted.append(key)


class CatchUpTests(TestCase):
    def setUp(self) -> None:
        self.clock, self.reads, self.adopter = Clock(), Reads(), Adopter()
        self.sync = ClusterSync(self.adopter, self.adopter, None, None, None, None, self.clock, self.reads)

    def test_requests_for_the_same_pair_share_one_read_and_all_wait_for_it(self) -> None:
        pair = (0x1234, "3f0b3c1e-7a4e-4b8e-9a51-0d1e2f3a4b5c")
        waits = [self.sync.catch_up(pair) for _ in range(50)]
        self.assertEqual(self.sync.catch_up_reads, 1)
        self.assertEqual(len(self.reads.pending), 2, "one certificate read and one service read")
        self.assertFalse(any(w.called for w in waits))
        self.reads.answer({"row": 1})
        self.assertTrue(all(w.called for w in waits))
        self.assertEqual(len(self.adopter.adopted), 2)
        self.sync.catch_up(pair)
        self.assertEqual(self.sync.catch_up_reads, 2, "found: a later request may read again")

    def test_a_pair_not_found_is_not_read_again_for_a_while(self) -> None:
        pair = (0x99, None)
        first = self.sync.catch_up(pair)
        self.reads.answer(None)
        self.assertTrue(first.called)
        for _ in range(100):
            self.assertTrue(self.sync.catch_up(pair).called, "answered at once from the recent miss")
        self.assertEqual(self.sync.catch_up_reads, 1)
        self.clock.advance(CATCH_UP_SECONDS + 0.1)
        self.sync.catch_up(pair)
        self.assertEqual(self.sync.catch_up_reads, 2)

    def test_a_read_that_never_answers_lets_the_request_go_after_the_timeout(self) -> None:
        waiting = self.sync.catch_up((0x7, None))
        self.clock.advance(CATCH_UP_SECONDS + 0.1)
        self.assertTrue(waiting.called)
        self.failureResultOf(waiting)
