"""Client address behind trusted proxies (SPEC §3.2)."""
from __future__ import annotations

from hypothesis import given, strategies as st
from twisted.trial.unittest import TestCase

from uptrakitd.config import parse_network
from uptrakitd.trust.proxies import forwarded_for_values, is_trusted, parse_address, resolve_client_ip

NETS = [parse_network("10.0.0.0/8"), parse_network("2001:db8::/32"), parse_network("127.0.0.2")]


class ResolveTests(TestCase):
    def xff(self, *values, header="X-Forwarded-For", peer="10.0.0.1"):
        return resolve_client_ip(peer, header, list(values), NETS)

    def test_client_then_trusted_hop(self):
        self.assertEqual(self.xff("203.0.113.7, 10.1.1.1"), "203.0.113.7")

    def test_spoofed_leftmost_with_untrusted_hop_gives_the_hop(self):
        self.assertEqual(self.xff("1.2.3.4, 198.51.100.9, 10.1.1.1"), "198.51.100.9")

    def test_all_trusted_gives_leftmost(self):
        self.assertEqual(self.xff("10.9.9.9, 10.1.1.1"), "10.9.9.9")

    def test_several_copies_are_joined_in_order(self):
        self.assertEqual(self.xff("1.2.3.4", "198.51.100.9, 10.1.1.1"), "198.51.100.9")

    def test_missing_or_garbage_gives_peer(self):
        self.assertEqual(self.xff(), "10.0.0.1")
        self.assertEqual(self.xff("not-an-ip"), "10.0.0.1")
        self.assertEqual(self.xff("garbage, 10.1.1.1"), "10.0.0.1")
        # garbage left of the first untrusted hop cannot matter
        self.assertEqual(self.xff("garbage, 203.0.113.7"), "203.0.113.7")

    def test_ports_brackets_and_mapped_addresses(self):
        self.assertEqual(self.xff("[2001:db9::1]:443"), "2001:db9::1")
        self.assertEqual(self.xff("203.0.113.7:5555"), "203.0.113.7")
        self.assertEqual(self.xff("::ffff:203.0.113.7"), "203.0.113.7")
        self.assertEqual(self.xff("2001:DB9:0:0::1"), "2001:db9::1")

    def test_forwarded(self):
        value = 'for=192.0.2.60;proto=http;by=203.0.113.43, for="[2001:db9::17]:4711", for=10.0.0.5'
        self.assertEqual(self.xff(value, header="Forwarded"), "2001:db9::17")
        self.assertEqual(self.xff('for=unknown, for="_hidden", for=198.51.100.1, for=unknown',
                                  header="Forwarded"), "198.51.100.1")
        self.assertEqual(forwarded_for_values('For="192.0.2.1:80";proto=https'), ["192.0.2.1"])

    def test_single_address_headers(self):
        for header in ("X-Real-IP", "True-Client-IP", "CF-Connecting-IP"):
            self.assertEqual(self.xff("203.0.113.7", header=header), "203.0.113.7")
            self.assertEqual(self.xff("nonsense", header=header), "10.0.0.1")

    def test_is_trusted(self):
        self.assertTrue(is_trusted("10.2.3.4", NETS))
        self.assertTrue(is_trusted("127.0.0.2", NETS))
        self.assertFalse(is_trusted("127.0.0.1", NETS))
        self.assertFalse(is_trusted("garbage", NETS))
        self.assertEqual(parse_address("::ffff:10.0.0.1"), "10.0.0.1")

    @given(st.lists(st.one_of(st.ip_addresses().map(str), st.text(max_size=15)), max_size=6))
    def test_result_is_always_the_peer_or_an_untrusted_listed_address_or_leftmost(self, hops):
        result = self.xff(", ".join(hops))
        canonical = [parse_address(h) for h in hops]
        self.assertTrue(result == "10.0.0.1" or result in canonical)
