"""The OCSP responder in memory: any bytes get a well-formed OCSP response; GET decoding; caching."""
from __future__ import annotations

import base64
import datetime
from urllib.parse import quote

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp
from hypothesis import given, settings, strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from uptrakitd.pki.state import CaState, CertRecord
from uptrakitd.pki.ca import CaGeneration, create_ca
from uptrakitd.pki.signer import KeySigner
from uptrakitd.pki.issue import issue_client_certificate
from uptrakitd.pki.ocsp import OcspDecodeError, OcspResponder, decode_get_path

from .helpers import make_csr

NOW = datetime.datetime(2026, 11, 26, 12, 0, tzinfo=datetime.timezone.utc)


def responder():
    signer = KeySigner.generate()
    cert = create_ca(1, None, NOW - datetime.timedelta(days=1), signer)
    ca = CaGeneration(1, cert, signer)
    state = CaState()
    state.add_generation(ca)
    sid = "3f0b3c1e-7a4e-4b8e-9a51-0d1e2f3a4b5c"
    issued = issue_client_certificate(ca, x509.load_pem_x509_csr(make_csr(sid)[0]), sid, "agent", "uptrakit.local",
                                      datetime.timedelta(hours=1), None, NOW)
    state.add_record(CertRecord(issued.serial, sid, "client", 1, 0, 2**40))
    clock = Clock()
    clock.advance(NOW.timestamp())
    return OcspResponder(state, clock), ca, issued


R, CA, ISSUED = responder()


def request_der(serial=None, alg=hashes.SHA1(), nonce=None, ca=None, issued=None):
    ca, issued = ca or CA, issued or ISSUED
    if serial is None:
        builder = ocsp.OCSPRequestBuilder().add_certificate(issued.cert, ca.cert, alg)
    else:
        good = ocsp.load_der_ocsp_request(request_der(alg=alg, ca=ca, issued=issued))
        builder = ocsp.OCSPRequestBuilder().add_certificate_by_hash(good.issuer_name_hash, good.issuer_key_hash,
                                                                    serial, alg)
    if nonce is not None:
        builder = builder.add_extension(x509.OCSPNonce(nonce), critical=False)
    return builder.build().public_bytes(serialization.Encoding.DER)


class ResponderTests(TestCase):
    def test_a_negative_serial_is_a_malformed_request_not_an_internal_error(self):
        der = request_der(serial=0x5A5A5A5A5A5A5A5A)
        negative = der.replace(b"\x02\x08\x5a\x5a", b"\x02\x08\xda\x5a", 1)
        self.assertNotEqual(negative, der)
        self.assertLess(ocsp.load_der_ocsp_request(negative).serial_number, 0)
        answer = R.answer(negative)
        self.assertEqual(answer.status, "malformed")
        self.assertEqual(ocsp.load_der_ocsp_response(answer.der).response_status,
                         ocsp.OCSPResponseStatus.MALFORMED_REQUEST)
        self.assertEqual(self.flushLoggedErrors(), [])

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=600))
    def test_random_bytes_get_a_well_formed_response(self, data):
        answer = R.answer(data)
        parsed = ocsp.load_der_ocsp_response(answer.der)
        self.assertIsInstance(parsed.response_status, ocsp.OCSPResponseStatus)

    @settings(max_examples=100, deadline=None)
    @given(st.integers(min_value=1, max_value=2**159), st.sampled_from([hashes.SHA1(), hashes.SHA256()]),
           st.one_of(st.none(), st.binary(min_size=1, max_size=32)))
    def test_valid_but_odd_requests_are_answered(self, serial, alg, nonce):
        parsed = ocsp.load_der_ocsp_response(R.answer(request_der(serial, alg, nonce)).der)
        self.assertEqual(parsed.response_status, ocsp.OCSPResponseStatus.SUCCESSFUL)
        expected = ocsp.OCSPCertStatus.GOOD if serial == ISSUED.serial else ocsp.OCSPCertStatus.UNKNOWN
        self.assertEqual(parsed.certificate_status, expected)
        if nonce is not None:
            self.assertEqual(parsed.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce, nonce)

    @settings(max_examples=200, deadline=None)
    @given(st.binary(max_size=300), st.integers(min_value=0, max_value=3))
    def test_mutated_requests_never_crash(self, noise, where):
        der = bytearray(request_der())
        for i, b in enumerate(noise[:8]):
            der[(where * 17 + i * 7) % len(der)] ^= b
        parsed = ocsp.load_der_ocsp_response(R.answer(bytes(der)).der)
        # answer() turns an exception into internalError (and logs it): a mutation must never get there
        self.assertNotEqual(parsed.response_status, ocsp.OCSPResponseStatus.INTERNAL_ERROR)

    def test_nonce_gets_no_store_and_no_nonce_is_cached(self):
        r, ca, issued = responder()
        a = r.answer(request_der(nonce=b"12345678", ca=ca, issued=issued))
        self.assertEqual(a.headers["Cache-Control"], "no-store")
        first = r.answer(request_der(ca=ca, issued=issued))
        second = r.answer(request_der(ca=ca, issued=issued))
        self.assertEqual(first.der, second.der, "served from the cache")
        self.assertIn("max-age=3600", first.headers["Cache-Control"])

    def test_revocation_invalidates_cache(self):
        r, ca, issued = responder()
        self.assertEqual(r.answer(request_der(ca=ca, issued=issued)).status, "good")
        record = r.state.records[issued.serial]
        record.revoked_at, record.reason = int(NOW.timestamp()), "keyCompromise"
        r.invalidate(issued.serial)
        answer = r.answer(request_der(ca=ca, issued=issued))
        parsed = ocsp.load_der_ocsp_response(answer.der)
        self.assertEqual(parsed.certificate_status, ocsp.OCSPCertStatus.REVOKED)
        self.assertEqual(parsed.revocation_reason, x509.ReasonFlags.key_compromise)


