"""Device signing keys and the trust store: who may teach this device.

Every device owns one Ed25519 key pair and signs the packets it broadcasts.  A receiver
accepts knowledge only from keys in its trust store, a plain directory of named public
keys that an operator manages with ``skill-edge keys add|rm`` (no PKI, no network look-ups).

Layout under the skill-edge home (``--home``, else ``$SKILL_EDGE_HOME``, else ``~/.skill-edge``)::

    keys/device.pem    this device's private key, PKCS#8 PEM, mode 0600
    keys/device.pub    its public key, SubjectPublicKeyInfo PEM (hand this to other devices)
    trust/<name>.pub   one trusted public key per file; <name> is the operator's label

A key is identified on the wire by its *key id*: the first 16 hex characters (8 bytes) of
sha256 over the 32-byte raw public key.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from skill_edge.runtime.atomic import write_atomically

HOME_ENV = "SKILL_EDGE_HOME"
KEY_ID_BYTES = 8
DEVICE_KEY_FILE = "device.pem"
DEVICE_PUB_FILE = "device.pub"
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")
MAX_KEY_FILE_BYTES = 16 * 1024


class KeyStoreError(ValueError):
    """A key file or trust-store entry that is missing, malformed or conflicting."""


def skill_edge_home(home: str | Path | None = None) -> Path:
    """``home`` if given, else ``$SKILL_EDGE_HOME``, else ``~/.skill-edge``."""
    if home:
        return Path(home).expanduser()
    env = os.environ.get(HOME_ENV)
    return Path(env).expanduser() if env else Path.home() / ".skill-edge"


def raw_public_bytes(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id_bytes(public_key: Ed25519PublicKey) -> bytes:
    """The 8-byte key id carried in packets."""
    return hashlib.sha256(raw_public_bytes(public_key)).digest()[:KEY_ID_BYTES]


def key_id(public_key: Ed25519PublicKey) -> str:
    """The key id as 16 lowercase hex characters (how people and logs see it)."""
    return key_id_bytes(public_key).hex()


def public_pem(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def load_public_key(data: bytes, source: str = "public key") -> Ed25519PublicKey:
    """Ed25519 public key from PEM (SubjectPublicKeyInfo) or 32 raw bytes."""
    try:
        if len(data) == 32:
            return Ed25519PublicKey.from_public_bytes(data)
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise KeyStoreError(f"{source} is not a PEM public key: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise KeyStoreError(f"{source} is a {type(key).__name__}, but skill-edge signs with Ed25519 only")
    return key


def _read_small(path: Path, what: str) -> bytes:
    try:
        size = path.stat().st_size
    except FileNotFoundError as exc:
        raise KeyStoreError(f"{what} {path} does not exist") from exc
    if size > MAX_KEY_FILE_BYTES:
        raise KeyStoreError(f"{what} {path} is {size} bytes; a key file is well under {MAX_KEY_FILE_BYTES}")
    return path.read_bytes()


# ---------------------------------------------------------------------------- device key


@dataclass(frozen=True)
class DeviceKey:
    """This device's signing key."""

    private_key: Ed25519PrivateKey

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self.private_key.public_key()

    @property
    def key_id(self) -> str:
        return key_id(self.public_key)

    def sign(self, message: bytes) -> bytes:
        return self.private_key.sign(message)

    @classmethod
    def generate(cls) -> "DeviceKey":
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load(cls, path: str | Path) -> "DeviceKey":
        path = Path(path)
        data = _read_small(path, "device key")
        if path.stat().st_mode & 0o077:
            raise KeyStoreError(f"device key {path} is readable by others (mode {path.stat().st_mode & 0o777:o}); "
                                f"run: chmod 600 {path}")
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise KeyStoreError(f"device key {path} is not an unencrypted PEM private key: {exc}") from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise KeyStoreError(f"device key {path} is a {type(key).__name__}, not Ed25519")
        return cls(key)

    def save(self, key_dir: str | Path) -> Path:
        """Write ``device.pem`` (0600) and ``device.pub`` into ``key_dir``; returns the private key path."""
        key_dir = Path(key_dir)
        pem = self.private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption())
        write_atomically(key_dir / DEVICE_KEY_FILE, pem, 0o600)
        write_atomically(key_dir / DEVICE_PUB_FILE, public_pem(self.public_key), 0o644)
        return key_dir / DEVICE_KEY_FILE


