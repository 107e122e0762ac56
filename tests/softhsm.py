"""A SoftHSM2 token of the test's own (Debian's softhsm2, in a temp dir through SOFTHSM2_CONF)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from .helpers import require_program

MODULES = ("/usr/lib/softhsm/libsofthsm2.so", "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so")
PIN = "31415926"

_LIST = """
import json, sys, pkcs11
from pkcs11 import Attribute, ObjectClass
lib = pkcs11.lib(sys.argv[1])
with lib.get_token(token_label=sys.argv[2]).open(user_pin=sys.argv[3]) as session:
    keys = []
    for key in session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY}):
        keys.append({"label": key[Attribute.LABEL], "id": bytes(key[Attribute.ID]).hex(),
                     "sensitive": key[Attribute.SENSITIVE], "extractable": key[Attribute.EXTRACTABLE],
                     "always_sensitive": key[Attribute.ALWAYS_SENSITIVE],
                     "never_extractable": key[Attribute.NEVER_EXTRACTABLE], "local": key[Attribute.LOCAL]})
print(json.dumps(keys))
"""

_GENERATE = """
import sys, pkcs11
from pkcs11 import Attribute, KeyType
from pkcs11.util.ec import encode_named_curve_parameters, encode_ec_public_key
lib = pkcs11.lib(sys.argv[1])
with lib.get_token(token_label=sys.argv[2]).open(user_pin=sys.argv[3], rw=True) as session:
    params = session.create_domain_parameters(KeyType.EC, {Attribute.EC_PARAMS:
                                              encode_named_curve_parameters(sys.argv[5])}, local=True)
    public, _ = params.generate_keypair(store=True, label=sys.argv[4], id=b"operator",
                                        private_template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False})
    sys.stdout.buffer.write(encode_ec_public_key(public))
"""


class SoftHsm:
    """One initialised token in `directory`; SOFTHSM2_CONF points at it while the test runs (the daemon, its
    PKI worker and the helpers here all read it)."""

    def __init__(self, testcase: Any, label: str = "uptrakit", directory: str | None = None) -> None:
        self.util = require_program("softhsm2-util", "apt-get install softhsm2")
        self.module = next((m for m in MODULES if os.path.exists(m)), MODULES[0])
        self.label = label
        self.dir = Path(directory or testcase.mktemp()).absolute()
        self.tokens = self.dir / "tokens"
        self.tokens.mkdir(parents=True, exist_ok=True)
        self.conf = self.dir / "softhsm2.conf"
        self.conf.write_text(f"directories.tokendir = {self.tokens}\nobjectstore.backend = file\nlog.level = ERROR\n")
        before = os.environ.get("SOFTHSM2_CONF")
        os.environ["SOFTHSM2_CONF"] = str(self.conf)
        testcase.addCleanup(lambda: os.environ.__setitem__("SOFTHSM2_CONF", before) if before is not None
                            else os.environ.pop("SOFTHSM2_CONF", None))
        self.pin_file = self.dir / "pin"
        self.pin_file.write_text(PIN + "\n")
        self.pin_file.chmod(0o600)
        if not any(self.tokens.iterdir()):
            subprocess.run([self.util, "--init-token", "--free", "--label", label, "--pin", PIN,
                            "--so-pin", "27182818"], check=True, capture_output=True, env=self.env())

    def env(self) -> dict[str, str]:
        return dict(os.environ, SOFTHSM2_CONF=str(self.conf))

    def flags(self, uri: str | None = None, **extra: Any) -> dict[str, Any]:
        return {"ca_key_uri": uri or f"pkcs11:token={self.label}", "pkcs11_module": self.module,
                "pkcs11_pin_file": str(self.pin_file), **extra}

    def argv(self, uri: str | None = None) -> list[str]:
        return ["--ca-key-uri", uri or f"pkcs11:token={self.label}", "--pkcs11-module", self.module,
                "--pkcs11-pin-file", str(self.pin_file)]

    def private_keys(self) -> list[dict[str, Any]]:
        """Every private key in the token with its attributes (read by another process)."""
        out = subprocess.run([sys.executable, "-c", _LIST, self.module, self.label, PIN], check=True,
                             capture_output=True, env=self.env()).stdout
        return list(json.loads(out))

    def generate(self, label: str, curve_oid: str = "1.3.132.0.34") -> bytes:
        """An operator-made key pair (as with pkcs11-tool --keypairgen); its public key, DER SubjectPublicKeyInfo."""
        return subprocess.run([sys.executable, "-c", _GENERATE, self.module, self.label, PIN, label, curve_oid],
                              check=True, capture_output=True, env=self.env()).stdout

    def unplug(self) -> None:
        """The token disappears (its directory moves away), as a USB token pulled out."""
        for path in list(self.tokens.iterdir()):
            path.rename(self.dir / ("unplugged-" + path.name))

    def plug(self) -> None:
        for path in list(self.dir.glob("unplugged-*")):
            path.rename(self.tokens / path.name[len("unplugged-"):])