class FastPathTests(TestCase):
    """The channel's repeated-GET answers: reused within a second, never after the answer changed."""

    def test_a_response_is_reused_within_its_second_and_never_outlives_its_answer(self):
        from uptrakitd.web.ocsp_fast import OcspFastPath
        r, ca, issued = responder()
        fast = OcspFastPath(r, r.clock)
        path = b"/api/v1/pki/ocsp/" + quote(base64.b64encode(request_der(ca=ca, issued=issued)).decode(),
                                            safe="").encode()

        def status(response: bytes) -> ocsp.OCSPCertStatus:
            return ocsp.load_der_ocsp_response(response.partition(b"\r\n\r\n")[2]).certificate_status
        fast.remember(path, r.answer(request_der(ca=ca, issued=issued)))
        first = fast.repeated_get(path, b"HTTP/1.0", True)
        self.assertIs(fast.repeated_get(path, b"HTTP/1.0", True), first, "the same second: the same bytes")
        self.assertIn(b"Cache-Control: max-age=3600,", first)
        kept = fast.repeated_get(path, b"HTTP/1.1", False)
        self.assertTrue(kept.startswith(b"HTTP/1.1 200 OK") and b"Connection: close" not in kept)
        self.assertIn(b"Connection: close", fast.repeated_get(path, b"HTTP/1.1", True))
        r.clock.advance(1)
        later = fast.repeated_get(path, b"HTTP/1.0", True)
        self.assertIn(b"Cache-Control: max-age=3599,", later, "a new second: a new Date and max-age")
        # a revocation in the same second, and the ordinary route (a GET the channel left to twisted.web)
        # remembers the new answer over the old entry: never the old bytes
        record = r.state.records[issued.serial]
        record.revoked_at, record.reason = int(r.clock.seconds()), "keyCompromise"
        r.invalidate(issued.serial)
        fast.remember(path, r.answer(request_der(ca=ca, issued=issued)))
        self.assertEqual(status(fast.repeated_get(path, b"HTTP/1.0", True)), ocsp.OCSPCertStatus.REVOKED)
        # the responder forgets everything (a rotation): the entry is not used, whatever its second
        r.invalidate()
        self.assertIsNone(fast.repeated_get(path, b"HTTP/1.0", True))


