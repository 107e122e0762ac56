"""The admin web UI in a real browser (Debian's chromium driven by Playwright), against a real controller.

Two reference agents run in this process, a third is started from the command line the UI shows.
Screenshots of every page at 1280 px and 375 px go to `tests/e2e/output/ui-screenshots/` (the test prints it;
`.ci/run` keeps them as the run's artefacts, outside `_trial_temp`, which the next trial run empties).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from ..channel_helpers import agent_identity, connected_agent
from ..helpers import (admin_token, blocking_get, blocking_tls_socket, ca_pem, env, https_port, missing,
                       request_json, require_program, start_controller)

SHOTS = Path(__file__).resolve().parent / "output" / "ui-screenshots"
UNTRUSTED = "127.0.0.7"    # sends client-certificate headers but is not a trusted proxy
PROXY = "127.0.0.3"        # a trusted proxy that forgets X-Forwarded-For
PAGES = ["overview", "services", "certificates", "rotation", "tokens", "network", "audit", "doctor"]
WIDE, NARROW = 1280, 375


def _playwright() -> Any:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("playwright not installed: pip install playwright")
    return sync_playwright


class Browser:
    """One Chromium page with every console error, CSP violation and failed request recorded."""

    def __init__(self, pw: Any, chromium: str, width: int) -> None:
        self.browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        self.context = self.browser.new_context(ignore_https_errors=True, viewport={"width": width, "height": 900})
        self.context.add_init_script("window.__csp = []; document.addEventListener('securitypolicyviolation', "
                                     "(e) => window.__csp.push(e.violatedDirective + ' ' + e.blockedURI));")
        self.page = self.context.new_page()
        self.page.set_default_timeout(30_000)
        self.errors: list[str] = []
        self.responses: list[tuple[int, str, str]] = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("requestfailed", lambda r: self.errors.append(f"request failed: {r.url} {r.failure}"))
        self.page.on("response", lambda r: self.responses.append((r.status, r.request.method, r.url))
                     if r.status >= 400 else None)

    def resize(self, width: int) -> None:
        self.page.set_viewport_size({"width": width, "height": 900})

    def sign_in(self, base: str, token: str) -> None:
        self.page.goto(base + "/")
        assert self.page.url == base + "/ui/", self.page.url  # GET / sends a browser to the UI
        self.page.fill("#token", token)
        self.page.click("#login-form button[type=submit]")
        self.page.wait_for_selector("#app:not([hidden])")

    def go(self, name: str) -> None:
        self.page.click(f"nav a[data-page={name}]")
        self.page.wait_for_selector(f"#page-{name}:not([hidden])")
        self.page.wait_for_function("() => !document.querySelector('.page:not([hidden]) tbody') || "
                                    "document.querySelector('.page:not([hidden]) tbody').children.length > 0 "
                                    "|| location.hash === '#network'")

    def shoot(self, name: str) -> Path:
        SHOTS.mkdir(parents=True, exist_ok=True)
        path = SHOTS / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path

    def every_page(self, label: str, width: int) -> list[str]:
        """Visit each page at `width`; screenshot it; return pages wider than the window (should be none)."""
        self.resize(width)
        wide = []
        for name in PAGES:
            self.go(name)
            self.shoot(f"{label}-{name}-{width}")
            unlabelled = self.page.evaluate("""() => Array.from(document.querySelectorAll(
                '.page:not([hidden]) input, .page:not([hidden]) select, .page:not([hidden]) textarea'))
                .filter((e) => !e.labels.length && !e.getAttribute('aria-label')).map((e) => e.name || e.id)""")
            assert not unlabelled, f"{name}: controls without a label: {unlabelled}"
            scroll = self.page.evaluate("document.documentElement.scrollWidth")
            if scroll > width:
                wide.append(f"{name}: {scroll} px")
            if width == NARROW:   # no table scrolls sideways either: its rows are cards of labelled lines
                sideways = self.page.evaluate("""() => Array.from(document.querySelectorAll('.page:not([hidden]) .scroll'))
                    .filter((e) => e.scrollWidth > e.clientWidth + 1).map((e) => e.querySelector('table').id)""")
                wide += [f"{name}: table {t} scrolls sideways" for t in sideways]
                unlabelled = self.page.evaluate("""() => Array.from(document.querySelectorAll(
                    '.page:not([hidden]) table.rows tbody td:not([colspan])')).filter((td) => !td.dataset.label).length""")
                if unlabelled:
                    wide.append(f"{name}: {unlabelled} table cells without their column's label")
        return wide

    def problems(self, expected: list[tuple[int, str, str]]) -> list[str]:
        """What went wrong in the page; `expected`: (status, method, path) answers the test provoked, once each."""
        csp = self.page.evaluate("window.__csp")
        bad, expected = [], list(expected)
        for status, method, url in self.responses:
            match = next((e for e in expected if e[:2] == (status, method) and url.endswith(e[2])), None)
            if match:
                expected.remove(match)
            else:
                bad.append(f"{status} {method} {url}")
        # a refused request is logged by Chromium as a console error too; those are judged by status above
        errors = [e for e in self.errors if "Failed to load resource" not in e]
        return errors + [f"CSP: {c}" for c in csp] + bad

    def close(self) -> None:
        self.browser.close()


class UiTests(TestCase):
    timeout = 300

    @classmethod
    def setUpClass(cls) -> None:
        import shutil
        shutil.rmtree(SHOTS, ignore_errors=True)   # this run's screenshots only

    def setUp(self) -> None:
        self.sync_playwright = _playwright()
        self.chromium = require_program("chromium", "apt-get install chromium")

    @inlineCallbacks
    def test_an_operator_runs_the_controller_from_the_browser(self):
        c = yield start_controller(self, trusted_proxies=[PROXY + "/32"],
                                   forwarded_client_cert_pem_header="X-SSL-Client-Cert")
        alpha = yield connected_agent(self, c, friendly_name="alpha")
        bravo = yield connected_agent(self, c, friendly_name="bravo")
        outcome = yield deferToThread(self._walk, c, alpha, bravo)
        print(f"\nUI screenshots: {SHOTS.resolve()}\n" + "\n".join(sorted(p.name for p in SHOTS.glob("admin-*.png"))))
        self.assertEqual(outcome["too_wide"], [], "pages wider than 375 px")
        self.assertEqual(outcome["problems"], [], "console errors, CSP violations or failed requests")

    def _walk(self, c: Any, alpha: Any, bravo: Any) -> dict[str, Any]:
        base = f"https://localhost:{https_port(c)}"
        token = admin_token(c)
        agent_process = None
        with self.sync_playwright() as pw:
            b = Browser(pw, self.chromium, WIDE)
            try:
                b.sign_in(base, token)
                page = b.page
                # the keyboard alone reaches a page: Tab to the navigation, Enter follows the link
                for _ in range(12):
                    page.keyboard.press("Tab")
                    if page.evaluate("document.activeElement.dataset.page") == "tokens":
                        break
                page.keyboard.press("Enter")
                page.wait_for_selector("#page-tokens:not([hidden])")
                assert page.inner_text("#who") == "bootstrap · admin", page.inner_text("#who")
                too_wide = b.every_page("admin-before", NARROW)
                b.resize(WIDE)
                b.every_page("admin-before", WIDE)

                # 0. the overview lists the controllers: with SQLite, this one, leading, holding both agents
                b.go("overview")
                page.wait_for_selector("#ov-controllers tbody tr[data-controller=local]")
                cells = page.locator("#ov-controllers tbody tr").all_inner_texts()
                assert len(cells) == 1 and "leader" in cells[0] and "the only one" in cells[0], cells
                assert cells[0].split("\t")[3] == "2", cells

                # 1. an enrollment token, and the third agent started from the command the UI shows
                b.go("tokens")
                page.fill("#enroll-form input[name=name]", "third agent")
                page.check("#enroll-form input[name=auto_approve]")
                page.click("#enroll-form button[type=submit]")
                page.wait_for_selector("#enroll-created:not([hidden])")
                command = page.inner_text("#enroll-command")
                assert page.inner_text("#enroll-token-text").startswith("upt_"), "no plaintext token shown"
                b.shoot("admin-token-created-1280")
                agent_process = self._run_shown_command(command)
                b.go("services")
                page.wait_for_function("() => document.querySelectorAll('#services-table .dot.on').length === 3")

                # the plaintext is gone once the page is left
                b.go("services")
                b.go("tokens")
                assert page.is_hidden("#enroll-created") and page.inner_text("#enroll-token-text") == "", \
                    "a token's plaintext stayed on screen after leaving the page"

                # a refresh keeps the row with the keyboard focus (rows are updated in place)
                b.go("services")
                focused = page.locator("#services-table tr", has_text="alpha").get_by_role("button", name="Deactivate")
                focused.focus()
                page.evaluate("document.activeElement.dataset.marked = 'yes'")
                page.wait_for_timeout(3500)   # one refresh (every 3 s)
                assert page.evaluate("document.activeElement.dataset.marked") == "yes", \
                    "the refresh moved the keyboard focus"

                # an enrollment token is deleted only after a question
                b.go("tokens")
                page.fill("#enroll-form input[name=name]", "throwaway")
                page.click("#enroll-form button[type=submit]")
                page.locator("#enroll-table tr", has_text="throwaway").get_by_role("button", name="Delete").click()
                page.wait_for_selector("#confirm-dialog[open]")
                assert "throwaway" in page.inner_text("#confirm-dialog")
                page.click("#confirm-ok")
                page.wait_for_selector("#enroll-table tr:has-text('throwaway') >> text=deleted")

                # 2. revoke alpha's certificate: the Services page says disconnected without a reload
                b.go("certificates")
                from uptrakitd.pki.serials import format_serial
                shown = page.locator("#certificates-table .serial").all_inner_texts()
                issued = {format_serial(r.serial) for r in c.ca.state.records.values()}
                assert shown and set(shown) <= issued, f"serials shown whole: {shown[:3]}"
                row = page.locator("#certificates-table tr", has_text="alpha").filter(has_text="valid")
                row.get_by_role("button", name="Revoke…").click()
                page.select_option("#revoke-reason", "keyCompromise")
                page.click("#revoke-confirm")
                page.wait_for_selector("#certificates-table tr:has-text('alpha') >> text=revoked (key compromise")
                # the controller's own server certificate offers no Revoke
                server_row = page.locator("#certificates-table tr", has_text="server certificate").first
                assert server_row.get_by_role("button", name="Revoke…").count() == 0, "Revoke offered on the server certificate"
                b.go("services")
                page.wait_for_selector("#services-table tr:has-text('alpha') td.connected >> text=no", timeout=10_000)

                # 3. rotate the CA and watch the progress reach "all renewed"
                b.go("rotation")
                assert page.inner_text("#rot-summary").startswith("No rotation yet"), page.inner_text("#rot-summary")
                page.click("#rotate")
                page.wait_for_selector("#rotate-dialog[open]")
                b.shoot("admin-rotate-dialog-1280")
                assert page.is_hidden("#rotate-leaving"), "no generation leaves the bundle at the first rotation"
                assert "Rotated to" not in page.inner_text("#rot-summary")
                page.click("#rotate-confirm")
                page.wait_for_selector("#rot-summary >> text=Rotated to generation 2")
                early = page.inner_text("#rot-summary")
                page.wait_for_function("() => document.querySelector('#rot-summary').textContent.includes("
                                       "'Every service holding a certificate renewed')", timeout=60_000)
                summary = page.inner_text("#rot-summary")
                assert "2 of 2 renewed on the new generation" in summary, summary
                assert " UTC (" in summary, f"the rotation's time is given, not only how long ago: {summary}"
                assert c.ca.state.active().generation == 2
                # a second rotation would drop generation 1 from the bundle: the dialog says so (cancelled here)
                page.click("#rotate")
                page.wait_for_selector("#rotate-dialog[open] #rotate-leaving:not([hidden])")
                leaving = page.inner_text("#rotate-leaving")
                assert "Generation 1 leaves the trust bundle" in leaving, leaving
                page.keyboard.press("Escape")
                page.wait_for_selector("#rotate-dialog:not([open])", state="attached")
                assert c.ca.state.active().generation == 2
                print(f"\nrotation progress: first {early!r}, then {summary!r}")
                b.shoot("admin-rotation-done-1280")

                # 4. the proxy doctor: headers from an untrusted address, a trusted proxy without X-Forwarded-For
                cert_pem, key_pem = agent_identity(bravo)
                escaped = urllib.request.quote(cert_pem.decode())
                for source in (UNTRUSTED, PROXY):
                    sock = blocking_tls_socket(https_port(c), ca_pem(c), source=source)
                    status, _ = blocking_get(sock, "/api/v1/whoami", {"X-SSL-Client-Cert": escaped})
                    sock.close()
                    assert status == 200, status
                b.go("doctor")
                advice = page.locator(f".advice[data-peer='{UNTRUSTED}'][data-code=untrusted_sender]")
                advice.wait_for()
                assert f"add {UNTRUSTED}/32 to the trusted proxies" in advice.inner_text(), advice.inner_text()
                assert "--force-settings-override" in advice.inner_text(), "the flag alone would not work"
                page.locator(f".advice[data-peer='{PROXY}'][data-code=no_forwarded_for]").wait_for()
                # the fix that works, from the advice itself: the stored setting, on every controller
                advice.get_by_role("button", name=f"Trust {UNTRUSTED}/32").click()
                page.wait_for_selector("#confirm-dialog[open]")
                page.click("#confirm-ok")
                page.wait_for_function(f"() => !document.querySelector(\".advice[data-peer='{UNTRUSTED}']\")")
                assert [str(n) for n in c.runtime.network.trusted_proxies] == [PROXY + "/32", UNTRUSTED + "/32"]
                row = page.locator(f"#doc-table tr[data-peer='{UNTRUSTED}']")
                assert "yes (was not trusted when last seen)" in row.inner_text(), row.inner_text()

                # 5. network settings: a bad CIDR is shown beside its field; 0.0.0.0/0 asks first, then warns
                b.go("network")
                page.fill("#net-trusted_proxies", "10.0.0.0/33")
                page.click("#network-form button[type=submit]")
                error = page.locator("#net-trusted_proxies-error")
                error.wait_for()
                page.wait_for_function("() => document.querySelector('#net-trusted_proxies-error').textContent")
                assert "trusted_proxies" in error.inner_text(), error.inner_text()
                assert c.runtime.network.trusted_proxies[0].with_prefixlen == PROXY + "/32"
                page.fill("#net-trusted_proxies", "0.0.0.0/0")
                page.click("#network-form button[type=submit]")
                page.wait_for_selector("#confirm-dialog[open]")
                assert "ANY client" in page.inner_text("#confirm-text")
                b.shoot("admin-network-warning-1280")
                page.click("#confirm-ok")
                page.wait_for_selector("#banners .banner[data-code=trusts_everything]")
                page.fill("#net-trusted_proxies", PROXY + "/32")
                page.click("#network-form button[type=submit]")
                page.wait_for_selector("#banners .banner[data-code=trusts_everything]", state="detached")

                # 6. the audit trail names who revoked alpha's certificate and rotated the CA; a row opens its
                # details; the actor's name filters
                b.go("audit")
                page.select_option("#audit-action", "certificate.revoked")
                revoked = page.locator("#audit-table tr[data-action='certificate.revoked']",
                                       has_text="admin token: bootstrap")
                revoked.first.wait_for()
                assert revoked.count() == 1, revoked.count()   # (the others: superseded at the rotation, by system)
                text = revoked.first.inner_text()
                assert "admin token: bootstrap (admin)" in text and "127.0.0.1" in text, text
                revoked.first.get_by_role("button", name="Details").click()
                page.wait_for_selector("#audit-table tr.audit-detail:not([hidden]) >> text=keyCompromise")
                b.shoot("admin-audit-detail-1280")
                page.select_option("#audit-action", "")
                page.wait_for_selector("#audit-table tr[data-action='ca.rotated']")
                page.locator("#audit-table tr[data-action='certificate.revoked']", has_text="admin token: bootstrap") \
                    .get_by_role("button", name="admin token: bootstrap (admin)").click()
                page.wait_for_function("() => document.querySelector('#audit-actor').value && ![...document"
                                       ".querySelectorAll('#audit-table tr[data-action]')].some((r) => "
                                       "r.dataset.action === 'certificate.issued')")
                actions = set(page.locator("#audit-table tr[data-action]").evaluate_all(
                    "(rows) => rows.map((r) => r.dataset.action)"))
                assert {"certificate.revoked", "ca.rotated", "settings.network.changed"} <= actions, actions
                assert "certificate.issued" not in actions, "the actor filter keeps the token's own entries"
                page.fill("#audit-actor", "")
                # the whole trail downloads from the page and verifies offline with the CA fetched elsewhere
                with page.expect_download() as download:
                    page.click("#audit-export")
                exported = Path(download.value.path())
                assert download.value.suggested_filename == "uptrakit-audit.jsonl"
                ca_file = Path(c.tmp) / "ca-for-audit.pem"
                ca_file.write_bytes(c.ca.bundle_pem())
                from uptrakitd.audit import verify as audit_verify
                assert audit_verify.main(["verify", str(exported), "--ca", str(ca_file)]) == 0
                assert len(exported.read_text().splitlines()) >= 10

                # the certificate's panel: what it says, its issuer's custody, its revocation, its PEM, its entries
                b.go("certificates")
                alpha_revoked = page.locator("#certificates-table tr", has_text="alpha").filter(has_text="revoked")
                serial = alpha_revoked.first.locator(".serial").inner_text()
                alpha_revoked.first.locator(".serial").click()
                page.wait_for_selector("#detail-dialog[open] #detail-audit tr[data-action='certificate.revoked']")
                facts = page.inner_text("#detail-facts")
                assert serial in facts and "spiffe://" in facts and "keyCompromise" in facts, facts
                assert "its key: file" in facts, facts
                issued = page.locator("#detail-audit tr[data-action='certificate.issued']")
                assert issued.count() == 1, issued.count()
                with page.expect_download() as download:
                    page.click("#detail-extra a.download")
                pem = Path(download.value.path()).read_bytes()
                from cryptography import x509 as _x509
                assert format(_x509.load_pem_x509_certificate(pem).serial_number, "X") == serial.lstrip("0"), serial
                b.shoot("admin-certificate-panel-1280")
                b.resize(NARROW)
                b.shoot("admin-certificate-panel-375")
                b.resize(WIDE)
                # from it, the service's panel: its certificates and its enrollment
                page.locator("#detail-facts button.link").click()
                page.wait_for_selector("#detail-dialog[open] #detail-audit tr[data-action='service.enrolled']")
                held = page.inner_text("#detail-certificates tbody")
                assert serial in held and "revoked (keyCompromise)" in held, held
                assert "Service alpha" in page.inner_text("#detail-title")
                b.shoot("admin-service-panel-1280")
                b.resize(NARROW)
                b.shoot("admin-service-panel-375")
                b.resize(WIDE)
                page.click("#detail-close")
                page.wait_for_selector("#detail-dialog", state="hidden")

                too_wide += b.every_page("admin-after", NARROW)
                b.every_page("admin-after", WIDE)

                # 7. sign-out forgets the token
                page.click("#logout")
                page.wait_for_selector("#login:not([hidden])")
                assert page.input_value("#token") == "", "the token stayed in the sign-in box"
                assert not page.is_visible("#session") and not page.is_visible("#logout"), \
                    "signed out, the header still shows a session and a Sign out button"
                assert page.get_attribute("#login-error", "class") == "note", "'Signed out.' shown as an error"
                assert page.evaluate("sessionStorage.length") == 0
                return {"too_wide": too_wide, "problems": b.problems([(400, "PUT", "/api/v1/settings/network")])}
            except Exception as e:
                # what the page showed, the page's own errors and the third agent's log: enough to see why
                shot = b.shoot("failure-admin")
                agent_log = (self._agent_dir / "agent.log").read_text(errors="replace")[-3000:] \
                    if agent_process is not None else "(not started)"
                raise AssertionError(f"{e}\nscreenshot: {shot.resolve()}\npage errors: {b.errors}\n"
                                     f"third agent's log:\n{agent_log}") from e
            finally:
                b.close()
                if agent_process is not None:   # the shell and the agent it started
                    os.killpg(agent_process.pid, signal.SIGTERM)
                    agent_process.wait(timeout=20)

    def _run_shown_command(self, command: str) -> subprocess.Popen:
        """Run the UI's lines as an operator pastes them into a shell: the checks, then the agent (left running).
        With one character of the hash changed, the same lines stop at the check and start no agent."""
        workdir = self._agent_dir = Path(self.mktemp())
        workdir.mkdir()
        environ = env()
        environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + environ.get("PATH", "")
        hash_line = next(line for line in command.splitlines() if "sha256sum -c" in line)
        digest = hash_line.split('"')[1].split()[0]
        tampered = command.replace(digest, ("0" if digest[0] != "0" else "1") + digest[1:])
        refused = subprocess.run(["sh", "-c", tampered], cwd=workdir, env=environ, capture_output=True, text=True,
                                 timeout=30)
        assert refused.returncode != 0 and "FAILED" in refused.stdout + refused.stderr, refused
        assert not (workdir / "uptrakit-agent.pid").exists() and not (workdir / "uptrakit-agent").exists(), \
            "an agent started after a failed hash check"
        log = open(workdir / "agent.log", "wb")
        process = subprocess.Popen(["sh", "-c", command], cwd=workdir, env=environ, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 30
        while b"ca.crt: OK" not in (workdir / "agent.log").read_bytes():
            assert time.monotonic() < deadline and process.poll() is None, (workdir / "agent.log").read_text()
            time.sleep(0.1)
        return process

    @inlineCallbacks
    def test_a_read_only_token_sees_every_action_disabled_and_changes_nothing(self):
        c = yield start_controller(self)
        agent = yield connected_agent(self, c, friendly_name="alpha")
        status, created = yield request_json(c, "POST", "/api/v1/admin-tokens", {"name": "auditor",
                                                                                  "permissions": ["read"]})
        self.assertEqual(status, 201)
        before = (c.ca.state.active().generation, c.runtime.network, c.directory.get(agent.state.service()["service_id"]).status)
        outcome = yield deferToThread(self._read_only_walk, c, created["token"])
        self.assertEqual(outcome["enabled"], {}, "actions a read-only session can click")
        self.assertEqual(outcome["api"], [403, 403, 403, 403], "the API let a read-only token act")
        self.assertEqual((c.ca.state.active().generation, c.runtime.network,
                          c.directory.get(agent.state.service()["service_id"]).status), before)
        self.assertEqual(outcome["problems"], [], "unexpected errors (403s from the direct API calls are expected)")

    def _read_only_walk(self, c: Any, token: str) -> dict[str, Any]:
        base = f"https://localhost:{https_port(c)}"
        with self.sync_playwright() as pw:
            b = Browser(pw, self.chromium, WIDE)
            try:
                b.sign_in(base, token)
                assert b.page.inner_text("#who") == "auditor · read", b.page.inner_text("#who")
                assert b.page.is_visible("#readonly-note")
                enabled = {}
                for width in (WIDE, NARROW):
                    b.resize(width)
                    for name in PAGES:
                        b.go(name)
                        b.shoot(f"readonly-{name}-{width}")
                        live = b.page.evaluate("""() => {
                            const page = document.querySelector('.page:not([hidden])');
                            // (.view buttons only read: the audit trail's filters and details)
                            return Array.from(page.querySelectorAll('button:not(.copy):not(.view), input, textarea, select'))
                              .filter((e) => !e.disabled && e.getAttribute('aria-disabled') !== 'true'
                                      && !e.closest('.filters'))
                              .map((e) => e.textContent || e.name || e.id); }""")
                        titles = b.page.evaluate("() => Array.from(document.querySelectorAll('button.action')).map("
                                                 "(e) => e.title)")
                        assert all(t.startswith("Read-only token") for t in titles), titles
                        if live:
                            enabled[f"{name}@{width}"] = live
                # a keyboard user reaches the locked buttons, and a click on one says why it does nothing
                b.go("tokens")
                reached = None
                for _ in range(40):
                    b.page.keyboard.press("Tab")
                    reached = b.page.evaluate("() => { const e = document.activeElement; return e && "
                                              "e.getAttribute('aria-disabled') === 'true' ? e.title : null; }")
                    if reached:
                        break
                assert reached and reached.startswith("Read-only token"), "Tab never reached a locked button"
                b.page.keyboard.press("Enter")
                assert b.page.inner_text("#message").startswith("Read-only token"), b.page.inner_text("#message")
                # the API refuses even when the UI is bypassed
                service_id = b.page.evaluate("(t) => fetch('/api/v1/services', {headers: {Authorization: 'Bearer ' + t}})"
                                             ".then((r) => r.json()).then((j) => j.services[0].id)", token)
                calls = [("POST", "/api/v1/settings/rotate-ca", None), ("DELETE", f"/api/v1/services/{service_id}", None),
                         ("PUT", "/api/v1/settings/network", {"trusted_proxies": ["0.0.0.0/0"]}),
                         ("POST", "/api/v1/enrollment-tokens", {"name": "x"})]
                statuses = []
                for method, path, body in calls:
                    statuses.append(b.page.evaluate(
                        "([m, p, body, t]) => fetch(p, {method: m, headers: {Authorization: 'Bearer ' + t, "
                        "'Content-Type': 'application/json'}, body: body === null ? undefined : "
                        "JSON.stringify(body)}).then((r) => r.status)", [method, path, body, token]))
                return {"enabled": enabled, "api": statuses, "problems": b.problems([(403, m, p) for m, p, _ in calls])}
            finally:
                b.close()

