"""First start and restarts: CA and server certificate properties, files, tokens, idempotence."""
from __future__ import annotations

import datetime
import os
import sqlite3
import stat
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID, NameOID
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from uptrakitd.process.boot import StartupError, boot
from uptrakitd.registry.tokens import token_hash
from uptrakitd.config import build_settings

from .helpers import require_program, run


def boot_once(settings, **kw):
    """boot() as a start that ends: the data-dir lock is let go, so the next boot can take it."""
    booted = boot(settings, **kw)
    booted.lock.release()
    return booted


def settings_in(tmp: str, **flags):
    return build_settings({"data_dir": str(Path(tmp) / "data"), "https_listen": "tcp:0:interface=127.0.0.1", **flags})


class FirstStartTests(TestCase):
    def setUp(self):
        self.tmp = self.mktemp()
        Path(self.tmp).mkdir()
        self.data = Path(self.tmp) / "data"

    def test_creates_private_data_dir_store_ca_server_cert_and_token(self):
        booted = boot_once(settings_in(self.tmp))
        self.assertEqual(stat.S_IMODE(os.stat(self.data).st_mode), 0o700)
        for name in ["pki/ca-1.key", "pki/server.key", "admin.token"]:
            self.assertEqual(stat.S_IMODE(os.stat(self.data / name).st_mode), 0o600, name)
        self.assertTrue((self.data / "uptrakit.sqlite3").exists())
        token = (self.data / "admin.token").read_text().strip()
        self.assertTrue(token.startswith("upt_admin_"))
        db = sqlite3.connect(self.data / "uptrakit.sqlite3")
        hashes_stored = [r[0] for r in db.execute("SELECT token_hash FROM admin_tokens")]
        self.assertEqual(hashes_stored, [token_hash(token)])
        self.assertNotIn(token, (self.data / "uptrakit.sqlite3").read_bytes().decode("latin-1"))
        self.assertEqual(booted.state.active().generation, 1)

    def test_ca_properties(self):
        booted = boot_once(settings_in(self.tmp, pki_addr="http://pki.example:8080/"))
        ca = booted.state.active().cert
        key = ca.public_key()
        self.assertIsInstance(key.curve, ec.SECP384R1)
        self.assertEqual(ca.signature_hash_algorithm.name, "sha384")
        cn = ca.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        from uptrakitd.pki.ca import spki_sha256
        self.assertEqual(cn, f"Uptrakit Internal CA G1 {spki_sha256(key)[:8]}")
        self.assertEqual(ca.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value, "Uptrakit")
        bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
        self.assertTrue(bc.critical)
        self.assertEqual((bc.value.ca, bc.value.path_length), (True, 0))
        ku = ca.extensions.get_extension_for_class(x509.KeyUsage)
        self.assertTrue(ku.critical and ku.value.key_cert_sign and ku.value.crl_sign)
        self.assertFalse(ku.value.digital_signature)
        ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
        life = ca.not_valid_after_utc - ca.not_valid_before_utc
        self.assertAlmostEqual(life.days, 5 * 365, delta=1)
        aia = ca.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
        urls = {d.access_method: d.access_location.value for d in aia}
        self.assertEqual(urls[AuthorityInformationAccessOID.OCSP], "http://pki.example:8080/api/v1/pki/ocsp")
        self.assertEqual(urls[AuthorityInformationAccessOID.CA_ISSUERS], "http://pki.example:8080/api/v1/pki/ca/1.crt")
        cdp = ca.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
        self.assertEqual(cdp[0].full_name[0].value, "http://pki.example:8080/api/v1/pki/crl/1.crl")

    def test_no_urls_without_pki_addr(self):
        ca = boot_once(settings_in(self.tmp)).state.active().cert
        self.assertRaises(x509.ExtensionNotFound, ca.extensions.get_extension_for_class, x509.AuthorityInformationAccess)

    def test_server_certificate_properties(self):
        booted = boot_once(settings_in(self.tmp, san=["controller.example", "10.9.8.7"]))
        cert = booted.server_cert
        self.assertEqual(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value, "Uptrakit Controller")
        self.assertIsInstance(cert.public_key().curve, ec.SECP256R1)
        self.assertEqual(cert.issuer, booted.state.active().cert.subject)
        cert.verify_directly_issued_by(booted.state.active().cert)
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = sans.get_values_for_type(x509.DNSName)
        ips = [str(i) for i in sans.get_values_for_type(x509.IPAddress)]
        self.assertIn("localhost", dns)
        self.assertIn("controller.example", dns)
        self.assertEqual(set(ips), {"127.0.0.1", "::1", "10.9.8.7"})
        self.assertEqual((cert.not_valid_after_utc - cert.not_valid_before_utc).days, 90)
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        self.assertIn(ExtendedKeyUsageOID.SERVER_AUTH, eku)
        self.assertIn(cert.serial_number, booted.state.records)

    def test_restart_reuses_ca_server_cert_and_token(self):
        first = boot_once(settings_in(self.tmp))
        token = (self.data / "admin.token").read_bytes()
        second = boot_once(settings_in(self.tmp))
        self.assertEqual(first.state.active().fingerprint, second.state.active().fingerprint)
        self.assertEqual(first.server_cert.serial_number, second.server_cert.serial_number)
        self.assertEqual(token, (self.data / "admin.token").read_bytes())
        self.assertEqual(list(second.state.generations), [1])

    def test_new_san_reissues_server_certificate_from_same_ca(self):
        first = boot_once(settings_in(self.tmp))
        second = boot_once(settings_in(self.tmp, san=["new.example"]))
        self.assertNotEqual(first.server_cert.serial_number, second.server_cert.serial_number)
        self.assertEqual(first.state.active().fingerprint, second.state.active().fingerprint)

    def test_server_certificate_near_expiry_is_reissued(self):
        first = boot_once(settings_in(self.tmp))
        later = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=61)
        second = boot_once(settings_in(self.tmp), now=later)
        self.assertNotEqual(first.server_cert.serial_number, second.server_cert.serial_number)

    def test_orphan_key_file_from_a_killed_first_start_is_harmless(self):
        (self.data / "pki").mkdir(parents=True)
        (self.data / "pki" / "ca-1.key").write_bytes(b"half a key")
        booted = boot_once(settings_in(self.tmp))
        self.assertEqual(booted.state.active().generation, 1)

    def test_pki_addr_disagreeing_with_stored_ca_is_refused(self):
        boot_once(settings_in(self.tmp, pki_addr="http://old.example"))
        with self.assertRaises(StartupError) as cm:
            boot_once(settings_in(self.tmp, pki_addr="http://new.example", force_settings_override=True))
        self.assertIn("rotate the CA", str(cm.exception))

    def test_stored_network_settings_win_unless_forced(self):
        first = boot_once(settings_in(self.tmp, real_ip_header="X-Real-IP"))
        self.assertEqual(first.network.real_ip_header, "X-Real-IP")
        second = boot_once(settings_in(self.tmp, real_ip_header="Forwarded"))
        self.assertEqual(second.network.real_ip_header, "X-Real-IP", "the stored runtime setting wins")
        third = boot_once(settings_in(self.tmp, real_ip_header="Forwarded", force_settings_override=True))
        self.assertEqual(third.network.real_ip_header, "Forwarded")
        fourth = boot_once(settings_in(self.tmp))
        self.assertEqual(fourth.network.real_ip_header, "Forwarded", "the override was stored")
        self.assertEqual(stat.S_IMODE(os.stat(self.data / "uptrakit.sqlite3").st_mode), 0o600)

    def test_invalid_stored_network_settings_refused_then_repaired_by_the_override(self):
        boot_once(settings_in(self.tmp))
        db = sqlite3.connect(self.data / "uptrakit.sqlite3")
        db.execute("""UPDATE settings SET value = '{"trusted_proxies": ["nonsense"]}' WHERE key = 'network'""")
        db.commit()
        db.close()
        with self.assertRaises(StartupError) as cm:
            boot_once(settings_in(self.tmp))
        self.assertIn("--force-settings-override", str(cm.exception))
        repaired = boot_once(settings_in(self.tmp, trusted_proxies=["10.0.0.0/8"], force_settings_override=True))
        self.assertEqual([str(n) for n in repaired.network.trusted_proxies], ["10.0.0.0/8"])
        self.assertEqual(boot_once(settings_in(self.tmp)).network.trusted_proxies, repaired.network.trusted_proxies)

    def test_missing_ca_key_is_a_clear_error(self):
        boot_once(settings_in(self.tmp))
        (self.data / "pki" / "ca-1.key").unlink()
        with self.assertRaises(StartupError) as cm:
            boot_once(settings_in(self.tmp))
        self.assertIn("ca-1.key", str(cm.exception))