class NonceTemplateTests(TestCase):
    """Nonce answers come from a template after the first: every field the same as cryptography builds it."""

    def reference(self, r, der):
        """The answer cryptography builds itself (no template), by a responder with the same state and signer."""
        from uptrakitd.pki import ocsp_nonce
        from uptrakitd.pki.ocsp import OcspResponder
        built = OcspResponder(r.state, r.clock)
        built.delegated = r.delegated
        self.patch(ocsp_nonce, "MIN_NONCE", 10**6)
        try:
            return ocsp.load_der_ocsp_response(built.answer(der).der)
        finally:
            self.patch(ocsp_nonce, "MIN_NONCE", 8)

    def same(self, answer, reference, signer):
        from cryptography.hazmat.primitives.asymmetric.ec import ECDSA
        for field in ("response_status", "certificate_status", "serial_number", "this_update_utc", "next_update_utc",
                      "revocation_time_utc", "revocation_reason", "responder_key_hash", "responder_name",
                      "hash_algorithm", "issuer_key_hash", "issuer_name_hash", "signature_algorithm_oid"):
            self.assertEqual(getattr(answer, field), getattr(reference, field), field)
        self.assertEqual([(e.oid, e.critical, e.value.nonce) for e in answer.extensions],
                         [(e.oid, e.critical, e.value.nonce) for e in reference.extensions])
        self.assertEqual([c.public_bytes(serialization.Encoding.DER) for c in answer.certificates],
                         [c.public_bytes(serialization.Encoding.DER) for c in reference.certificates])
        self.assertLessEqual(abs((answer.produced_at_utc - reference.produced_at_utc).total_seconds()), 2)
        signer.public_key().verify(answer.signature, answer.tbs_response_bytes, ECDSA(answer.signature_hash_algorithm))

    def test_templated_answers_match_cryptographys_for_every_status_signer_and_nonce_length(self):
        from uptrakitd.pki.ocsp import OcspResponder
        for signer in ("ca", "delegated"):
            base, ca, issued = responder()
            r = OcspResponder(base.state, base.clock, signer=signer)
            for nonce_length in (8, 16, 32, 100):
                for alg in (hashes.SHA1(), hashes.SHA256()):
                    for serial in (issued.serial, 0x77777777):   # good, then unknown
                        for n in range(2):
                            der = request_der(serial, alg, bytes([n + 1]) * nonce_length, ca=ca, issued=issued)
                            answer = ocsp.load_der_ocsp_response(r.answer(der).der)
                            key_owner = ca.cert if signer == "ca" else answer.certificates[0]
                            self.same(answer, self.reference(r, der), key_owner)
            filled = r.nonces.filled
            self.assertEqual(r.nonces.built, 0, "every nonce of 8 bytes or more had a template")
            record = r.state.records[issued.serial]
            # revoked this very second: the revocation time is the same text as producedAt
            record.revoked_at, record.reason = int(datetime.datetime.now(datetime.timezone.utc).timestamp()), \
                "keyCompromise"
            r.invalidate(issued.serial)
            der = request_der(issued.serial, hashes.SHA256(), b"r" * 16, ca=ca, issued=issued)
            answer = ocsp.load_der_ocsp_response(r.answer(der).der)
            self.assertEqual((answer.certificate_status, answer.revocation_reason),
                             (ocsp.OCSPCertStatus.REVOKED, x509.ReasonFlags.key_compromise),
                             "a revocation is a new template, never the good one")
            self.same(answer, self.reference(r, der), ca.cert if signer == "ca" else answer.certificates[0])
            self.assertEqual(r.nonces.filled, filled + 1)
            short = ocsp.load_der_ocsp_response(r.answer(request_der(nonce=b"1234567", ca=ca, issued=issued)).der)
            self.assertEqual(short.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce, b"1234567")
            self.assertEqual(r.nonces.built, 1, "a nonce under 8 bytes is built by cryptography")

    def test_what_cannot_be_a_template_is_built_every_time(self):
        from uptrakitd.pki.ocsp_nonce import NonceTemplates
        templates, calls = NonceTemplates(lambda: NOW), []

        def build(nonce, this_update, next_update):
            calls.append(nonce)
            return b"\x30\x03\x0a\x01\x00"   # a bare status: nothing to template
        for nonce in (b"n" * 16, b"m" * 16):
            self.assertEqual(templates.answer("k", build, CA.signer.sign, nonce, NOW, NOW), b"\x30\x03\x0a\x01\x00")
        self.assertEqual(calls[1:], [b"n" * 16, b"m" * 16], "each answer built with its own nonce")
        self.assertEqual((templates.built, templates.filled), (2, 0))


class SigningRateLimitTests(TestCase):
    def test_buckets_by_address_refill_and_stay_bounded(self):
        from uptrakitd.pki.ocsp_limit import SigningRateLimit
        now = [100.0]
        limit = SigningRateLimit(5, lambda: now[0], max_addresses=3)
        self.assertEqual([limit.allow("192.0.2.1") for _ in range(11)], [True] * 10 + [False], "a burst of 2 s")
        self.assertTrue(limit.allow("192.0.2.2"), "another address has its own bucket")
        self.assertTrue(limit.allow("::ffff:192.0.2.2"), "an IPv4-mapped address is that IPv4 address")
        for i in range(10):
            limit.allow("2001:db8::%x" % i)   # one /64
        self.assertFalse(limit.allow("2001:db8::ffff"), "IPv6 addresses of one /64 share a bucket")
        now[0] += 0.2
        self.assertTrue(limit.allow("192.0.2.1"), "5 a second come back")
        self.assertFalse(limit.allow("192.0.2.1"))
        for i in range(5):
            limit.allow(f"198.51.100.{i}")
        self.assertEqual(len(limit), 3, "the least recently seen addresses are dropped")
        self.assertTrue(SigningRateLimit(0, lambda: 0.0).allow("192.0.2.1"), "0: no limit")
        self.assertGreaterEqual(limit.refused, 3)


