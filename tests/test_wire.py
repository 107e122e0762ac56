"""The channel envelope: any frame is accepted or refused with ProtocolViolation, nothing else."""
from __future__ import annotations

import json

from hypothesis import given, settings, strategies as st
from twisted.trial.unittest import TestCase

from uptrakitd.channel import wire

JSONISH = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                       lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10),
                                                                                        children, max_size=4),
                       max_leaves=20)


class EnvelopeTests(TestCase):
    @settings(max_examples=500, deadline=None)
    @given(st.binary(max_size=200), st.integers(min_value=1, max_value=5))
    def test_random_bytes(self, payload, seq):
        try:
            wire.decode(payload, seq)
        except wire.ProtocolViolation:
            pass

    @settings(max_examples=500, deadline=None)
    @given(JSONISH, st.integers(min_value=1, max_value=3))
    def test_random_json(self, value, seq):
        try:
            message = wire.decode(json.dumps(value).encode(), seq)
        except wire.ProtocolViolation:
            return
        self.assertEqual((message["protocol_version"], message["seq"]), (1, seq))

    def test_deep_nesting_is_refused_not_crashing(self):
        with self.assertRaises(wire.ProtocolViolation):
            wire.decode(b"[" * 100000 + b"]" * 100000, 1)

    def test_roundtrip_and_field_checks(self):
        message = wire.decode(wire.encode("ping", 3, service_ts=5), 3)
        self.assertEqual(wire.field(message, "service_ts", int), 5)
        self.assertRaises(wire.ProtocolViolation, wire.field, message, "csr_pem", str)
        self.assertRaises(wire.ProtocolViolation, wire.field, {"type": "x", "a": True}, "a", int)
        self.assertRaises(wire.ProtocolViolation, wire.decode, wire.encode("ping", 3), 4)
