"""The text log lines are Twisted's own, byte for byte, with the time prefix made once per second."""
from __future__ import annotations

import io

from twisted.logger import LogLevel, textFileLogObserver
from twisted.trial.unittest import TestCase

from uptrakitd.observability.logs import text_observer


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


class ControlCharacterTests(TestCase):
    def test_a_peers_newline_escape_or_carriage_return_never_starts_a_line_or_reaches_the_terminal(self) -> None:
        from twisted.logger import Logger
        out = io.StringIO()
        log = Logger(observer=text_observer(out), namespace="test")
        log.info("enrolled {host}", host="h\n2026-12-03T00:00:00+0000 [uptrakitd#info] admin token created\x1b[2J\rX\u2028")
        log.info("plain {host}", host="ok-host")
        lines = out.getvalue().splitlines()
        self.assertEqual(len(lines), 2, lines)
        self.assertIn(r"enrolled h\n2026-12-03T00:00:00+0000 [uptrakitd#info] admin token created\x1b[2J\rX\u2028",
                      lines[0])
        self.assertNotIn("\x1b", out.getvalue())
        self.assertTrue(lines[1].endswith("plain ok-host"))

    def test_names_with_control_characters_are_refused_and_plain_ones_pass(self) -> None:
        from uptrakitd.printable import escape_controls, has_control
        for text in ("a\tb", "a\nb", "\x00", "\x7f", "\x85", "\u2028", "\x1b[31m",
                     "vm-\u202elive", "\u2066x\u2069", "a\u200bb", "\ufeff", "\U000e0041"):   # bidi, zero-width, BOM, tag
            self.assertTrue(has_control(text), repr(text))
        import unicodedata
        every_format_character = [chr(c) for c in range(0x110000) if unicodedata.category(chr(c)) == "Cf"]
        self.assertEqual([c for c in every_format_character if not has_control(c)], [])
        self.assertEqual(escape_controls("vm-\u202elive"), "vm-\\u202elive")
        for text in ("host-1.example", "Büro Köln", "日本", "a b"):
            self.assertFalse(has_control(text), text)
            self.assertEqual(escape_controls(text), text)


class AcceptErrorThrottleTests(TestCase):
    def test_one_accept_error_line_per_ten_seconds_says_how_many_were_left_out(self) -> None:
        from uptrakitd.observability.logs import AcceptErrorThrottle
        out = io.StringIO()
        throttle = AcceptErrorThrottle(text_observer(out))

        def accept_error(when: float) -> dict:
            return {"log_format": "Could not accept new connection ({acceptError})", "acceptError": "EMFILE",
                    "log_time": when, "log_level": LogLevel.info, "log_namespace": "twisted.internet.tcp.Port"}
        for i in range(4000):
            throttle(accept_error(1000 + i / 1000))   # 4,000 in 4 s
        throttle({"log_format": "something else", "log_time": 1002.0, "log_level": LogLevel.info})
        throttle(accept_error(1011))
        lines = out.getvalue().splitlines()
        self.assertEqual(len(lines), 3, lines)
        self.assertTrue(lines[0].endswith("Could not accept new connection (EMFILE)"), lines[0])
        self.assertTrue(lines[1].endswith("something else"))
        self.assertIn("(EMFILE) (3999 more accept errors in the last 10 s were not logged)", lines[2])


class OpenFileLimitTests(TestCase):
    def test_the_soft_limit_is_raised_toward_the_caps_and_what_does_not_fit_is_said(self) -> None:
        import resource
        from twisted.logger import globalLogPublisher
        from uptrakitd.listen.fdlimit import fit_open_file_limit
        said: list[str] = []

        def observe(event: dict) -> None:
            from twisted.logger import formatEvent
            said.append(formatEvent(event))
        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        limits = {resource.RLIMIT_NOFILE: (1024, 2048)}
        got = fit_open_file_limit(4096, 1, limits.__getitem__, limits.__setitem__)
        self.assertEqual((got, limits[resource.RLIMIT_NOFILE]), (2048, (2048, 2048)))
        self.assertIn("raised the open-file limit from 1024 to 2048", said[0])
        self.assertIn("lower --max-connections to 1920", said[1])
        said.clear()
        limits = {resource.RLIMIT_NOFILE: (1024, resource.RLIM_INFINITY)}
        self.assertEqual(fit_open_file_limit(4096, 2, limits.__getitem__, limits.__setitem__), 8192 + 128)
        self.assertEqual(len(said), 1, said)
        said.clear()
        limits = {resource.RLIMIT_NOFILE: (65536, 65536)}
        self.assertEqual(fit_open_file_limit(4096, 2, limits.__getitem__, limits.__setitem__), 65536)
        self.assertEqual(said, [])
