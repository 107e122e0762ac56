"""Header parsers against real proxy captures, plus property tests: they only raise MalformedHeader."""
from __future__ import annotations

import base64
import json
from urllib.parse import quote, quote_plus

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from hypothesis import given, settings, strategies as st
from twisted.trial.unittest import TestCase

from uptrakitd.trust.dn import common_name
from uptrakitd.trust.headers import ForwardedClientCert, MalformedHeader, parse_cert_header, parse_info_header

from .helpers import DATA

V = json.loads((DATA / "real-proxies.json").read_text())
PEM = (DATA / "lab-client.pem").read_bytes()
DER = x509.load_pem_x509_certificate(PEM).public_bytes(serialization.Encoding.DER)
SERIAL = V["serial_int"]


class RealCaptureTests(TestCase):
    def test_every_certificate_encoding_gives_the_same_der(self):
        values = {
            "nginx $ssl_client_escaped_cert": V["nginx"]["ssl_client_escaped_cert"],
            "haproxy ssl_c_der,base64": V["haproxy"]["ssl_c_der,base64"],
            "caddy certificate_der_base64": V["caddy"]["certificate_der_base64"],
            "RFC 9440": ":" + base64.b64encode(DER).decode() + ":",
            "envoy Cert= (percent-encoded PEM)": quote(PEM.decode(), safe="-_.~"),
            "traefik >= 2.9.4 (PEM body, no armour)": base64.b64encode(DER).decode(),
            "traefik < 2.9.4 (escaped)": quote(base64.b64encode(DER).decode(), safe=""),
            "traefik chain": base64.b64encode(DER).decode() + "," + base64.b64encode(b"\x30\x82other").decode(),
            "raw PEM": PEM.decode().replace("\n", " "),
        }
        for name, value in values.items():
            self.assertEqual(parse_cert_header(value), DER, name)

    def test_plus_in_pem_survives_percent_decoding(self):
        # unquote, never unquote_plus: base64 '+' must stay '+'
        self.assertIn("+", base64.b64encode(DER).decode())
        self.assertEqual(parse_cert_header(quote(PEM.decode(), safe="-_.~+")), DER)

    def test_dns_in_every_form_give_the_same_cn(self):
        for dn in (V["nginx"]["ssl_client_s_dn"], V["nginx"]["ssl_client_s_dn_legacy"],
                   V["haproxy"]["ssl_c_s_dn(,0,rfc2253)"], V["haproxy"]["ssl_c_s_dn"], V["caddy"]["subject"]):
            self.assertEqual(common_name(dn), 'client "A"', dn)
        for dn in (V["nginx"]["ssl_client_i_dn"], V["haproxy"]["ssl_c_i_dn"], V["caddy"]["issuer"]):
            self.assertEqual(common_name(dn), "Lab Root CA", dn)

    def test_hex_and_decimal_serials_are_the_same_integer(self):
        n = V["nginx"]
        nginx = parse_info_header(f'Subject="{n["ssl_client_s_dn"]}";Issuer="{n["ssl_client_i_dn"]}";'
                                  f'SerialNumber="{n["ssl_client_serial"]}"')
        self.assertEqual(nginx.serial, SERIAL)
        self.assertEqual(common_name(nginx.subject), 'client "A"')
        self.assertEqual(common_name(nginx.issuer), "Lab Root CA")
        colons = ":".join(n["ssl_client_serial"][i:i + 2] for i in range(0, 40, 2)).lower()
        self.assertEqual(parse_info_header(f'Subject="CN=x";Issuer="CN=y";SerialNumber="00{colons}"').serial, SERIAL)
        c = V["caddy"]
        traefik = quote_plus(f'Subject="{c["subject"]}";Issuer="{c["issuer"]}";SerialNumber="{c["serial"]}";'
                             f'NB="1764183537";NA="1795719537";SAN="client.example"')
        parsed = parse_info_header(traefik)
        self.assertEqual(parsed.serial, SERIAL)
        self.assertEqual(common_name(parsed.subject), 'client "A"')
        self.assertEqual(parsed.dns, ("client.example",))

    def test_haproxy_default_slash_dn_inside_quotes_is_ambiguous(self):
        h = V["haproxy"]
        with self.assertRaises(MalformedHeader):
            parse_info_header(f'Subject="{h["ssl_c_s_dn"]}";Issuer="{h["ssl_c_i_dn"]}";'
                              f'SerialNumber="{h["ssl_c_serial,hex"]}"')

    def test_xfcc_last_element_cert_wins(self):
        cert = quote(PEM.decode(), safe="-_.~")
        value = (f'By=spiffe://a;Hash=11;Subject="CN=far away";URI=spiffe://x,'
                 f'By=spiffe://b;Hash=22;Cert="{cert}";Subject="CN=client, with comma";URI=spiffe://y')
        parsed = parse_info_header(value)
        self.assertEqual(parsed.cert_der, DER)
        self.assertEqual(parsed.subject, "CN=client, with comma")
        self.assertEqual(parsed.uris, ("spiffe://y",))

    def test_xfcc_subject_only(self):
        parsed = parse_info_header('Hash=abc;Subject="CN=x,O=y";URI=spiffe://t/service/1')
        self.assertEqual((parsed.subject, parsed.cert_der, parsed.serial), ("CN=x,O=y", None, None))

    def test_xfcc_duplicate_keys_rejected(self):
        for value in ('Hash=1;Hash=2;Subject="CN=a"', 'Subject="CN=a";Subject="CN=b";By=x',
                      'By=x;Cert=abc;Cert=def'):
            self.assertRaises(MalformedHeader, parse_info_header, value, "xfcc")

    def test_malformed(self):
        for value in ('Subject="unterminated', 'Subject=a"b', "", "   ", 'Subject="a";SerialNumber="xyz"',
                      "no equals sign", 'Subject="a",Subject="b"'):
            self.assertRaises(MalformedHeader, parse_info_header, value, "kv")
        for value in ("", ":notb64!:", "%zz", "-----BEGIN CERTIFICATE-----nothing", "AAAA", ":" + "A" * 10):
            self.assertRaises(MalformedHeader, parse_cert_header, value)


