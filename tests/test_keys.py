"""Device keys (Ed25519 PEM, 0600) and the trust store of named public keys."""

from __future__ import annotations

import hashlib
import stat

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from skill_edge.runtime.exchange.keys import (
    HOME_ENV,
    DeviceKey,
    KeyStoreError,
    TrustStore,
    init_device_key,
    key_id,
    load_device_key,
    load_public_key,
    public_pem,
    skill_edge_home,
)


def test_key_id_is_sha256_of_the_raw_public_key():
    k = DeviceKey.generate()
    raw = k.public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert k.key_id == key_id(k.public_key) == hashlib.sha256(raw).hexdigest()[:16]


def test_device_key_round_trip_with_private_permissions(tmp_path):
    k = DeviceKey.generate()
    path = k.save(tmp_path / "keys")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert b"BEGIN PRIVATE KEY" in path.read_bytes()
    again = DeviceKey.load(path)
    assert again.key_id == k.key_id
    sig = again.sign(b"hello")
    k.public_key.verify(sig, b"hello")
    assert load_public_key((tmp_path / "keys" / "device.pub").read_bytes()).public_bytes_raw() == \
        k.public_key.public_bytes_raw()


def test_world_readable_private_key_is_refused(tmp_path):
    path = DeviceKey.generate().save(tmp_path)
    path.chmod(0o644)
    with pytest.raises(KeyStoreError, match="chmod 600"):
        DeviceKey.load(path)


def test_non_ed25519_keys_are_refused(tmp_path):
    ec_key = ec.generate_private_key(ec.SECP256R1())
    pem = ec_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                               serialization.NoEncryption())
    p = tmp_path / "device.pem"
    p.write_bytes(pem)
    p.chmod(0o600)
    with pytest.raises(KeyStoreError, match="not Ed25519"):
        DeviceKey.load(p)
    pub = ec_key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    with pytest.raises(KeyStoreError, match="Ed25519 only"):
        load_public_key(pub)
    with pytest.raises(KeyStoreError, match="not a PEM public key"):
        load_public_key(b"-----BEGIN PUBLIC KEY-----\ngarbage\n-----END PUBLIC KEY-----\n")


def test_init_refuses_to_replace_a_key_without_force(tmp_path):
    k1 = init_device_key(tmp_path)
    with pytest.raises(KeyStoreError, match="--force"):
        init_device_key(tmp_path)
    assert load_device_key(tmp_path).key_id == k1.key_id
    k2 = init_device_key(tmp_path, force=True)
    assert load_device_key(tmp_path).key_id == k2.key_id != k1.key_id


def test_missing_device_key_says_how_to_make_one(tmp_path):
    with pytest.raises(KeyStoreError, match="skill-edge keys init"):
        load_device_key(tmp_path)


def test_home_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv(HOME_ENV, str(tmp_path / "env-home"))
    assert skill_edge_home() == tmp_path / "env-home"
    assert skill_edge_home(tmp_path / "opt") == tmp_path / "opt"
    monkeypatch.delenv(HOME_ENV)
    assert skill_edge_home().name == ".skill-edge"


def test_trust_store_add_get_list_remove(tmp_path):
    store = TrustStore(tmp_path / "trust")
    assert store.keys() == []
    a, b = DeviceKey.generate(), DeviceKey.generate()
    store.add("agent-a", a.public_key)
    store.add("agent-b", public_pem(b.public_key))
    assert [(k.name, k.key_id) for k in store.keys()] == [("agent-a", a.key_id), ("agent-b", b.key_id)]
    assert store.get(b.key_id).name == "agent-b" and store.get("0" * 16) is None
    assert store.get(a.key_id).verify(a.sign(b"m"), b"m") and not store.get(a.key_id).verify(b.sign(b"m"), b"m")
    with pytest.raises(KeyStoreError, match="already exists"):
        store.add("agent-a", DeviceKey.generate().public_key)
    with pytest.raises(KeyStoreError, match="already trusted as 'agent-a'"):
        store.add("again", a.public_key)
    assert store.remove(a.key_id).name == "agent-a"  # by key id
    assert store.remove("agent-b").key_id == b.key_id  # by name
    assert store.keys() == []
    with pytest.raises(KeyStoreError, match="no trusted key named"):
        store.remove("agent-b")


@pytest.mark.parametrize("name", ["", ".hidden", "-x", "a/b", "../up", "x" * 65, "sp ace"])
def test_trust_store_refuses_bad_names(tmp_path, name):
    with pytest.raises(KeyStoreError, match="bad key name"):
        TrustStore(tmp_path).add(name, DeviceKey.generate().public_key)


def test_malformed_trust_file_is_named(tmp_path):
    (tmp_path / "broken.pub").write_text("not a key")
    with pytest.raises(KeyStoreError, match="broken.pub"):
        TrustStore(tmp_path).keys()
