"""CA keys in a PKCS#11 token (`--ca-key-uri pkcs11:token=…`, `--pkcs11-module`, `--pkcs11-pin-file`), through
python-pkcs11. Tested with Debian's SoftHSM2; a YubiHSM 2, a Nitrokey HSM or a cloud HSM's PKCS#11 library
take the same path (docs/deployment/ca-keys.md).

New keys are P-384 pairs generated inside the token (CKA_SENSITIVE, not CKA_EXTRACTABLE, CKA_TOKEN), labelled
`uptrakit-ca-g<N>` with a random CKA_ID; a generation's row stores the key's URI with that id (never a PIN),
so a key made by a rotation that was killed before its commit is an orphan nobody loads. An operator-made
key named by the URI's `object` or `id` is used instead of a new one the next time a generation is made at
start.

A `Token` keeps one logged-in session per process (the daemon's, and the PKI worker's own). When an
operation fails (the token was unplugged, the HSM restarted), the module is finalised and initialised
again and the operation tried once more; if that fails too the caller gets SignerUnavailable (HTTP 503
`signer_unavailable`), and the next operation tries again: the daemon recovers by itself when the token
is back.
"""
from __future__ import annotations

import os
import stat
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar
from urllib.parse import quote, unquote, unquote_to_bytes

from cryptography.hazmat.primitives import serialization

from .signer import KeySigner, Signer, SignerUnavailable, TokenSigner

PIN_ENVIRONMENT = "UPTRAKIT_PKCS11_PIN"
_PATH_ATTRIBUTES = {"token", "object", "id", "serial", "manufacturer", "model", "type", "slot-id",
                    "slot-description", "slot-manufacturer", "library-description", "library-manufacturer",
                    "library-version"}
_T = TypeVar("_T")


class TokenError(Exception):
    """The token cannot be used at start; the message is one line that says why and what to do."""


@dataclass(frozen=True)
class Pkcs11Uri:
    """The parts of an RFC 7512 URI this daemon uses: which token, and optionally which key in it."""

    token: str
    object: str | None = None
    id: bytes | None = None
    serial: str | None = None

    @classmethod
    def parse(cls, text: str) -> Pkcs11Uri:
        """The URI's token and key (ValueError with the reason when it is not one this daemon can use)."""
        if not text.startswith("pkcs11:"):
            raise ValueError("must be an RFC 7512 pkcs11: URI (pkcs11:token=LABEL[;object=KEY])")
        path, _, query = text[len("pkcs11:"):].partition("?")
        for part in filter(None, query.split("&")):
            name = part.partition("=")[0]
            if name in ("pin-value", "pin-source"):
                raise ValueError("must not carry the PIN (pin-value, pin-source): give it with --pkcs11-pin-file or "
                                 f"{PIN_ENVIRONMENT}")
            if name == "module-path" or name == "module-name":
                raise ValueError("module-path/module-name: give the module with --pkcs11-module")
        found: dict[str, str] = {}
        key_id = None
        for part in filter(None, path.split(";")):
            name, equals, value = part.partition("=")
            if not equals or name not in _PATH_ATTRIBUTES:
                raise ValueError(f"unknown attribute {name!r}")
            if name == "id":
                key_id = unquote_to_bytes(value)
                if not key_id:
                    raise ValueError("id must be percent-encoded bytes (id=%01%02)")
                continue
            try:
                found[name] = unquote(value, errors="strict")
            except UnicodeDecodeError:
                raise ValueError(f"{name} is not UTF-8 once percent-decoded") from None
        if not found.get("token"):
            raise ValueError("names no token (token=LABEL, as softhsm2-util --show-slots shows it)")
        if found.get("type", "private") != "private":
            raise ValueError("type must be private (the CA's private key)")
        return cls(found["token"], found.get("object") or None, key_id, found.get("serial") or None)

    @staticmethod
    def of_key(token: str, label: str, key_id: bytes) -> str:
        """The URI a generation's row stores for its key (no PIN, no module)."""
        return (f"pkcs11:token={quote(token, safe='')};object={quote(label, safe='')};"
                f"id={''.join(f'%{b:02x}' for b in key_id)};type=private")


