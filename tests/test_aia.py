"""What a relying party that follows the URLs in our certificates gets (pyhanko-certvalidator, over HTTP)."""
from __future__ import annotations

import asyncio

from cryptography.hazmat.primitives.serialization import Encoding
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from uptrakitd.pki.ca import embedded_urls, pki_urls, same_pki_addr, url_extensions

from .helpers import free_port, new_leaf, request_json, start_controller


def validate(leaf_der: bytes, root_der: bytes) -> str:
    """Validate for client auth with revocation checks required; fetches OCSP/CRL (and issuers) itself."""
    from asn1crypto import x509 as asn1
    from pyhanko_certvalidator import CertificateValidator, ValidationContext
    from pyhanko_certvalidator.errors import RevokedError
    from pyhanko_certvalidator.fetchers.requests_fetchers import RequestsFetcherBackend
    context = ValidationContext(trust_roots=[asn1.Certificate.load(root_der)], allow_fetching=True,
                                revocation_mode="require", fetcher_backend=RequestsFetcherBackend())
    validator = CertificateValidator(asn1.Certificate.load(leaf_der), validation_context=context)
    try:
        asyncio.run(validator.async_validate_usage({"digital_signature"}, extended_key_usage={"client_auth"}))
    except RevokedError:
        return "revoked"
    return "valid"


def issuers_over_aia(leaf_der: bytes) -> list[bytes]:
    from asn1crypto import x509 as asn1
    from pyhanko_certvalidator.fetchers.requests_fetchers import RequestsFetcherBackend
    fetchers = RequestsFetcherBackend().get_fetchers()

    async def collect():
        return [c.dump() async for c in fetchers.cert_fetcher.fetch_cert_issuers(asn1.Certificate.load(leaf_der))]
    return asyncio.run(collect())


class AiaTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def test_issuer_ocsp_and_crl_through_the_embedded_urls(self):
        port = free_port()
        c = yield start_controller(self, pki_addr=f"http://127.0.0.1:{port}", pki_http="listener")
        issued, _, _ = yield new_leaf(c)
        leaf = issued.cert.public_bytes(Encoding.DER)
        root = c.ca.state.active().cert.public_bytes(Encoding.DER)
        self.assertEqual(embedded_urls(issued.cert)["ca_issuers"], f"http://127.0.0.1:{port}/api/v1/pki/ca/1.crt")
        self.assertEqual((yield deferToThread(issuers_over_aia, leaf)), [root])
        self.assertEqual((yield deferToThread(validate, leaf, root)), "valid")
        status, _ = yield request_json(c, "POST", f"/api/v1/certificates/{issued.serial:X}/revoke",
                                       {"reason": "keyCompromise"})
        self.assertEqual(status, 200)
        self.assertEqual((yield deferToThread(validate, leaf, root)), "revoked")

    def test_a_ca_embedding_the_older_bundle_url_still_matches_its_pki_addr(self):
        from uptrakitd.pki.ca import create_ca
        import datetime
        from uptrakitd.pki.signer import KeySigner
        signer = KeySigner.generate()
        cert = create_ca(1, None, datetime.datetime.now(datetime.timezone.utc), signer)
        old = dict(pki_urls("http://pki.example", 1), ca_issuers="http://pki.example/api/v1/pki/ca.crt")
        self.assertEqual(len(url_extensions(old)), 2)
        from cryptography import x509
        builder = (x509.CertificateBuilder().subject_name(cert.subject).issuer_name(cert.subject)
                   .public_key(signer.public_key()).serial_number(1).not_valid_before(cert.not_valid_before_utc)
                   .not_valid_after(cert.not_valid_after_utc))
        for ext in url_extensions(old):
            builder = builder.add_extension(ext, critical=False)
        older = signer.certificate(builder)
        self.assertTrue(same_pki_addr(older, "http://pki.example"))
        self.assertFalse(same_pki_addr(older, "http://other.example"))
        self.assertFalse(same_pki_addr(older, None))
