"""What a CA key's custody costs: certificates issued per second and a 100 000-entry CRL's build time with
the key in a clear file, sealed in the database, and in a SoftHSM2 token (Debian's softhsm2, a token made in
a temp dir). The same code paths the daemon's PKI worker runs (issue.issue_client_certificate, crl.sign_crl),
in one process, one after the other; ratios against the file key of the same run.

Run: .venv/bin/python bench/signer.py [CERTIFICATES]   (default 500)

A sealed key is opened once at start (AES-GCM, printed) and is then the same in-memory key as a file key:
the two differ by noise only. A token key costs a round trip through PKCS#11 per signature.
"""
from __future__ import annotations

import datetime
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cryptography.hazmat.primitives import serialization  # noqa: E402

from uptrakitd.pki.ca import CaGeneration, create_ca  # noqa: E402
from uptrakitd.pki.crl import sign_crl  # noqa: E402
from uptrakitd.pki.issue import issue_client_certificate, load_csr  # noqa: E402
from uptrakitd.pki.keys import SealedKeys  # noqa: E402
from uptrakitd.pki.signer import KeySigner  # noqa: E402
from tests.helpers import make_csr  # noqa: E402

NOW = datetime.datetime.now(datetime.timezone.utc)
SERVICE = "3f0b3c1e-7a4e-4b8e-9a51-0d1e2f3a4b5c"


def softhsm_signer():
    from common import softhsm_token
    from uptrakitd.pki.pkcs11 import Pkcs11Keys, Pkcs11Uri, Token
    module, _ = softhsm_token("bench")
    token = Token.shared(module, "bench", "1234")
    token.open()
    return Pkcs11Keys(token, Pkcs11Uri("bench"), None).new(1)


def sealed_signer():
    keys = SealedKeys([os.urandom(32)])
    sealed = keys.save(1, KeySigner.generate("sealed"))[1]
    opened = []
    for _ in range(20):
        start = time.perf_counter()
        signer = keys.load(1, "", sealed)
        opened.append(time.perf_counter() - start)
    print(f"  (opening the sealed key at start: {statistics.median(opened) * 1000:.2f} ms)")
    return signer


def issue_rate(ca: CaGeneration, count: int) -> float:
    csr = load_csr(make_csr(SERVICE)[0])
    start = time.perf_counter()
    for _ in range(count):
        issue_client_certificate(ca, csr, SERVICE, "agent", "uptrakit.local", datetime.timedelta(days=7), None, NOW)
    return count / (time.perf_counter() - start)


def crl_seconds(ca: CaGeneration, entries: list) -> float:
    der = ca.cert.public_bytes(serialization.Encoding.DER)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        sign_crl(der, ca.signer, entries, 2, NOW.timestamp(), 86400, {})
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 500
    entries = [(n, int(NOW.timestamp()) - 60, "keyCompromise" if n % 7 else "superseded")
               for n in range(10**6, 10**6 + 100_000)]
    rows = []
    for name, make in (("file", lambda: KeySigner.generate("file")), ("sealed", sealed_signer),
                       ("softhsm2", softhsm_signer)):
        print(f"{name}:")
        signer = make()
        ca = CaGeneration(1, create_ca(1, "http://pki.example:8080", NOW, signer), signer)
        rate = issue_rate(ca, count)
        crl = crl_seconds(ca, entries)
        rows.append((name, rate, crl))
    base_rate, base_crl = rows[0][1], rows[0][2]
    print(f"\n{'custody':10} {'issued/s':>10} {'vs file':>8} {'CRL 100k s':>11} {'vs file':>8}")
    for name, rate, crl in rows:
        print(f"{name:10} {rate:10.0f} {rate / base_rate:8.2f} {crl:11.2f} {crl / base_crl:8.2f}")


if __name__ == "__main__":
    main()
