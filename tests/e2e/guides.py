"""Run a deployment guide as written: its `test=NAME` fenced blocks, its placeholder table, its paths.

A guide marks the blocks the tests use with `test=NAME` in the fence's info string (```nginx
test=snippet). The tests fill the placeholders listed in the guide's table (every one must be given,
none may be left) and move the guide's absolute paths into a temporary directory; nothing else of a
block is changed. Shell blocks run with `sh -e` and a PATH where `sudo` simply runs the command and
the proxy's own program is pointed at the test's copy of the package layout.
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any

from twisted.internet.defer import inlineCallbacks

from ..helpers import env, run, spawn

DOCS = Path(__file__).resolve().parents[2] / "docs" / "deployment"
_FENCE = re.compile(r"^```(\w+)[^\n]*\btest=([\w-]+)[^\n]*\n(.*?)^```", re.S | re.M)
_ROW = re.compile(r"^\|\s*`([A-Z][A-Z0-9_]+)`\s*\|", re.M)


class Guide:
    """One guide's tested blocks and placeholders, filled for one test run."""

    def __init__(self, name: str, values: dict[str, Any], paths: dict[str, Path], shims: dict[str, str],
                 workdir: Path) -> None:
        self.path = DOCS / f"{name}.md"
        text = self.path.read_text()
        self.blocks = {m.group(2): m.group(3) for m in _FENCE.finditer(text)}
        self.placeholders = set(_ROW.findall(text))
        missing = self.placeholders - set(values)
        assert not missing, f"{self.path.name}: the test gives no value for {sorted(missing)}"
        unknown = set(values) - self.placeholders
        assert not unknown, f"{self.path.name}: {sorted(unknown)} not in the guide's placeholder table"
        self.values = {k: str(v) for k, v in values.items()}
        self.paths = {k: str(v) for k, v in paths.items()}
        self.workdir = workdir
        self.bin = workdir / "bin"
        self.bin.mkdir(parents=True, exist_ok=True)
        shims = dict(shims, sudo='exec "$@"')
        for name, body in shims.items():
            shim = self.bin / name
            shim.write_text(f"#!/bin/sh\n{body}\n")
            shim.chmod(0o755)

    def block(self, name: str) -> str:
        """Block `name` with the paths moved and the placeholders filled."""
        assert name in self.blocks, f"{self.path.name} has no block marked test={name}"
        text = self.blocks[name]
        for original in sorted(self.paths, key=len, reverse=True):
            text = text.replace(original, self.paths[original])
        for key in sorted(self.values, key=len, reverse=True):   # whole words: not UPTRAKIT_ENROLLMENT_TOKEN
            text = re.sub(rf"\b{key}\b", lambda m, v=self.values[key]: v, text)
        left = [p for p in self.placeholders if re.search(rf"\b{p}\b", text)]
        assert not left, f"{self.path.name} test={name}: placeholders left {left}"
        return text

    def environ(self) -> dict[str, str]:
        e = env()
        e["PATH"] = os.pathsep.join([str(self.bin), str(Path(sys.executable).parent), e.get("PATH", "")])
        return e

    @inlineCallbacks
    def run(self, name: str, cwd: Path | None = None, ok: bool = True) -> Any:
        """Run shell block `name` with sh -e; fires with (exit code, stdout text); asserts success if `ok`."""
        out, err, code = yield run("/bin/sh", "-ec", self.block(name), env=self.environ(),
                                   cwd=str(cwd or self.workdir))
        text = out.decode(errors="replace")
        if ok:
            assert code == 0, f"{self.path.name} test={name} failed ({code}):\n{text}\n{err.decode(errors='replace')}"
        return code, text

    def spawn(self, name: str, cwd: Path) -> Any:
        """Start shell block `name` (a long-running command) in the background; a WatchedProcess."""
        return spawn(["/bin/sh", "-ec", "exec env " + self.block(name).strip()], env=self.environ(), cwd=str(cwd))


# -- nginx: the package's layout ------------------------------------------------------------------

NGINX_PACKAGE_CONF = Path("/etc/nginx/nginx.conf")


def nginx_package_layout(prefix: Path) -> Path:
    """A copy of the package's nginx.conf whose own paths point into `prefix` (conf.d/ is where the snippet goes).

    Changed: the pid file, log and include directories, and the `user` line (the test's files are
    not readable by www-data). sites-enabled/ is empty: the package's default site would take port 80.
    """
    assert NGINX_PACKAGE_CONF.exists(), f"{NGINX_PACKAGE_CONF} missing: apt-get install nginx-light"
    text = NGINX_PACKAGE_CONF.read_text()
    for path, new in (("/run/nginx.pid", prefix / "nginx.pid"), ("/var/log/nginx", prefix / "log"),
                      ("/etc/nginx/conf.d", prefix / "conf.d"), ("/etc/nginx/sites-enabled", prefix / "sites-enabled")):
        assert path in text, f"the package's nginx.conf no longer mentions {path}"
        text = text.replace(path, str(new))
    text = "\n".join(line for line in text.splitlines() if not line.strip().startswith("user "))
    for sub in ("conf.d", "sites-enabled", "log"):
        (prefix / sub).mkdir(parents=True, exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text(text + "\n")
    return conf


def nginx_snippet(guide: Guide, crl: bool) -> str:
    """The guide's conf.d snippet; with `crl`, the edit its comment describes (ssl_crl instead of ssl_ocsp)."""
    snippet = guide.block("snippet")
    if crl:
        snippet = snippet.replace("    ssl_ocsp leaf;", "    # ssl_ocsp leaf;").replace(
            "    ssl_ocsp_responder", "    # ssl_ocsp_responder").replace("    # ssl_crl ", "    ssl_crl ")
        assert "\n    ssl_crl " in snippet and "\n    ssl_ocsp" not in snippet, snippet
    return snippet
