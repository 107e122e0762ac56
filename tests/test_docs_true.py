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


def runtime_imports() -> set[tuple[str, str]]:
    """(importer, imported) for every import of an uptrakitd module by another, at any depth (a function-level
    import included), but those under `if TYPE_CHECKING:` (types only)."""
    import ast
    package = Path(__file__).resolve().parents[1] / "uptrakitd"
    edges: set[tuple[str, str]] = set()
    for path in package.rglob("*.py"):
        module = ".".join(path.relative_to(package.parent).with_suffix("").parts).removesuffix(".__init__")
        base = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]

        def visit(node: ast.AST) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                    continue
                if isinstance(child, ast.ImportFrom) and (child.level or (child.module or "").startswith("uptrakitd")):
                    target = child.module or "" if not child.level else \
                        ".".join(base[:len(base) - child.level + 1] + ([child.module] if child.module else []))
                    for alias in child.names:   # `from package import module` imports that module
                        full = f"{target}.{alias.name}"
                        known = (package.parent / (full.replace(".", "/") + ".py")).exists() or \
                            (package.parent / full.replace(".", "/")).is_dir()
                        edges.add((module, full if known else target))
                visit(child)
        visit(ast.parse(path.read_text()))
    return edges


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


class PackagingTests(TestCase):
    def test_every_package_is_installed(self):
        """pyproject.toml lists packages by hand: a package missing there is missing from a (non-editable) install."""
        import tomllib
        listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
        found = {".".join(p.parent.relative_to(ROOT).parts) for p in PACKAGE.rglob("__init__.py")}
        self.assertEqual(sorted(found - listed), [])


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

    def test_no_import_cycle(self):
        """No two modules import each other, directly or around a loop (a function-level import hides none)."""
        graph: dict[str, set[str]] = {}
        for source, target in runtime_imports():
            graph.setdefault(source, set()).add(target)
        cycles, done = [], set()

        def walk(node: str, path: list[str]) -> None:
            if node in path:
                cycles.append(" -> ".join(path[path.index(node):] + [node]))
                return
            if node in done:
                return
            for target in sorted(graph.get(node, ())):
                walk(target, path + [node])
            done.add(node)
        for module in sorted(graph):
            walk(module, [])
        self.assertEqual(cycles, [])

    def test_the_dependency_rules_of_docs_architecture_hold(self):
        """"Dependencies point one way" in docs/architecture.md, checked on the runtime imports (those under
        `if TYPE_CHECKING:` are types only)."""
        edges = runtime_imports()

        def under(name: str, *prefixes: str) -> bool:
            return any(name == f"uptrakitd.{p}" or name.startswith(f"uptrakitd.{p}.") for p in prefixes)
        broken = []
        for source, target in sorted(edges):
            if under(target, "process.daemon", "process.boot") and \
                    source not in ("uptrakitd.process.tap", "uptrakitd.config.reference"):
                broken.append(f"{source} -> {target}: only the entry points run the start-up and the wiring")
            if under(source, "store") and not under(target, "store", "errors"):
                broken.append(f"{source} -> {target}: store/ is engine and SQL code only")
            if under(source, "registry", "pki") and \
                    under(target, "web", "channel", "listen", "cluster", "trust"):
                broken.append(f"{source} -> {target}: the domain does not know its callers")
            if under(source, "listen") and under(target, "web", "channel", "cluster"):
                broken.append(f"{source} -> {target}: listen/ knows only pki")
            if under(source, "audit") and not under(target, "audit", "store"):
                broken.append(f"{source} -> {target}: audit/ knows only store/")
            if under(source, "observability.logs", "observability.metrics") and not under(target, "printable") \
                    and target != "uptrakitd":   # (__version__)
                broken.append(f"{source} -> {target}: logs and metrics, which everything uses, use nothing")
            if under(source, "trust") and under(target, "pki") and not under(target, "pki.state", "pki.serials"):
                broken.append(f"{source} -> {target}: trust/ reads only pki.state")
        self.assertEqual(broken, [])
