"""The Signer seam: a key outside the process (TokenSigner) makes byte for byte what cryptography makes with
the key itself, and every CA signature in the package goes through a Signer."""
from __future__ import annotations

import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils
from cryptography.x509 import ocsp
from cryptography.x509.oid import NameOID
from twisted.trial.unittest import TestCase

from uptrakitd.pki.ca import CaGeneration, create_ca
from uptrakitd.pki.crl import sign_crl
from uptrakitd.pki.issue import issue_client_certificate, load_csr
from uptrakitd.pki.signer import KeySigner, SignerUnavailable, TokenSigner

from .helpers import make_csr

NOW = datetime.datetime(2026, 12, 1, 12, 0, tzinfo=datetime.timezone.utc)
DER = serialization.Encoding.DER


class DeterministicToken(TokenSigner):
    """A 'token' that is a software key signing digests with RFC 6979 (deterministic) ECDSA: what it makes
    through the placeholder-and-resign path can be compared byte for byte with cryptography's own."""

    def __init__(self, key: ec.EllipticCurvePrivateKey) -> None:
        super().__init__(key.public_key(), "pkcs11")
        self.key = key
        self.digests = 0

    def sign_digest(self, digest: bytes) -> bytes:
        self.digests += 1
        assert self._hash is not None
        der = self.key.sign(digest, ec.ECDSA(utils.Prehashed(self._hash), deterministic_signing=True))
        r, s = utils.decode_dss_signature(der)
        size = (self.key.curve.key_size + 7) // 8
        return r.to_bytes(size, "big") + s.to_bytes(size, "big")


def _ca_builder(key: ec.EllipticCurvePrivateKey) -> x509.CertificateBuilder:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "byte for byte")])
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(12345).not_valid_before(NOW).not_valid_after(NOW + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True))


class TokenSignerTests(TestCase):
    def setUp(self) -> None:
        self.key = ec.generate_private_key(ec.SECP384R1())
        self.token = DeterministicToken(self.key)

    def test_a_certificate_is_byte_for_byte_what_cryptography_signs(self) -> None:
        builder = _ca_builder(self.key)
        theirs = builder.sign(self.key, hashes.SHA384(), ecdsa_deterministic=True).public_bytes(DER)
        ours = self.token.certificate(builder).public_bytes(DER)
        self.assertEqual(ours, theirs)
        self.assertEqual(self.token.digests, 1)

    def test_a_ca_and_the_certificates_it_issues_are_those_of_the_same_key_in_memory(self) -> None:
        ca_cert = create_ca(1, "http://pki.example:8080", NOW, self.token)
        ca_cert.verify_directly_issued_by(ca_cert)
        ca = CaGeneration(1, ca_cert, self.token)
        csr = load_csr(make_csr("3f0b3c1e-7a4e-4b8e-9a51-0d1e2f3a4b5c")[0])
        leaf = issue_client_certificate(ca, csr, "3f0b3c1e-7a4e-4b8e-9a51-0d1e2f3a4b5c", "agent", "uptrakit",
                                        datetime.timedelta(days=7), "http://pki.example:8080", NOW).cert
        leaf.verify_directly_issued_by(ca_cert)
        self.assertEqual(leaf.signature_algorithm_oid, x509.SignatureAlgorithmOID.ECDSA_WITH_SHA384)

    def test_a_crl_is_byte_for_byte_what_cryptography_signs(self) -> None:
        ca_cert = _ca_builder(self.key).sign(self.key, hashes.SHA384())
        entries = [(7, int(NOW.timestamp()) - 60, "keyCompromise"), (9, int(NOW.timestamp()) - 30, "superseded")]
        ours, _ = sign_crl(ca_cert.public_bytes(DER), self.token, entries, 4, NOW.timestamp(), 7200, {})
        in_memory, _ = sign_crl(ca_cert.public_bytes(DER), _DeterministicKey(self.key), entries, 4,
                                NOW.timestamp(), 7200, {})
        self.assertEqual(ours, in_memory)
        crl = x509.load_der_x509_crl(ours)
        self.assertTrue(crl.is_signature_valid(self.key.public_key()))
        self.assertEqual(len(crl), 2)

    def test_an_ocsp_answer_is_never_signed_by_a_key_in_a_token(self) -> None:
        ca_cert = _ca_builder(self.key).sign(self.key, hashes.SHA384())
        builder = (ocsp.OCSPResponseBuilder()
                   .add_response_by_hash(issuer_name_hash=b"\x01" * 20, issuer_key_hash=b"\x02" * 20, serial_number=5,
                                         algorithm=hashes.SHA1(), cert_status=ocsp.OCSPCertStatus.GOOD,
                                         this_update=NOW, next_update=NOW + datetime.timedelta(hours=1),
                                         revocation_time=None, revocation_reason=None)
                   .responder_id(ocsp.OCSPResponderEncoding.HASH, ca_cert))
        with self.assertRaises(SignerUnavailable) as raised:
            self.token.ocsp(builder)
        self.assertIn("delegated", str(raised.exception))
        self.assertEqual(self.token.digests, 0)


class _DeterministicKey(KeySigner):
    def crl(self, builder: x509.CertificateRevocationListBuilder) -> x509.CertificateRevocationList:
        return builder.sign(self._key, self._hash, ecdsa_deterministic=True)   # type: ignore[arg-type]


class OnePlaceTests(TestCase):
    def test_no_module_but_the_signer_signs_with_a_key(self) -> None:
        """Every `.sign(` on a builder or key in the daemon is in the Signer implementations (pki/signer.py, and
        pki/pkcs11.py for a token), except the delegated OCSP responder's own P-256 key (not a CA key) and the
        agent's CSR."""
        package = Path(__file__).parent.parent / "uptrakitd"
        found = []
        for path in sorted(package.rglob("*.py")):
            for line in path.read_text().splitlines():
                if ".sign(" in line and path.name not in ("signer.py", "pkcs11.py"):
                    found.append(f"{path.relative_to(package)}: {line.strip()}")
        self.assertEqual(found, [
            "agent/state.py: csr = builder.sign(key, hashes.SHA256())",
            "pki/ocsp.py: return lambda builder: builder.sign(key, hashes.SHA256())",
            "pki/ocsp.py: return lambda data: key.sign(data, _SHA256_ECDSA)",
        ])
