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
        self.calls: list[tuple] = []
        self.ran: list[str] = []

    def run(self, operation, *args):
        d: Deferred = Deferred()
        self.pending.append((args[-1], d))
        self.calls.append((operation, args))
        return d

    def answer(self, row) -> None:
        pending, self.pending = self.pending, []
        for _, d in pending:
            d.callback(row)

    def execute(self, row) -> None:
        """Each queued read's turn on the store thread: the operation runs (or skips itself) for real."""
        calls, self.calls = self.calls, []
        pending, self.pending = self.pending, []

        def load(conn, key):
            self.ran.append(key)
            return row
        for (operation, args), (_, d) in zip(calls, pending):
            wanted, _, key = args
            d.callback(operation(None, wanted, load, key))


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

    def test_a_read_whose_requests_all_gave_up_is_skipped_when_its_turn_comes(self) -> None:
        waiting = self.sync.catch_up((0x5, "svc"))
        self.clock.advance(CATCH_UP_SECONDS + 0.1)      # the store is seconds behind: the request gives up
        self.failureResultOf(waiting)
        self.reads.execute({"row": 1})
        self.assertEqual(self.reads.ran, [], "nobody waits for it: not read")
        self.sync.catch_up((0x5, "svc"))
        self.assertEqual(self.sync.catch_up_reads, 2, "skipped is not 'not found': a later request reads again")
        self.reads.execute({"row": 1})
        self.assertEqual(len(self.reads.ran), 2, "wanted: the certificate and the service are read")
        self.assertIn("svc", self.reads.ran)

    def test_a_service_not_found_is_not_read_again_whatever_serial_names_it(self) -> None:
        self.sync.catch_up((0x1, "ghost"))
        self.reads.answer(None)
        for serial in range(2, 200):   # made-up serials naming the same made-up service
            self.assertTrue(self.sync.catch_up((serial, "ghost")).called)
        self.assertEqual(self.sync.catch_up_reads, 1)

    def test_at_most_so_many_pairs_are_read_at_once(self) -> None:
        from uptrakitd.cluster import MAX_CATCH_UPS
        waits = [self.sync.catch_up((serial, None)) for serial in range(MAX_CATCH_UPS + 10)]
        self.assertEqual(self.sync.catch_up_reads, MAX_CATCH_UPS)
        self.assertEqual([w.called for w in waits[MAX_CATCH_UPS:]], [True] * 10, "decided at once, not queued")
        self.assertEqual(self.sync.catch_ups_refused, 10)
        self.reads.answer({"row": 1})
        self.sync.catch_up((10_000, None))
        self.assertEqual(self.sync.catch_up_reads, MAX_CATCH_UPS + 1, "room again once the reads are done")
