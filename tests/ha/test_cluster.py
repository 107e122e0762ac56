"""Several active controllers on one PostgreSQL (Debian's, started here in a temp dir): what one changes
takes effect on the others through the change log, and the once-per-database jobs run on one leader."""
from __future__ import annotations

import base64
from typing import Any
from urllib.parse import quote

import treq
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from uptrakitd.config import build_settings
from uptrakitd.pki.serials import format_serial

from ..channel_helpers import (agent_identity, connected_agent, next_event, until_closed, ws_connect, ws_ssl)
from ..helpers import (ca_pem, https_client, https_port, new_leaf, request_json, start_controller, tls_refusal, url,
                       wait_until)
from .postgres import PostgresCluster, kek_file, together


def _execute(url: str, sql: str) -> None:
    from uptrakitd.store import postgresql
    conn = postgresql.connect(url)
    try:
        conn.execute(sql)
    finally:
        conn.close()


def json_type(message: Any) -> str:
    import json
    return json.loads(message)["type"]


def ocsp_status(c: Any, cert: x509.Certificate) -> Any:
    """Fires with controller `c`'s OCSP answer for `cert` (nginx's GET form, over its HTTPS listener)."""
    issuer = next(ca.cert for ca in c.ca.state.generations.values() if ca.cert.subject == cert.issuer)
    der = ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, hashes.SHA1()).build().public_bytes(
        serialization.Encoding.DER)
    path = f"/api/v1/pki/ocsp/{quote(base64.b64encode(der).decode(), safe='')}"

    def parse(body: bytes) -> Any:
        return ocsp.load_der_ocsp_response(body).certificate_status
    return https_client(c).get(url(c, path)).addCallback(treq.content).addCallback(parse)


def ocsp_outcome(c: Any, cert: x509.Certificate, nonce: bool) -> Any:
    """Fires with "good", "revoked", "try_later" (or another status name) from controller `c`: nginx's GET, or a
    POST with a nonce."""
    issuer = next(ca.cert for ca in c.ca.state.generations.values() if ca.cert.subject == cert.issuer)
    builder = ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, hashes.SHA1())
    if nonce:
        import os
        builder = builder.add_extension(x509.OCSPNonce(os.urandom(16)), critical=False)
    der = builder.build().public_bytes(serialization.Encoding.DER)

    def name(body: bytes) -> str:
        answer = ocsp.load_der_ocsp_response(body)
        if answer.response_status != ocsp.OCSPResponseStatus.SUCCESSFUL:
            return "try_later" if answer.response_status == ocsp.OCSPResponseStatus.TRY_LATER else "failed"
        return answer.certificate_status.name.lower()
    if nonce:
        d = https_client(c).post(url(c, "/api/v1/pki/ocsp"), data=der,
                                 headers={"Content-Type": "application/ocsp-request"})
    else:
        d = https_client(c).get(url(c, f"/api/v1/pki/ocsp/{quote(base64.b64encode(der).decode(), safe='')}"))
    return d.addCallback(treq.content).addCallback(name)


