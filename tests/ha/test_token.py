"""Several controllers on one PostgreSQL sharing one PKCS#11 token (issue 23, point 5): SoftHSM2's token
directory stands for a network HSM that every controller reaches."""
from __future__ import annotations

from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from ..helpers import new_leaf, request_json, start_controller, wait_until
from ..softhsm import SoftHsm
from .postgres import PostgresCluster


class SharedTokenTests(TestCase):
    timeout = 120

    @inlineCallbacks
    def test_two_controllers_sign_with_the_same_token_keys_and_follow_each_others_rotation(self) -> Any:
        cluster = PostgresCluster()
        self.addCleanup(cluster.destroy)
        hsm = SoftHsm(self)
        db = cluster.new_database()   # no key-encryption key: no CA key is kept in the database
        a = yield start_controller(self, database=db, **hsm.flags())
        b = yield start_controller(self, database=db, **hsm.flags())
        (b.settings.data_dir / "admin.token").write_bytes((a.settings.data_dir / "admin.token").read_bytes())
        self.assertEqual(a.ca.state.active().fingerprint, b.ca.state.active().fingerprint, "one CA for both")
        self.assertEqual(b.ca.state.active().custody, "pkcs11")
        self.assertEqual([k["label"] for k in hsm.private_keys()], ["uptrakit-ca-g1"], "one key, made once")

        on_b, _, _ = yield new_leaf(b)
        on_b.cert.verify_directly_issued_by(a.ca.state.active().cert)
        status, body = yield request_json(a, "POST", "/api/v1/settings/rotate-ca")
        self.assertEqual(status, 200, body)
        yield wait_until(lambda: b.ca.state.active().generation == 2, timeout=15)
        self.assertEqual(b.ca.state.active().custody, "pkcs11")
        after, _, _ = yield new_leaf(b)            # B's worker opens the key A made, by its id
        after.cert.verify_directly_issued_by(a.ca.state.active().cert)
        self.assertEqual(sorted(k["label"] for k in hsm.private_keys()), ["uptrakit-ca-g1", "uptrakit-ca-g2"])
        status, pki = yield request_json(b, "GET", "/api/v1/settings/pki")
        self.assertEqual((pki["active_ca"]["custody"], pki["previous_ca"]["custody"]), ("pkcs11", "pkcs11"))
