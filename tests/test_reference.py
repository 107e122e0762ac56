"""The project's own reference documents stay true: docs/reference/ is what the code makes (flags, TOML keys,
defaults, routes, error codes), and the README points there, not outside the project."""
from __future__ import annotations

from pathlib import Path

from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from uptrakitd.config import reference

from .helpers import start_controller

ROOT = Path(__file__).resolve().parent.parent
FIX = "run `python -m uptrakitd.config.reference` and commit the result"


class ReferenceTests(TestCase):
    def test_the_configuration_reference_is_what_the_flags_make(self):
        committed = (ROOT / "docs/reference/configuration.md").read_text()
        self.assertEqual(committed, reference.configuration_markdown(), f"configuration.md is stale: {FIX}")

    def test_the_uptrakitctl_reference_is_what_the_command_line_has(self):
        committed = (ROOT / "docs/reference/uptrakitctl.md").read_text()
        self.assertEqual(committed, reference.uptrakitctl_markdown(), f"uptrakitctl.md is stale: {FIX}")
        self.assertIn("## `uptrakitctl ca rotate`", committed)
        self.assertIn("`--wait`", committed)

    @inlineCallbacks
    def test_the_http_reference_lists_every_route_and_error_code(self):
        c = yield start_controller(self)
        router = c.https_site.resource
        committed = (ROOT / "docs/reference/http-api.md").read_text()
        self.assertEqual(committed, reference.http_api_markdown(router.routes, router.resources),
                         f"http-api.md is stale (a route or an error code was added or changed): {FIX}")
        # a route added to the router shows up in what the document must be
        from uptrakitd.web.router import route
        extra = reference.http_api_markdown(router.routes + [route("DELETE", r"/api/v1/new", lambda r: None,
                                                                   admin=True)], router.resources)
        self.assertIn("| `DELETE` | `/api/v1/new` | admin token |", extra)
        self.assertNotEqual(extra, committed)

    def test_error_codes_are_found_where_they_are_raised(self):
        codes = reference.error_codes()
        for code in ("signer_unavailable", "rotation_in_progress", "invalid_reason", "server_certificate",
                     "storage_unavailable", "external_ca"):
            self.assertIn(code, codes)

    def test_the_readme_points_to_the_reference_not_outside_the_project(self):
        readme = (ROOT / "README.md").read_text()
        self.assertNotIn("planning documents", readme)
        for doc in ("docs/reference/configuration.md", "docs/reference/http-api.md", "docs/protocol.md"):
            self.assertIn(doc, readme)
            self.assertTrue((ROOT / doc).exists(), doc)


class PackagingTests(TestCase):
    def test_every_package_of_the_source_tree_is_installed(self):
        """pyproject.toml lists its packages one by one: a new one missing there works from the checkout (and so
        in every test) and is absent from an installed daemon ("No module named …" at start)."""
        import tomllib
        listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
        found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "uptrakitd").rglob("__init__.py")}
        self.assertEqual(sorted(found - listed), [], "packages missing from pyproject.toml")
