"""The text log lines are Twisted's own, byte for byte, with the time prefix made once per second."""
from __future__ import annotations

import io

from twisted.logger import LogLevel, textFileLogObserver
from twisted.trial.unittest import TestCase

from uptrakitd.logs import text_observer


class TextLineTests(TestCase):
    def test_lines_match_twisteds_across_seconds_and_without_a_time(self) -> None:
        ours, twisteds = io.StringIO(), io.StringIO()
        events = [{"log_time": t, "log_level": LogLevel.info, "log_namespace": "uptrakitd.channel.hub",
                   "log_format": "service {service} connected", "service": f"s{i}"}
                  for i, t in enumerate((1795805378.2, 1795805378.9, 1795805379.1, 1795805379.0, 1795809000.5))]
        events.append({"log_level": LogLevel.warn, "log_namespace": "x", "log_format": "no time"})
        mine, reference = text_observer(ours), textFileLogObserver(twisteds)
        for event in events:
            mine(dict(event))
            reference(dict(event))
        self.assertEqual(ours.getvalue(), twisteds.getvalue())
        self.assertEqual(len(ours.getvalue().splitlines()), len(events))
        self.assertIn("[uptrakitd.channel.hub#info] service s4 connected", ours.getvalue())