class SigningBudgetTests(TestCase):
    def test_many_addresses_together_get_at_most_their_share_of_a_core(self):
        """Fifty addresses, each far under its own limit, together ask for nonce answers as fast as the
        reactor signs: with a share of 0.05 a core, about 0.05 s of signing a second is done, the rest is
        tryLater; cached answers are never refused. (0.05 a core: 0.05 ms of signing per request at 1,000
        requests a second, well under what one P-384 signature costs on any machine.)"""
        base, ca, issued = responder()
        r = OcspResponder(base.state, base.clock, nonce_rate=100, signing_share=0.05)
        statuses = []
        for second in range(3):
            for i in range(1000):
                der = request_der(nonce=i.to_bytes(8, "big") + bytes([second]), ca=ca, issued=issued)
                statuses.append(r.answer(der, f"127.0.1.{i % 50}").status)
                r.clock.advance(0.001)   # 1,000 requests a second
        signed, refused = statuses.count("good"), statuses.count("try_later")
        self.assertEqual(signed + refused, 3000)
        self.assertGreater(refused, 0)
        self.assertGreater(signed, 0)
        # the signatures' CPU came out of 0.2 s a second for 3 s, plus the first second's worth, plus the one
        # signature that may overdraw the bucket
        self.assertLess(r.budget.used, 3 * 0.05 + 0.05 + 2 * r.budget.used / signed, (signed, r.budget.used))
        self.assertEqual(r.answer(request_der(ca=ca, issued=issued), "127.0.1.1").status, "good",
                         "a cached answer is never refused")
        unlimited = OcspResponder(base.state, base.clock, signing_share=0)
        self.assertTrue(all(unlimited.answer(request_der(nonce=bytes([i]) * 8, ca=ca, issued=issued), "x").status
                            == "good" for i in range(50)))

    def test_the_bucket_refills_at_the_share_and_holds_one_second(self):
        from uptrakitd.pki.ocsp_limit import SigningBudget
        now, cpu = [0.0], [0.0]
        budget = SigningBudget(0.5, lambda: now[0], lambda: cpu[0])
        self.assertTrue(budget.allow())
        budget.spent(0.6)                  # over: empty until refilled
        self.assertFalse(budget.allow())
        now[0] += 0.1                      # +0.05 s of signing: still below zero
        self.assertFalse(budget.allow())
        now[0] += 0.2                      # +0.1: above zero again
        self.assertTrue(budget.allow())
        now[0] += 100
        budget.allow()
        self.assertEqual(budget.tokens, 0.5, "an idle minute saves up no more than one second's share")


class GetPathTests(TestCase):
    def test_forms(self):
        der = request_der()
        b64 = base64.b64encode(der).decode()
        for form in (quote(b64, safe=""), b64, b64.rstrip("="), base64.urlsafe_b64encode(der).decode().rstrip("=")):
            self.assertEqual(decode_get_path(form), der, form)

    @given(st.text(max_size=200))
    def test_garbage_raises_only_decode_error(self, text):
        try:
            decode_get_path(text)
        except OcspDecodeError:
            pass


class DelegatedSignerTests(TestCase):
    def test_one_responder_certificate_until_it_nears_its_end_and_never_past_its_ca(self):
        from uptrakitd.pki.ocsp import DelegatedSigners
        signers = DelegatedSigners()
        first, key = signers.for_ca(CA, NOW)
        self.assertIs(signers.for_ca(CA, NOW + datetime.timedelta(days=1))[0], first, "reused while it lasts")
        later = signers.for_ca(CA, NOW + datetime.timedelta(days=2) - datetime.timedelta(minutes=30))[0]
        self.assertIsNot(later, first, "replaced before it would outlive an answer it signs")
        self.assertEqual(later.issuer, CA.cert.subject)
        # the last hours of a CA: capped at its end, and then kept (not re-issued at every answer)
        end = CA.cert.not_valid_after_utc
        last = signers.for_ca(CA, end - datetime.timedelta(minutes=30))[0]
        self.assertEqual(last.not_valid_after_utc, end)
        self.assertIs(signers.for_ca(CA, end - datetime.timedelta(minutes=20))[0], last)
