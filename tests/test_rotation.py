"""CA rotation (SPEC §4.6): new generation active, previous trusted, the one before dropped."""
from __future__ import annotations

import datetime
import hashlib
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp
from cryptography.x509.oid import NameOID
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from uptrakitd.errors import Conflict
from uptrakitd.pki.serials import format_serial

from .helpers import (tls_refusal, blocking_get, blocking_tls_socket, https_client, https_port, request_json,
                      new_leaf, start_controller, url)



def handshake_ok(c, bundle, leaf_pem, key):
    def go():
        with blocking_tls_socket(https_port(c), bundle, leaf_pem, key) as s:
            return blocking_get(s, "/healthz")[0]
    return deferToThread(go)


class RotationTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def test_rotation_keeps_previous_trusted_and_drops_the_one_before(self):
        c = yield start_controller(self)
        g1_leaf, g1_key, _ = yield new_leaf(c)
        old_fp = c.ca.state.active().fingerprint

        status, body = yield request_json(c, "POST", "/api/v1/settings/rotate-ca")
        self.assertEqual(status, 200, body)
        self.assertEqual(body["generation"], 2)
        self.assertNotEqual(body["fingerprint"], old_fp)
        self.assertEqual(body["notified"], 0)
        client = https_client(c, ca=c.ca.state.bundle_pem(c.ca.now()))
        import treq
        r = yield client.get(url(c, "/api/v1/pki/ca.crt"))
        served = yield treq.content(r)
        self.assertEqual(r.headers.getRawHeaders("content-type"), ["application/x-pem-file"])
        self.assertEqual(hashlib.sha256(served).hexdigest(), body["ca_bundle_hash"])
        certs = x509.load_pem_x509_certificates(served)
        self.assertEqual([cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value.split()[3]
                          for cert in certs], ["G2", "G1"])
        self.assertEqual((Path(c.settings.data_dir) / "pki" / "ca.crt").read_bytes(), served)

        g2_leaf, g2_key, _ = yield new_leaf(c)
        self.assertEqual(g2_leaf.ca_generation, 2)
        g2_leaf.cert.verify_directly_issued_by(certs[0])
        self.assertEqual(c.server_cert.cert.issuer, certs[1].subject, "a rotation does not re-issue the server cert")
        self.assertEqual((yield handshake_ok(c, served, g1_leaf.pem, g1_key)), 200)
        self.assertEqual((yield handshake_ok(c, served, g2_leaf.pem, g2_key)), 200)
        # generation-1 leaves still get OCSP answers from generation 1
        req = ocsp.OCSPRequestBuilder().add_certificate(g1_leaf.cert, certs[1], hashes.SHA1()).build()
        answer = c.ocsp.answer(req.public_bytes(serialization.Encoding.DER))
        self.assertEqual(answer.status, "good")

        status, body = yield request_json(c, "POST", "/api/v1/settings/rotate-ca")
        self.assertEqual(body["generation"], 3)
        bundle = c.ca.state.bundle_pem(c.ca.now())
        self.assertEqual(len(x509.load_pem_x509_certificates(bundle)), 2)
        alert = yield tls_refusal(https_port(c), bundle, g1_leaf.pem, g1_key)
        self.assertIn("unknown ca", alert)
        self.assertEqual((yield handshake_ok(c, bundle, g2_leaf.pem, g2_key)), 200)
        # the server certificate survives the first rotation (services one rotation behind verify it) and is
        # re-issued by the previous CA (G2) once its issuer (G1) leaves the trusted set
        self.assertEqual(c.server_cert.cert.issuer, certs[0].subject)
        self.assertEqual((yield handshake_ok(c, served, g2_leaf.pem, g2_key)), 200)
        # every unexpired generation's CRL is still served, active first in the PEM bundle
        self.assertEqual(sorted(c.crls.current), [1, 2, 3])
        blocks = c.crls.bundle_pem().split(b"-----END X509 CRL-----")[:-1]
        issuers = [x509.load_pem_x509_crl(b + b"-----END X509 CRL-----\n").issuer for b in blocks]
        self.assertEqual(issuers, [c.ca.state.generations[g].cert.subject for g in (3, 2, 1)])
        status, body = yield request_json(c, "GET", "/api/v1/settings/pki")
        self.assertEqual((body["active_ca"]["generation"], body["previous_ca"]["generation"]), (3, 2))
        # the certificates generation 1 issued are not "valid" any more: nothing accepts them
        status, listed = yield request_json(c, "GET", "/api/v1/certificates?status=untrusted")
        self.assertEqual(status, 200)
        self.assertEqual({(r["ca_generation"], r["purpose"]) for r in listed["certificates"]},
                         {(1, "client"), (1, "server")})
        g1 = format_serial(g1_leaf.serial)
        status, shown = yield request_json(c, "GET", f"/api/v1/certificates/{g1}")
        self.assertEqual(shown["status"], "untrusted")
        status, listed = yield request_json(c, "GET", "/api/v1/certificates?status=valid")
        self.assertNotIn(g1, [r["serial"] for r in listed["certificates"]])

    @inlineCallbacks
    def test_concurrent_rotation_is_409(self):
        c = yield start_controller(self)
        first = c.ca.rotate()
        second = c.ca.rotate()
        failure = yield self.assertFailure(second, Conflict)
        self.assertEqual(failure.status, 409)
        result = yield first
        self.assertEqual(result["generation"], 2)

    @inlineCallbacks
    def test_external_ca_rotation_is_400(self):
        tmp = Path(self.mktemp())
        tmp.mkdir()
        key = ec.generate_private_key(ec.SECP384R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Operator CA")])
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(now)
                .not_valid_after(now + datetime.timedelta(days=3650))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .sign(key, hashes.SHA384()))
        (tmp / "ca.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (tmp / "ca.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
        c = yield start_controller(self, tmp=str(tmp), ca_cert=str(tmp / "ca.pem"), ca_key=str(tmp / "ca.key"))
        status, body = yield request_json(c, "POST", "/api/v1/settings/rotate-ca")
        self.assertEqual((status, body["code"]), (400, "external_ca"))
        leaf, _, _ = yield new_leaf(c)
        leaf.cert.verify_directly_issued_by(cert)

    @inlineCallbacks
    def test_auto_rotation_when_less_than_183_days_left(self):
        c = yield start_controller(self)
        yield c.ca.check_expiry()
        self.assertEqual(c.ca.state.active().generation, 1)
        expires = c.ca.state.active().not_after
        c.ca.now = lambda: expires - datetime.timedelta(days=182)
        yield c.ca.check_expiry()
        self.assertEqual(c.ca.state.active().generation, 2)


class FullDiskRotationTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def test_a_rotation_on_a_full_disk_is_a_503_that_changes_nothing(self):
        """The data dir on a real 4 MiB tmpfs, filled to the last byte: the new CA key cannot be written."""
        import errno
        import os
        import subprocess
        from .helpers import missing
        tmp = Path(self.mktemp()).resolve()
        tmp.mkdir(parents=True)
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(tmp)],
                                 capture_output=True, text=True)
        if mounted.returncode:
            missing(f"a full disk needs a small tmpfs, and mount said: {mounted.stderr.strip()} (run as root)")
        self.addCleanup(subprocess.run, ["umount", "-l", str(tmp)])
        c = yield start_controller(self, str(tmp))
        filler = tmp / "filler"
        with open(filler, "wb", buffering=0) as f:
            try:
                while True:
                    f.write(b"\0" * 4096)
            except OSError as e:
                self.assertEqual(e.errno, errno.ENOSPC)
        before = sorted(os.listdir(tmp / "data" / "pki"))
        status, body = yield request_json(c, "POST", "/api/v1/settings/rotate-ca")
        self.assertEqual((status, body.get("code")), (503, "storage_unavailable"), body)
        self.assertIn("new CA key could not be written", body["error"])
        self.assertEqual(sorted(os.listdir(tmp / "data" / "pki")), before, "no key file, no half-written temp file")
        self.assertEqual(c.ca.state.active().generation, 1)
        filler.unlink()
        status, body = yield request_json(c, "POST", "/api/v1/settings/rotate-ca")
        self.assertEqual((status, body["generation"]), (200, 2), body)