class OpensslJudgeTests(TestCase):
    @inlineCallbacks
    def test_openssl_verifies_server_certificate_against_ca(self):
        openssl = require_program("openssl", "apt-get install openssl")
        tmp = self.mktemp()
        Path(tmp).mkdir()
        boot_once(settings_in(tmp))
        pki = Path(tmp) / "data" / "pki"
        out, err, code = yield run(openssl, "verify", "-CAfile", str(pki / "ca.crt"), "-purpose", "sslserver",
                                   str(pki / "server.crt"))
        self.assertEqual(code, 0, err)
        self.assertIn(b": OK", out)


class CrashPointTests(TestCase):
    """A first start interrupted after any step (as `kill -9` would) never breaks the next start."""

    def test_every_step_of_first_start(self):
        from uptrakitd.process.boot import STEPS, FaultInjected
        from uptrakitd.pki.state import load_records
        from uptrakitd import store
        for step in STEPS:
            tmp = self.mktemp()
            Path(tmp).mkdir()

            def crash(reached, step=step):
                if reached == step:
                    raise FaultInjected(step)
            with self.assertRaises(FaultInjected, msg=step):
                boot_once(settings_in(tmp), fault=crash)
            booted = boot_once(settings_in(tmp))
            data = Path(tmp) / "data"
            ca = booted.state.active()
            self.assertEqual(ca.generation, 1, step)
            self.assertEqual(ca.cert.public_key(), ca.signer.public_key(), step)
            conn = store.connect(data / "uptrakit.sqlite3")
            recorded = {r.serial for r in store.transaction(conn, load_records)}
            self.assertIn(booted.server_cert.serial_number, recorded, f"{step}: server certificate not recorded")
            token = (data / "admin.token").read_text().strip()
            hashes_stored = [r[0] for r in conn.execute("SELECT token_hash FROM admin_tokens WHERE revoked_at IS NULL")]
            conn.close()
            self.assertIn(token_hash(token), hashes_stored, f"{step}: the token on disk does not work")
            self.assertEqual((data / "pki" / "ca.crt").read_bytes(), booted.state.bundle_pem(
                datetime.datetime.now(datetime.timezone.utc)), step)


class DataDirLockTests(TestCase):
    def test_a_second_daemon_on_the_same_data_dir_is_refused_with_the_holders_pid(self):
        tmp = self.mktemp()
        Path(tmp).mkdir()
        first = boot(settings_in(tmp))
        self.addCleanup(first.lock.release)
        with self.assertRaises(StartupError) as cm:
            boot(settings_in(tmp))
        self.assertIn(f"in use by another uptrakitd (PID {os.getpid()})", str(cm.exception))
        first.lock.release()
        boot_once(settings_in(tmp))
