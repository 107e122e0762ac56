"""docs/deployment/ca-keys.md's SoftHSM2 walk-through followed as written: the token made by its shell block,
the daemon started from its TOML with the unit's SOFTHSM2_CONF, its check printing `pkcs11`.

Only placeholders and absolute paths are changed; `apt-get install` checks the package is there, and the
`uptrakitd` user the guide names (install.md makes it) is mapped to the test's own user by `chown` and
`install -o/-g` shims.
"""
from __future__ import annotations

import os
from pathlib import Path

from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from ..helpers import free_port, require_program, start_controller
from ..softhsm import MODULES
from .guides import Guide, standard_paths

# the guide's user is this test's user: chown to it is a no-op, and install's -o/-g are dropped
_INSTALL = 'args=""; while [ $# -gt 0 ]; do case "$1" in -o|-g) shift 2;; *) args="$args \'$1\'"; shift;; esac; done\n' \
           'eval exec /usr/bin/install $args'
_APT = '[ "$1 $2 $3" = "install -y softhsm2" ] && dpkg -s softhsm2 >/dev/null || { echo "unexpected: apt-get $*" >&2; exit 1; }'


class CaKeysGuideTests(TestCase):
    timeout = 90

    @inlineCallbacks
    def test_the_softhsm2_walk_through_as_written(self):
        require_program("softhsm2-util", "apt-get install softhsm2")
        require_program("curl", "apt-get install curl")
        work = Path(self.mktemp()).resolve()
        work.mkdir(parents=True)
        (work / "etc").mkdir()
        paths = dict(standard_paths(work), **{"/etc/uptrakitd": work / "etc",
                                              "/var/lib/uptrakitd-tokens": work / "tokens",
                                              "/usr/lib/softhsm/libsofthsm2.so": next(
                                                  (m for m in MODULES if os.path.exists(m)), MODULES[0])})
        port = free_port()
        guide = Guide("ca-keys", {"CONTROLLER_PORT": port}, paths,
                      {"chown": "exit 0", "install": _INSTALL, "apt-get": _APT}, work)
        yield guide.run("token")
        self.assertEqual(oct((work / "etc" / "pkcs11.pin").stat().st_mode & 0o777), "0o600")
        self.assertTrue(any((work / "tokens").iterdir()), "the token is in the guide's token directory")

        # the unit's Environment=SOFTHSM2_CONF=…, as the guide's drop-in sets it
        before = os.environ.get("SOFTHSM2_CONF")
        os.environ["SOFTHSM2_CONF"] = str(work / "etc" / "softhsm2.conf")
        self.addCleanup(lambda: os.environ.__setitem__("SOFTHSM2_CONF", before) if before is not None
                        else os.environ.pop("SOFTHSM2_CONF", None))
        toml = work / "uptrakit.toml"
        toml.write_text(guide.block("controller"))
        c = yield start_controller(self, str(work), config=str(toml), data_dir=guide.paths["/var/lib/uptrakitd"],
                                   https_listen=f"tcp:{port}:interface=127.0.0.1")
        self.assertEqual(c.ca.state.active().custody, "pkcs11")
        code, out = yield guide.run("check")
        self.assertEqual(out.strip(), "pkcs11")