def key_dir(home: str | Path | None = None) -> Path:
    return skill_edge_home(home) / "keys"


def trust_dir(home: str | Path | None = None) -> Path:
    return skill_edge_home(home) / "trust"


def init_device_key(home: str | Path | None = None, force: bool = False) -> DeviceKey:
    """Create this device's key pair; refuses to replace an existing one unless ``force``."""
    path = key_dir(home) / DEVICE_KEY_FILE
    if path.exists() and not force:
        raise KeyStoreError(f"device key {path} already exists; pass --force to replace it "
                            f"(packets signed with the old key will no longer be trusted by peers)")
    key = DeviceKey.generate()
    key.save(path.parent)
    return key


def load_device_key(home: str | Path | None = None) -> DeviceKey:
    path = key_dir(home) / DEVICE_KEY_FILE
    if not path.exists():
        raise KeyStoreError(f"no device key at {path}; create one with: skill-edge keys init")
    return DeviceKey.load(path)


# ---------------------------------------------------------------------------- trust store


@dataclass(frozen=True)
class TrustedKey:
    name: str
    key_id: str
    public_key: Ed25519PublicKey
    path: Path

    def verify(self, signature: bytes, message: bytes) -> bool:
        try:
            self.public_key.verify(signature, message)
            return True
        except InvalidSignature:
            return False


class TrustStore:
    """A directory of named Ed25519 public keys (``<name>.pub``); re-read on every look-up
    so that ``keys add``/``keys rm`` take effect without restarting a device."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    @classmethod
    def at_home(cls, home: str | Path | None = None) -> "TrustStore":
        return cls(trust_dir(home))

    def keys(self) -> list[TrustedKey]:
        """All trusted keys, sorted by name; a malformed file raises ``KeyStoreError`` naming it."""
        if not self.directory.is_dir():
            return []
        out = []
        for path in sorted(self.directory.glob("*.pub")):
            pub = load_public_key(_read_small(path, "trusted key"), source=f"trusted key {path}")
            out.append(TrustedKey(path.stem, key_id(pub), pub, path))
        return out

    def get(self, key_id_hex: str) -> TrustedKey | None:
        for k in self.keys():
            if k.key_id == key_id_hex:
                return k
        return None

    def add(self, name: str, public_key: Ed25519PublicKey | bytes, overwrite: bool = False) -> TrustedKey:
        if not _NAME_RE.match(name):
            raise KeyStoreError(f"bad key name {name!r}: use 1-64 letters, digits, '_', '-', '.', "
                                f"not starting with '.' or '-'")
        pub = public_key if isinstance(public_key, Ed25519PublicKey) else load_public_key(public_key)
        kid = key_id(pub)
        for k in self.keys():
            if k.key_id == kid and k.name != name:
                raise KeyStoreError(f"key {kid} is already trusted as {k.name!r}")
        path = self.directory / f"{name}.pub"
        if path.exists() and not overwrite:
            raise KeyStoreError(f"a trusted key named {name!r} already exists ({path}); remove it first")
        write_atomically(path, public_pem(pub), 0o644)
        return TrustedKey(name, kid, pub, path)

    def remove(self, name: str) -> TrustedKey:
        """Remove by name or key id."""
        for k in self.keys():
            if name in (k.name, k.key_id):
                k.path.unlink()
                return k
        raise KeyStoreError(f"no trusted key named {name!r} in {self.directory}")