_taken: list[bool] = []


def pin_taken_from_environment() -> bool:
    """True once read_pin took the PIN out of the environment (SIGHUP's re-validation then still passes)."""
    return bool(_taken)


def read_pin(pin_file: Path | None) -> str:
    """The user PIN from --pkcs11-pin-file (first line; not readable by others) or UPTRAKIT_PKCS11_PIN, which
    is then removed from the environment: no process started from here on (the PKI worker, multiprocessing's
    resource tracker) inherits it, and it is not in /proc/PID/environ's later copies."""
    if pin_file is None:
        pin = os.environ.pop(PIN_ENVIRONMENT, None)
        if not pin:
            raise TokenError(f"--ca-key-uri needs the token's user PIN: --pkcs11-pin-file FILE (mode 0600) or the "
                             f"environment variable {PIN_ENVIRONMENT}")
        _taken.append(True)
        return pin
    try:
        mode = os.stat(pin_file).st_mode
        text = pin_file.read_text("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise TokenError(f"cannot read --pkcs11-pin-file {pin_file}: {getattr(e, 'strerror', None) or e}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise TokenError(f"{pin_file} is readable by others (mode {stat.S_IMODE(mode):o}): chmod 600 it")
    pin = text.splitlines()[0].strip() if text.strip() else ""
    if not pin:
        raise TokenError(f"--pkcs11-pin-file {pin_file} is empty")
    return pin


def _pkcs11() -> Any:
    try:
        import pkcs11
    except ImportError:
        raise TokenError("--ca-key-uri needs python-pkcs11: pip install 'uptrakitd[pkcs11]'") from None
    return pkcs11


class Token:
    """One token through one module, logged in with the user PIN; one session per process, used under a lock.

    `Token.shared` gives every user in a process the same one (the daemon's components, the PKI worker, and
    in tests several controllers): a module is initialised once per process, so two sessions that each
    re-initialised it would close each other's.
    """

    def __init__(self, module: str, label: str, pin: str, serial: str | None = None) -> None:
        self.module, self.label, self.serial = module, label, serial
        self._pin = pin
        self._lock = threading.RLock()
        self._lib: Any = None
        self._session: Any = None
        self.problem: str | None = None     # why the last operation failed; None once one succeeds

    def __repr__(self) -> str:   # never the PIN
        return f"Token({self.module!r}, {self.label!r})"

    def spec(self) -> tuple[str, str, str, str | None]:
        return (self.module, self.label, self._pin, self.serial)

    @classmethod
    def shared(cls, module: str, label: str, pin: str, serial: str | None = None) -> Token:
        """The process's Token for this module, token and PIN."""
        with _SHARED_LOCK:
            token = _SHARED.get((module, label, pin, serial))
            if token is None:
                token = _SHARED[(module, label, pin, serial)] = cls(module, label, pin, serial)
            return token

    def open(self) -> None:
        """Log in now, afresh (at start): TokenError with one clear line when the module, token or PIN is wrong."""
        with self._lock:
            self._session = None
            try:
                self._ensure_session()
            except TokenError:
                raise
            except Exception as e:
                raise TokenError(self._describe(e)) from None

    def _ensure_session(self) -> Any:
        pkcs11 = _pkcs11()
        if self._session is not None:
            return self._session
        if self._lib is None:
            try:
                self._lib = pkcs11.lib(self.module)   # (one per module and process, whoever asks)
            except pkcs11.exceptions.PKCS11Error as e:
                raise TokenError(f"cannot load the PKCS#11 module {self.module}: {e}") from None
        # a new session starts from a fresh module state: after a failure (a token unplugged and back is only
        # seen again after C_Finalize/C_Initialize), and for a module another Token used before in this process
        self._lib.reinitialize()
        try:
            token = self._lib.get_token(token_label=self.label,
                                        token_serial=self.serial.encode() if self.serial else None)
        except pkcs11.exceptions.NoSuchToken:
            raise TokenError(f"no token labelled {self.label!r} in {self.module} (softhsm2-util --show-slots, or "
                             "pkcs11-tool --module MODULE --list-tokens, lists them)") from None
        except pkcs11.exceptions.MultipleTokensReturned:
            raise TokenError(f"several tokens are labelled {self.label!r}: add serial=… to --ca-key-uri") from None
        try:
            self._session = token.open(user_pin=self._pin, rw=True)
        except pkcs11.exceptions.PinIncorrect:
            raise TokenError(f"the PIN for token {self.label!r} is wrong (--pkcs11-pin-file or "
                             f"{PIN_ENVIRONMENT}); nothing was changed") from None
        except pkcs11.exceptions.PinLocked:
            raise TokenError(f"the user PIN of token {self.label!r} is locked: unlock it with the SO PIN") from None
        return self._session

    def _describe(self, error: Exception) -> str:
        return f"token {self.label!r} ({self.module}) cannot be used: {type(error).__name__} {error}".strip()

    def run(self, what: Callable[[Any], _T]) -> _T:
        """what(session), reopening the session once after a failure; SignerUnavailable when it still fails."""
        with self._lock:
            for attempt in (1, 2):
                try:
                    result = what(self._ensure_session())
                except KeyError:   # no such key (or not the token it was: unplugged): start afresh next time
                    self._session = None
                    raise
                except Exception as e:   # python-pkcs11 raises PKCS11Error subclasses, and GeneralError when gone
                    self._session = None
                    self.problem = str(e) if isinstance(e, TokenError) else self._describe(e)
                    if attempt == 2 or isinstance(e, SignerUnavailable):
                        raise SignerUnavailable(f"the CA key cannot sign: {self.problem}") from None
                    continue
                self.problem = None
                return result
        raise AssertionError("unreachable")

    # -- what the CA needs of it ------------------------------------------------------------------

    def private_key(self, session: Any, key_id: bytes | None, label: str | None) -> Any:
        pkcs11 = _pkcs11()
        found = list(session.get_objects({pkcs11.Attribute.CLASS: pkcs11.ObjectClass.PRIVATE_KEY,
                                          **({pkcs11.Attribute.ID: key_id} if key_id else {}),
                                          **({pkcs11.Attribute.LABEL: label} if label else {})}))
        if len(found) != 1:
            what = f"id {key_id.hex()}" if key_id else f"label {label!r}"
            raise KeyError(f"{'no' if not found else 'more than one'} private key with {what} in token {self.label!r}")
        return found[0]

    def public_key(self, key_id: bytes) -> Any:
        """The public key of the pair with this id, as a cryptography object."""
        pkcs11 = _pkcs11()
        from pkcs11.util.ec import encode_ec_public_key

        def read(session: Any) -> Any:
            key = session.get_key(object_class=pkcs11.ObjectClass.PUBLIC_KEY, id=key_id)
            return serialization.load_der_public_key(encode_ec_public_key(key))
        return self.run(read)

    def find(self, key_id: bytes | None, label: str | None) -> tuple[bytes, str]:
        """(id, label) of the one private key named by id and/or label (SignerUnavailable/KeyError otherwise)."""
        pkcs11 = _pkcs11()

        def look(session: Any) -> tuple[bytes, str]:
            key = self.private_key(session, key_id, label)
            return bytes(key[pkcs11.Attribute.ID]), str(key[pkcs11.Attribute.LABEL])
        return self.run(look)

    def generate(self, label: str) -> bytes:
        """A new P-384 key pair in the token; its CKA_ID."""
        pkcs11 = _pkcs11()
        from pkcs11.util.ec import encode_named_curve_parameters
        key_id = os.urandom(16)

        def make(session: Any) -> None:
            parameters = session.create_domain_parameters(
                pkcs11.KeyType.EC, {pkcs11.Attribute.EC_PARAMS: encode_named_curve_parameters("1.3.132.0.34")},
                local=True)
            parameters.generate_keypair(
                store=True, label=label, id=key_id,
                public_template={pkcs11.Attribute.VERIFY: True},
                private_template={pkcs11.Attribute.SENSITIVE: True, pkcs11.Attribute.EXTRACTABLE: False,
                                  pkcs11.Attribute.PRIVATE: True, pkcs11.Attribute.SIGN: True})
        self.run(make)
        return key_id

    def sign_digest(self, key_id: bytes, digest: bytes) -> bytes:
        pkcs11 = _pkcs11()
        try:
            return self.run(lambda session: bytes(self.private_key(session, key_id, None).sign(
                digest, mechanism=pkcs11.Mechanism.ECDSA)))
        except KeyError as e:   # another token under the same label, or the key deleted
            self.problem = e.args[0]
            raise SignerUnavailable(f"the CA key cannot sign: {e.args[0]}") from None


_SHARED: dict[tuple[str, str, str, str | None], Token] = {}
_SHARED_LOCK = threading.Lock()


class Pkcs11Signer(TokenSigner):
    """A CA key in a token, by CKA_ID."""

    def __init__(self, token: Token, key_id: bytes, label: str, public_key: Any) -> None:
        super().__init__(public_key, "pkcs11")
        self.token, self.key_id, self.label = token, key_id, label

    @property
    def uri(self) -> str:
        return Pkcs11Uri.of_key(self.token.label, self.label, self.key_id)

    def sign_digest(self, digest: bytes) -> bytes:
        return self.token.sign_digest(self.key_id, digest)

    def spec(self) -> tuple[Any, ...]:
        der = self.public_key().public_bytes(serialization.Encoding.DER,
                                             serialization.PublicFormat.SubjectPublicKeyInfo)
        return (signer_from_token_spec, *self.token.spec(), self.key_id, self.label, der)


def signer_from_token_spec(module: str, label: str, pin: str, serial: str | None, key_id: bytes, key_label: str,
                           der: bytes) -> Pkcs11Signer:
    """Pkcs11Signer.spec() made into a signer in this process (the PKI worker), one Token per token."""
    return Pkcs11Signer(Token.shared(module, label, pin, serial), key_id, key_label,
                        serialization.load_der_public_key(der))


class Pkcs11Keys:
    """The key store with --ca-key-uri: new generations in the token; generations made before (clear files,
    sealed rows) are still opened by `older` (FileKeys or SealedKeys)."""

    custody = "pkcs11"

    def __init__(self, token: Token, uri: Pkcs11Uri, older: Any) -> None:
        self.token, self.uri, self.older = token, uri, older

    def new(self, generation: int) -> Signer:
        label = f"uptrakit-ca-g{generation}"
        key_id = self.token.generate(label)
        return Pkcs11Signer(self.token, key_id, label, self.token.public_key(key_id))

    def operator_key(self) -> Signer | None:
        """The key the URI names (object= or id=), made by the operator; None when it names none."""
        if self.uri.object is None and self.uri.id is None:
            return None
        try:
            key_id, label = self.token.find(self.uri.id, self.uri.object)
        except KeyError as e:
            raise TokenError(f"--ca-key-uri: {e.args[0]}") from None
        return Pkcs11Signer(self.token, key_id, label, self.token.public_key(key_id))

    def save(self, generation: int, signer: Any) -> tuple[str, str | None]:
        if isinstance(signer, Pkcs11Signer):
            return signer.uri, None
        return self.older.save(generation, signer)

    def load(self, generation: int, key_file: str, key_sealed: str | None) -> Any:
        if not key_file.startswith("pkcs11:"):
            return self.older.load(generation, key_file, key_sealed)
        stored = Pkcs11Uri.parse(key_file)
        if stored.token != self.token.label:
            raise TokenError(f"CA generation {generation}'s key is in token {stored.token!r}, not in "
                             f"{self.token.label!r} (--ca-key-uri)")
        try:
            key_id, label = self.token.find(stored.id, stored.object)
        except KeyError as e:
            raise TokenError(f"CA generation {generation}'s key: {e.args[0]}") from None
        return Pkcs11Signer(self.token, key_id, label, self.token.public_key(key_id))

    def needs_resealing(self, key_sealed: str | None) -> bool:
        return bool(self.older.needs_resealing(key_sealed))

    def seal(self, generation: int, signer: KeySigner) -> str:
        return str(self.older.seal(generation, signer))
