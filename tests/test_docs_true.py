"""The hand-written design documents name what the code has: every module in docs/architecture.md's map, every
event in its event table, every WebSocket message and close reason in docs/protocol.md. A module, an event,
a message type or a close reason added without its line fails here; so does an audit action missing from
docs/audit.md."""
from __future__ import annotations

import re
from pathlib import Path

from twisted.trial.unittest import TestCase

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "uptrakitd"


class ArchitectureTests(TestCase):
    def test_every_module_is_in_the_module_map(self):
        text = (ROOT / "docs/architecture.md").read_text()
        whole = set(re.findall(r"`(\w+)/`", text))   # packages described as one row (`store/`, `trust/`, …)
        missing = []
        for path in sorted(PACKAGE.rglob("*.py")):
            relative = path.relative_to(PACKAGE)
            if relative.name == "__init__.py" and relative.parent != Path("."):
                relative = relative.parent
            if relative.parts[0] in whole or relative.name == "__init__.py" or relative.name == "__main__.py":
                continue
            shown = relative.as_posix()
            if f"`{shown}`" not in text and f"`{shown}/`" not in text:
                missing.append(shown)
        self.assertEqual(missing, [], "modules docs/architecture.md does not name")

    def test_every_event_is_in_the_event_table(self):
        from uptrakitd import events
        text = (ROOT / "docs/architecture.md").read_text()
        names = [n for n, v in vars(events).items() if isinstance(v, type) and v.__module__ == events.__name__
                 and n != "EventBus"]
        self.assertTrue(names)
        self.assertEqual([n for n in names if f"| `{n}` |" not in text], [])


class ProtocolTests(TestCase):
    def test_every_message_type_and_close_reason_is_documented(self):
        text = " ".join((ROOT / "docs/protocol.md").read_text().split())   # a phrase may be wrapped
        source = "\n".join(p.read_text() for p in (PACKAGE / "channel").glob("*.py"))
        sent = set(re.findall(r"send\(\s*\"([a-z_]+)\"", source)) | set(re.findall(r"\(\"([a-z_]+)\", \{", source))
        received = set(re.findall(r"\"(enroll|request_certificate|renew_certificate|ping)\"", source))
        self.assertTrue({"certificate", "enrolled", "pong", "service_settings"} <= sent, sent)
        self.assertEqual(sorted(t for t in sent | received if f"`{t}" not in text), [],
                         "message types docs/protocol.md does not name")
        from uptrakitd.channel import wire
        reasons = [v for n, v in vars(wire).items() if n.isupper() and isinstance(v, str)]
        self.assertEqual([r for r in reasons if r not in text], [], "close reasons docs/protocol.md does not name")


class AuditActionTests(TestCase):
    def test_every_audit_action_is_in_the_table_of_docs_audit(self):
        """Each action the code records (action=…, with_entry's third argument, record's first) has its row."""
        import ast
        actions: set[str] = set()
        for path in PACKAGE.rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if not isinstance(node, ast.Call):
                    continue
                name = getattr(node.func, "attr", None) or getattr(node.func, "id", None)
                given = [k.value for k in node.keywords if k.arg == "action"]
                if name == "with_entry" and len(node.args) > 2:
                    given.append(node.args[2])
                if name == "record" and node.args:
                    given.append(node.args[0])
                for value in given:
                    if isinstance(value, ast.Constant) and isinstance(value.value, str) and "." in value.value:
                        actions.add(value.value)
                    elif isinstance(value, ast.JoinedStr):   # f"service.{status}": approved, rejected
                        actions.update({"service.approved", "service.rejected"})
        self.assertGreaterEqual(len(actions), 20, sorted(actions))
        text = (ROOT / "docs/audit.md").read_text()
        self.assertEqual(sorted(a for a in actions if f"`{a}`" not in text.split("## An entry")[0]), [],
                         "actions docs/audit.md's table does not name")
        page = (PACKAGE / "web/ui/index.html").read_text()
        self.assertEqual(sorted(a for a in actions if f"<option>{a}</option>" not in page), [],
                         "actions the web UI's Audit filter does not offer")