class ClusterTests(TestCase):
    timeout = 120

    def setUp(self) -> None:
        self.cluster = PostgresCluster()
        self.addCleanup(self.cluster.destroy)
        self.url, self.kek = self.cluster.new_database(), kek_file(self)

    @inlineCallbacks
    def controller(self) -> Any:
        """Another controller on the database; the tests use the bootstrap admin token the first one wrote."""
        c = yield start_controller(self, database=self.url, ca_key_encryption_key_file=self.kek)
        token = c.settings.data_dir / "admin.token"
        if hasattr(self, "first"):
            self.assertFalse(token.exists(), "only the first controller writes a bootstrap token")
            token.write_bytes((self.first.settings.data_dir / "admin.token").read_bytes())
        else:
            self.first = c
        return c

    @inlineCallbacks
    def test_a_revocation_made_on_one_controller_takes_effect_on_the_others(self):
        a = yield self.controller()
        b = yield self.controller()
        c = yield self.controller()
        agent = yield connected_agent(self, c)            # enrolled and connected through C
        cert_pem, key_pem = agent_identity(agent)
        cert = x509.load_pem_x509_certificate(cert_pem)
        # A and B learn C's service and certificate: B's OCSP says good
        yield wait_until(lambda: cert.serial_number in a.ca.state.records and agent.service_id in a.directory
                         and cert.serial_number in b.ca.state.records, timeout=10)
        self.assertEqual((yield ocsp_status(b, cert)), ocsp.OCSPCertStatus.GOOD)

        closed = next_event(agent, "disconnected")
        status, body = yield request_json(a, "POST", f"/api/v1/certificates/{format_serial(cert.serial_number)}/revoke",
                                          {"reason": "keyCompromise"})
        self.assertEqual(status, 200, body)
        # the agent on C is closed, B and C refuse the certificate at the handshake, B's OCSP says revoked
        self.assertEqual((yield closed), (1008, "certificate revoked"))
        yield wait_until(lambda: b.ca.state.is_revoked(cert.serial_number), timeout=10)
        self.assertEqual((yield ocsp_status(b, cert)), ocsp.OCSPCertStatus.REVOKED)
        for other in (b, c):
            alert = yield tls_refusal(https_port(other), ca_pem(other), cert_pem, key_pem)
            self.assertIn("certificate revoked", alert)   # alert 44, set by listen.tls.say_revoked
        # and every controller publishes it in its own CRL (numbers from the database: never shared)
        yield wait_until(lambda: all(x.crls.current[1].entries == 1 for x in (a, b, c)), timeout=10)
        numbers = [x.crls.current[1].number for x in (a, b, c)]
        self.assertEqual(len(set(numbers)), 3, numbers)

    @inlineCallbacks
    def test_a_controller_cut_off_from_the_database_never_answers_good_for_what_was_revoked_elsewhere(self):
        """B reaches PostgreSQL through a relay that is made to hang (a silent partition: nothing closes);
        a certificate is revoked on A. From the bound on (3 s here), B answers OCSP tryLater and decides no
        new identity; it never says good after bound + 1 s; and it comes back by itself with the link."""
        import time
        from .postgres import HangingRelay
        relay = HangingRelay(self.cluster.dir / ".s.PGSQL.5432")
        self.addCleanup(relay.close)
        a = yield self.controller()
        b = yield start_controller(self, database=relay.url(self.url.split("///")[1].split("?")[0]),
                                   ca_key_encryption_key_file=self.kek, cluster_max_staleness=3)
        self.addCleanup(relay.resume)   # before the controllers stop: they would wait for the hung link
        (b.settings.data_dir / "admin.token").write_bytes((a.settings.data_dir / "admin.token").read_bytes())
        revoked, key, _ = yield new_leaf(a)
        other, other_key, _ = yield new_leaf(a)
        yield wait_until(lambda: revoked.serial in b.ca.state.records and other.serial in b.ca.state.records,
                         timeout=10)
        self.assertEqual((yield ocsp_outcome(b, revoked.cert, nonce=False)), "good")
        self.assertEqual((yield ocsp_outcome(b, revoked.cert, nonce=True)), "good")
        relay.hang()
        status, body = yield request_json(a, "POST", f"/api/v1/certificates/{format_serial(revoked.serial)}/revoke",
                                          {"reason": "keyCompromise"})
        self.assertEqual(status, 200, body)
        at = time.monotonic()
        seen: list[tuple[float, str]] = []
        while time.monotonic() - at < 6:
            for nonce in (False, True):
                outcome = yield ocsp_outcome(b, revoked.cert, nonce=nonce)
                seen.append((time.monotonic() - at, outcome))
            yield deferLater(reactor, 0.25, lambda: None)
        late_good = [(round(t, 1), o) for t, o in seen if o == "good" and t > 3 + 1]
        self.assertEqual(late_good, [], seen)
        self.assertIn("try_later", [o for t, o in seen if t > 4], seen)
        # no new identity while stale: a good certificate's mTLS request is refused with the reason
        whoami = yield deferToThread(self._whoami, b, other.pem, other_key)
        self.assertEqual((whoami.get("identity"), whoami.get("rejected_code")), (None, "cluster_stale"), whoami)
        status, body = yield request_json(b, "GET", "/readyz", token=None)
        self.assertEqual((status, body["checks"].get("cluster", "")[:5]), (503, "stale"), body)
        status, body = yield request_json(b, "GET", "/api/v1/controllers")
        self.assertEqual((status, body["cluster"]["stale"]), (200, True), body)
        relay.resume()
        yield wait_until(lambda: b.ca.state.is_revoked(revoked.serial) and not b.cluster.stale(), timeout=30)
        self.assertEqual((yield ocsp_outcome(b, revoked.cert, nonce=False)), "revoked")
        self.assertEqual((yield ocsp_outcome(b, revoked.cert, nonce=True)), "revoked")
        whoami = yield deferToThread(self._whoami, b, other.pem, other_key)
        self.assertIsNotNone(whoami.get("identity"), whoami)

    @staticmethod
    def _whoami(c: Any, cert_pem: bytes, key_pem: bytes) -> Any:
        import json
        from ..helpers import blocking_get, blocking_tls_socket
        with blocking_tls_socket(https_port(c), ca_pem(c), cert_pem, key_pem) as s:
            status, body = blocking_get(s, "/api/v1/whoami")
            return json.loads(body)

    @inlineCallbacks
    def test_a_rotation_made_on_one_controller_reaches_the_services_of_the_others(self):
        a = yield self.controller()
        b = yield self.controller()
        agent = yield connected_agent(self, a)
        bundle = next_event(agent, "ca_bundle_updated", timeout=30)
        renewed = next_event(agent, "certificate", timeout=30)
        back = next_event(agent, "service_settings", timeout=30)
        status, body = yield request_json(b, "POST", "/api/v1/settings/rotate-ca", {})
        self.assertEqual(status, 200, body)
        self.assertEqual(body["generation"], 2)
        yield bundle
        yield renewed
        yield back   # authenticated on A again, with its G2 certificate: A's TLS context trusts G2
        self.assertEqual(agent.state.certificate().issuer, b.ca.state.active().cert.subject)
        self.assertEqual(a.ca.state.active().generation, 2)
        self.assertEqual(a.ca.bundle_hash(), b.ca.bundle_hash())
        self.assertEqual(a.ca.bundle_pem(), (a.settings.data_dir / "pki" / "ca.crt").read_bytes())
        # a second rotation through A, which learned G2 from B, makes G3 (no clash over the number)
        status, body = yield request_json(a, "POST", "/api/v1/settings/rotate-ca", {})
        self.assertEqual((status, body["generation"]), (200, 3), body)
        yield wait_until(lambda: b.ca.state.active().generation == 3, timeout=10)

    @inlineCallbacks
    def test_a_service_that_connects_to_another_controller_is_superseded_on_the_first(self):
        a = yield self.controller()
        b = yield self.controller()
        agent = yield connected_agent(self, a, backoff=(30, 60))   # it must not come back and supersede us
        cert, key = agent_identity(agent)
        yield wait_until(lambda: agent.service_id in b.directory
                         and x509.load_pem_x509_certificate(cert).serial_number in b.ca.state.records, timeout=10)
        superseded = next_event(agent, "disconnected")
        ws = yield deferToThread(ws_connect, f"wss://localhost:{https_port(b)}/api/v1/ws/agent", ssl=ws_ssl(b, cert, key))
        self.addCleanup(ws.close)
        first = yield deferToThread(ws.recv, 10)
        self.assertIn('"service_settings"', first)
        self.assertEqual((yield superseded), (1008, "superseded by new connection"))
        # where it connected from is known on A too, and B keeps its socket
        yield wait_until(lambda: a.directory.get(agent.service_id).ip_address == "127.0.0.1", timeout=10)
        self.assertIn(agent.service_id, b.channel.connected)
        yield agent.stopService()
        closing = deferToThread(until_closed, ws)
        yield b.stopService()
        _, code, _ = yield closing
        self.assertEqual(code, 1001)

    @inlineCallbacks
    def test_an_agent_that_enrolled_on_one_controller_is_admitted_by_another_before_it_caught_up(self):
        """Right after enrolling (or renewing) through A, an agent's mTLS reconnect may land on B before B has
        applied A's change: B reads that certificate and service itself, then decides (it used to refuse:
        certificate not recognized)."""
        from twisted.internet.defer import Deferred

        from ..channel_helpers import enrollment_token, frame
        from ..helpers import make_csr
        a = yield self.controller()
        b = yield self.controller()
        token = yield enrollment_token(a)

        def enroll_on_a() -> tuple[str, bytes, bytes]:
            with ws_connect(f"wss://localhost:{https_port(a)}/api/v1/ws/agent", ssl=ws_ssl(a)) as ws:
                ws.send(frame("enroll", 1, hostname="fast", enrollment_token=token))
                import json
                service_id = json.loads(ws.recv(timeout=10))["service_id"]
                csr, key = make_csr(service_id)
                ws.send(frame("request_certificate", 2, csr_pem=csr.decode()))
                return service_id, json.loads(ws.recv(timeout=10))["cert_pem"].encode(), key
        # B's feed is held: it reads A's changes but does not apply them until the test lets it
        held: Deferred = Deferred()
        apply = b.cluster.feed.apply
        b.cluster.feed.apply = lambda rows: held.addCallback(lambda _: apply(rows))
        self.addCleanup(lambda: None if held.called else held.callback(None))   # never leave B's feed held
        service_id, cert, key = yield deferToThread(enroll_on_a)
        self.assertNotIn(service_id, b.directory)

        def session_on_b() -> str:
            with ws_connect(f"wss://localhost:{https_port(b)}/api/v1/ws/agent", ssl=ws_ssl(b, cert, key)) as ws:
                return json_type(ws.recv(timeout=10))
        # B reads the certificate and the service it does not know yet itself, with its feed still held
        self.assertEqual((yield deferToThread(session_on_b)), "service_settings")   # authenticated on B
        self.assertIn(service_id, b.directory)
        b.cluster.feed.apply = apply
        held.callback(None)

    @inlineCallbacks
    def test_renewals_after_a_rotation_wait_until_every_controller_trusts_the_new_ca(self):
        """A renewed agent may reconnect to any controller: the renewal requests wait until every live
        controller's TLS context trusts the new CA (the bundle goes out at once)."""
        import time
        a = yield self.controller()
        agent = yield connected_agent(self, a)
        # another controller that is alive but has not applied the rotation yet
        _execute(self.url, "INSERT INTO controllers (id, hostname, started_at, seen_at, leader, ca_generation) "
                           f"VALUES ('lagging', 'elsewhere', 0, {int(time.time()) + 3600}, 0, 1)")
        bundle = next_event(agent, "ca_bundle_updated")
        renewed = next_event(agent, "certificate", timeout=30)
        status, body = yield request_json(a, "POST", "/api/v1/settings/rotate-ca", {})
        self.assertEqual(status, 200, body)
        yield bundle
        yield deferLater(reactor, 1.0, lambda: None)
        self.assertFalse(renewed.called, "no renewal while a controller does not trust generation 2")
        status, listed = yield request_json(a, "GET", "/api/v1/controllers")
        self.assertEqual({c["id"]: c["ca_generation"] for c in listed["controllers"]},
                         {a.directory.controller_id: 2, "lagging": 1})
        _execute(self.url, "UPDATE controllers SET ca_generation = 2 WHERE id = 'lagging'")
        yield renewed
        _execute(self.url, "DELETE FROM controllers WHERE id = 'lagging'")

    @inlineCallbacks
    def test_every_controller_shows_which_one_holds_a_service_and_who_leads(self):
        a = yield self.controller()
        b = yield self.controller()
        agent = yield connected_agent(self, a)
        me = a.directory.controller_id

        def on_b() -> Any:
            return request_json(b, "GET", f"/api/v1/services/{agent.service_id}")
        yield wait_until(lambda: (b.directory.get(agent.service_id) or agent).controller == me, timeout=10)
        status, body = yield on_b()
        self.assertEqual((status, body["connected"], body["controller"], body["ip_address"]),
                         (200, True, me, "127.0.0.1"))
        status, listed = yield request_json(b, "GET", "/api/v1/services?connected=true")
        self.assertEqual([s["id"] for s in listed["services"]], [agent.service_id])
        yield wait_until(lambda: a.cluster.leader or b.cluster.leader, timeout=10)
        status, body = yield request_json(b, "GET", "/api/v1/controllers")
        self.assertEqual(status, 200, body)
        rows = {c["id"]: c for c in body["controllers"]}
        self.assertEqual(set(rows), {me, b.directory.controller_id})
        self.assertEqual(sorted(c["leader"] for c in rows.values()), [False, True])
        self.assertEqual((rows[me]["services"], rows[me]["this"], rows[b.directory.controller_id]["this"]),
                         (1, False, True))
        # the agent goes away: no controller holds it any more, on either
        yield agent.stopService()
        yield wait_until(lambda: b.directory.get(agent.service_id).controller is None, timeout=10)
        status, body = yield on_b()
        self.assertEqual((body["connected"], body["controller"]), (False, None))
        # a controller that stops leaves the list
        yield a.stopService()
        status, body = yield request_json(b, "GET", "/api/v1/controllers")
        self.assertEqual([c["id"] for c in body["controllers"]], [b.directory.controller_id])

    @inlineCallbacks
    def test_deactivation_settings_and_admin_tokens_reach_every_controller(self):
        a = yield self.controller()
        b = yield self.controller()
        agent = yield connected_agent(self, b)
        yield wait_until(lambda: agent.service_id in a.directory, timeout=10)
        closed = next_event(agent, "disconnected")
        status, body = yield request_json(a, "DELETE", f"/api/v1/services/{agent.service_id}")
        self.assertEqual(status, 200, body)
        self.assertEqual((yield closed), (1008, "service deactivated"))
        yield wait_until(lambda: b.directory.get(agent.service_id).status == "deactivated", timeout=10)
        # a network setting changed on A is used by B
        status, body = yield request_json(a, "PUT", "/api/v1/settings/network", {"trusted_proxies": ["127.0.0.9/32"]})
        self.assertEqual(status, 200, body)
        yield wait_until(lambda: [str(n) for n in b.runtime.network.trusted_proxies] == ["127.0.0.9/32"], timeout=10)
        # an admin token made on A works on B, and its revocation on B is honoured by A
        status, created = yield request_json(a, "POST", "/api/v1/admin-tokens", {"name": "ops", "permissions": ["read"]})
        self.assertEqual(status, 201, created)
        yield wait_until(lambda: b.admin_tokens.check(created["token"]) is True, timeout=10)
        status, _ = yield request_json(b, "GET", "/api/v1/services", token=created["token"])
        self.assertEqual(status, 200)
        status, _ = yield request_json(b, "DELETE", f"/api/v1/admin-tokens/{created['id']}")
        self.assertIn(status, (200, 204))
        yield wait_until(lambda: a.admin_tokens.check(created["token"]) is None, timeout=10)
        status, _ = yield request_json(a, "GET", "/api/v1/services", token=created["token"])
        self.assertEqual(status, 401)

    @inlineCallbacks
    def test_twelve_seconds_without_the_database_refuse_writes_keep_reads_and_then_catch_up(self):
        a = yield self.controller()
        b = yield self.controller()
        agent = yield connected_agent(self, b)
        cert = x509.load_pem_x509_certificate(agent_identity(agent)[0])
        revoke = f"/api/v1/certificates/{format_serial(cert.serial_number)}/revoke"
        # A knows the certificate, and where B's agent connected from (B's note of it is committed)
        yield wait_until(lambda: cert.serial_number in a.ca.state.records
                         and a.directory.get(agent.service_id).controller == b.directory.controller_id, timeout=10)
        self.cluster.stop()
        status, body = yield request_json(a, "POST", revoke, {"reason": "keyCompromise"})
        self.assertEqual((status, body["code"]), (503, "storage_unavailable"))
        # without the database: reads keep working on both (the API from memory, readiness says why it is not
        # ready), writes keep being refused, the agent's socket stays; OCSP answers from memory within the
        # staleness bound (10 s by default) and tryLater past it (no controller can tell a revocation elsewhere)
        stopped = reactor.seconds()
        until = stopped + 10
        reads = 0
        while reactor.seconds() < until:
            outcome = yield ocsp_outcome(b, cert, nonce=False)
            if reactor.seconds() - stopped < 8:
                self.assertEqual(outcome, "good")
            elif reactor.seconds() - stopped > 12:
                self.assertEqual(outcome, "try_later")
            status, _ = yield request_json(a, "GET", f"/api/v1/services/{agent.service_id}")
            self.assertEqual(status, 200)
            status, ready = yield request_json(b, "GET", "/readyz", token=None)
            self.assertEqual(status, 503, ready)
            reads += 1
            yield deferLater(reactor, 0.5, lambda: None)
        self.assertGreater(reads, 5)
        yield deferLater(reactor, max(0.0, stopped + 12 - reactor.seconds()), lambda: None)
        self.assertEqual((yield ocsp_outcome(b, cert, nonce=False)), "try_later")
        status, body = yield request_json(b, "POST", "/api/v1/enrollment-tokens", {"name": "during"})
        self.assertEqual((status, body["code"]), (503, "storage_unavailable"))
        self.assertIn(agent.service_id, b.channel.connected)
        self.cluster.start()
        closed = next_event(agent, "disconnected")
        for _ in range(2):   # the first write may meet the dead connection and reconnect
            status, body = yield request_json(a, "POST", revoke, {"reason": "keyCompromise"})
            if status != 503:
                break
        self.assertEqual(status, 200, body)
        # B's listener reconnected by itself and applies what A did
        self.assertEqual((yield closed), (1008, "certificate revoked"))
        self.assertEqual((yield ocsp_status(b, cert)), ocsp.OCSPCertStatus.REVOKED)
        status, ready = yield request_json(b, "GET", "/readyz", token=None)
        self.assertEqual(status, 200, ready)


class LeadershipTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def test_one_controller_leads_and_another_takes_over_when_it_stops(self):
        cluster = PostgresCluster()
        self.addCleanup(cluster.destroy)
        db, kek = cluster.new_database(), kek_file(self)
        a = yield start_controller(self, database=db, ca_key_encryption_key_file=kek)
        b = yield start_controller(self, database=db, ca_key_encryption_key_file=kek)
        (b.settings.data_dir / "admin.token").write_bytes((a.settings.data_dir / "admin.token").read_bytes())
        yield wait_until(lambda: a.cluster.leader or b.cluster.leader, timeout=10)
        self.assertEqual([a.cluster.leader, b.cluster.leader].count(True), 1)
        leader, other = (a, b) if a.cluster.leader else (b, a)
        yield leader.stopService()
        yield wait_until(lambda: other.cluster.leader, timeout=10)
        metrics = yield https_client(other).get(url(other, "/metrics"))
        text = (yield treq.content(metrics)).decode()
        self.assertIn("uptrakit_cluster_leader 1.0", text)

    def test_controllers_starting_together_on_an_empty_database_share_one_ca(self):
        from uptrakitd.process.boot import boot
        cluster = PostgresCluster()
        self.addCleanup(cluster.destroy)
        db, kek = cluster.new_database(), kek_file(self)

        def start() -> bytes:
            booted = boot(build_settings({"data_dir": self.mktemp() + "/data", "database": db,
                                          "ca_key_encryption_key_file": kek}))
            booted.lock.release()
            return booted.state.active().cert.fingerprint(hashes.SHA256())
        fingerprints = together(start, 3)
        self.assertEqual(len(set(fingerprints)), 1, "one CA for the database")
