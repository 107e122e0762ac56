"""Autobahn's per-connection debug formatting is deferred, and still right when a debug line is written."""
from __future__ import annotations

from twisted.logger import formatEvent
from twisted.trial.unittest import TestCase

from uptrakitd.channel.autobahn_debug import defer_debug_formatting


class LazyFormattingTests(TestCase):
    def test_debug_values_format_only_when_written_and_timings_still_print(self):
        import autobahn.websocket.protocol as protocol
        defer_debug_formatting()
        settings = [("autoPingInterval", 30, "ServiceChannelFactory")]
        value = protocol.pformat(settings)
        self.assertFalse(isinstance(value, str), "nothing is formatted until the line is written")
        self.assertEqual(formatEvent({"log_format": "{attrs}", "attrs": value}),
                         "[('autoPingInterval', 30, 'ServiceChannelFactory')]")
        timings = protocol.Timings()
        self.assertEqual(str(timings), "{}")