KEYS = st.sampled_from(["By", "Hash", "Cert", "Chain", "Subject", "URI", "DNS", "subject", "CERT", "x"])
TEXT = st.text(alphabet=st.sampled_from(list('abcXYZ=;,"\\%+/ 0123456789:-')) , max_size=40)


class PropertyTests(TestCase):
    @settings(max_examples=500, deadline=None)
    @given(st.text(max_size=300), st.sampled_from(["auto", "kv", "xfcc", "traefik"]))
    def test_info_parser_only_raises_malformed(self, value, fmt):
        try:
            result = parse_info_header(value, fmt)
        except MalformedHeader:
            return
        self.assertIsInstance(result, ForwardedClientCert)

    @settings(max_examples=500, deadline=None)
    @given(st.lists(st.tuples(KEYS, TEXT), max_size=8))
    def test_structured_garbage_only_raises_malformed(self, pairs):
        value = ";".join(f"{k}={v}" for k, v in pairs)
        for fmt in ("auto", "kv", "xfcc", "traefik"):
            try:
                parse_info_header(value, fmt)
            except MalformedHeader:
                pass

    @settings(max_examples=500, deadline=None)
    @given(st.text(max_size=300))
    def test_cert_parser_only_raises_malformed(self, value):
        try:
            der = parse_cert_header(value)
        except MalformedHeader:
            return
        self.assertIsInstance(der, bytes)

    @settings(max_examples=500, deadline=None)
    @given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=60))
    def test_quoted_subject_cannot_inject_cert_or_change_element(self, evil):
        # Whatever the Subject holds, escaped as Envoy escapes it, the parse sees one element whose
        # only Cert is the real one.
        escaped = evil.replace("\\", "\\\\").replace('"', '\\"')
        cert = quote(PEM.decode(), safe="-_.~")
        value = f'By=spiffe://far;Subject="{escaped}",By=spiffe://near;Cert="{cert}";Subject="{escaped}"'
        parsed = parse_info_header(value, "xfcc")
        self.assertEqual(parsed.cert_der, DER)
        self.assertEqual(parsed.subject, evil)
        value = f'Hash=1;Subject="{escaped}"'
        parsed = parse_info_header(value, "xfcc")
        self.assertIsNone(parsed.cert_der)
        self.assertEqual(parsed.subject, evil)

    @settings(max_examples=300, deadline=None)
    @given(st.text(max_size=200))
    def test_common_name_never_raises(self, dn):
        result = common_name(dn)
        self.assertTrue(result is None or isinstance(result, str))
