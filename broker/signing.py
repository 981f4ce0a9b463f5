"""Signed frames: the aggregator signs what it tells the fleet, agents check it.

The aggregator signs every task definition, round announcement and global adapter with the
fleet's Ed25519 signing key (`Signer`, EDGETUNE_SIGNING_KEY); the frame codec carries the
signature in a trailer (broker.codec, frame format version 2) over the frame's digest, the key
id, the signing time and the topic. An agent given the fleet's public keys (`Keyring`,
EDGETUNE_FLEET_KEYS: from its bundle, `edgetune provision`) checks each of those frames with a
`Verifier` and rejects, counts and logs one that is

    unsigned      no signature (any client allowed to publish there could have written it)
    unknown_key   signed by a key that is not the fleet's
    bad_signature forged or altered (or signed for another topic)
    replayed      signed before the newest frame of its kind the agent accepted: an older run's
                  or an older version's frame sent again

The newest accepted (signing time, run id, version) of each kind is kept in the agent's state
directory (`trust.json`), so a restart does not reopen the window.

Rotation: the aggregator publishes the keys agents are to trust (FleetKeys, retained on the keys
topic), signed with a key they trust now; an agent adopts them (`Verifier.adopt`) and keeps them
in trust.json, where they take the place of the bundle's fleet-keys.pem. A rotation is two such
messages: the current and the next key, signed with the current one; then, once the aggregator
signs with the next key, the next key alone (edgetune.provision `rotate-key`). Signing times are the
aggregator's clock, made strictly increasing within a process; an aggregator moved to a host
whose clock is behind must wait it out or the agents' trust.json be reset (`edgetune-agent`
says so in its rejection).

Needs the `cryptography` package (in the agent and aggregator extras).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from broker.codec import Frame, signed_bytes
from broker.errors import WireError

KEY_ID_SIZE = 8
SIGNED_KINDS = ("task", "round", "global", "model", "keys")  # what the aggregator signs and agents check


class SignatureError(WireError):
    reason = "bad_signature"


class Unsigned(SignatureError):
    reason = "unsigned"


class UnknownKey(SignatureError):
    reason = "unknown_key"


class BadSignature(SignatureError):
    reason = "bad_signature"


class Replayed(SignatureError):
    reason = "replayed"


class KeyFileError(ValueError):
    """A signing or public key file that cannot be used; the message says which and what to do."""


def _ed25519():
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise KeyFileError("signed frames need the cryptography package: pip install 'cryptography>=42' "
                           "(the agent and aggregator extras have it)") from None
    return ed25519, serialization, InvalidSignature


def key_id(public_raw: bytes) -> bytes:
    """A public key's id: the first 8 bytes of the sha256 of its raw 32 bytes."""
    return hashlib.sha256(public_raw).digest()[:KEY_ID_SIZE]


def _raw(public_key) -> bytes:
    _, serialization, _ = _ed25519()
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


class Signer:
    """The fleet's Ed25519 signing key (the aggregator's)."""

    def __init__(self, private_key) -> None:
        self._key = private_key
        self.public_raw = _raw(private_key.public_key())
        self.key_id = key_id(self.public_raw)
        self._last_ms = 0
        self._lock = threading.Lock()

    @classmethod
    def generate(cls) -> "Signer":
        ed25519, _, _ = _ed25519()
        return cls(ed25519.Ed25519PrivateKey.generate())

    @classmethod
    def from_file(cls, path: str | Path) -> "Signer":
        ed25519, serialization, _ = _ed25519()
        p = Path(path)
        try:
            key = serialization.load_pem_private_key(p.read_bytes(), password=None)
        except FileNotFoundError:
            raise KeyFileError(f"signing key {p} does not exist: make one with `edgetune provision init` "
                               "(fleet/signing.key) or unset EDGETUNE_SIGNING_KEY") from None
        except (ValueError, TypeError) as e:
            raise KeyFileError(f"signing key {p} is not an unencrypted PEM private key ({e})") from None
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise KeyFileError(f"signing key {p} is not an Ed25519 key: make one with `edgetune provision init`")
        return cls(key)

    def private_pem(self) -> bytes:
        _, serialization, _ = _ed25519()
        return self._key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption())

    def public_pem(self) -> bytes:
        _, serialization, _ = _ed25519()
        return self._key.public_key().public_bytes(serialization.Encoding.PEM,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo)

    def now_ms(self) -> int:
        """The signing time: the wall clock in ms, strictly increasing within this process."""
        with self._lock:
            self._last_ms = max(int(time.time() * 1000), self._last_ms + 1)
            return self._last_ms

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data)


class Keyring:
    """The public keys an agent trusts, by key id (the fleet's current key, and during a
    rotation the next one)."""

    def __init__(self, public_keys: list) -> None:
        self.keys = {key_id(_raw(k)): k for k in public_keys}
        if not self.keys:
            raise KeyFileError("a keyring needs at least one public key")

    @classmethod
    def from_pem(cls, data: bytes, source: str = "the keyring") -> "Keyring":
        ed25519, serialization, _ = _ed25519()
        marker = b"-----BEGIN PUBLIC KEY-----"
        blocks = [marker + b for b in data.split(marker)[1:]]
        if not blocks:
            raise KeyFileError(f"{source} holds no PEM public key (-----BEGIN PUBLIC KEY-----)")
        keys = []
        for i, block in enumerate(blocks):
            try:
                k = serialization.load_pem_public_key(block)
            except ValueError as e:
                raise KeyFileError(f"{source}: public key {i + 1} is not valid PEM ({e})") from None
            if not isinstance(k, ed25519.Ed25519PublicKey):
                raise KeyFileError(f"{source}: public key {i + 1} is not an Ed25519 key")
            keys.append(k)
        return cls(keys)

    @classmethod
    def from_file(cls, path: str | Path) -> "Keyring":
        p = Path(path)
        try:
            data = p.read_bytes()
        except FileNotFoundError:
            raise KeyFileError(f"fleet keys {p} do not exist: point EDGETUNE_FLEET_KEYS at the fleet-keys.pem "
                               "of this device's bundle (`edgetune provision device`)") from None
        return cls.from_pem(data, str(p))

    def ids(self) -> list[str]:
        return sorted(k.hex() for k in self.keys)

    def pems(self) -> list[str]:
        """Each key as PEM, in key id order (what a FleetKeys message carries)."""
        _, serialization, _ = _ed25519()
        return [self.keys[k].public_bytes(serialization.Encoding.PEM,
                                          serialization.PublicFormat.SubjectPublicKeyInfo).decode()
                for k in sorted(self.keys)]


@dataclass
class Accepted:
    """The newest frame of one kind an agent accepted."""

    signed_at_ms: int
    run_id: str = ""
    number: int = 0  # the global's version, the announcement's round


class Verifier:
    """Checks signed frames against a keyring and refuses replays; `state_path` keeps the newest
    accepted frame of each kind across restarts (None: in memory only)."""

    def __init__(self, keyring: Keyring, state_path: str | Path | None = None) -> None:
        _ed25519()
        self.keyring = keyring
        self.state_path = Path(state_path) if state_path else None
        self.accepted: dict[str, Accepted] = {}
        self.adopted: list[str] = []  # PEM keys from the fleet's keys topic, which replace the bundle's
        if self.state_path is not None and self.state_path.exists():
            try:
                raw = json.loads(self.state_path.read_text())
                self.accepted = {k: Accepted(**v) for k, v in raw.get("accepted", {}).items() if k in SIGNED_KINDS}
                if raw.get("keys"):
                    self.keyring = Keyring.from_pem("".join(raw["keys"]).encode(), str(self.state_path))
                    self.adopted = list(raw["keys"])
            except (ValueError, TypeError, AttributeError) as e:
                raise KeyFileError(f"{self.state_path} is unreadable ({e}); it holds the newest signed frames this "
                                   "agent accepted: restore it, or delete it to accept the fleet's current ones") from None

    def check(self, topic: str, kind: str, frame: Frame, header: Any = None) -> None:
        """Raise a SignatureError unless `frame` (received on `topic`) is signed by a fleet key and
        newer than the last accepted frame of its kind; record it as accepted otherwise."""
        sig = frame.signature
        if sig is None:
            raise Unsigned(f"an unsigned {kind} frame; this agent accepts only frames signed with the fleet's key "
                           f"({', '.join(self.keyring.ids())})")
        key = self.keyring.keys.get(sig.key_id)
        if key is None:
            raise UnknownKey(f"a {kind} frame signed with key {sig.key_id.hex()}, which is not one of the fleet's "
                             f"({', '.join(self.keyring.ids())})")
        _, _, InvalidSignature = _ed25519()
        try:
            key.verify(sig.signature, signed_bytes(sig.digest, sig.key_id, sig.signed_at_ms, topic))
        except InvalidSignature:
            raise BadSignature(f"a {kind} frame whose signature does not verify with fleet key {sig.key_id.hex()}: "
                               "forged, altered, or signed for another topic") from None
        run_id = getattr(header, "run_id", "") or ""
        number = getattr(header, "version", None) if kind in ("global", "model") else getattr(header, "round", 0)
        last = self.accepted.get(kind)
        if last is not None and sig.signed_at_ms < last.signed_at_ms:
            raise Replayed(f"a {kind} frame (run {run_id or '-'}, {number}) signed at {sig.signed_at_ms} ms, before "
                           f"the newest one accepted (run {last.run_id or '-'}, {last.number}, signed at "
                           f"{last.signed_at_ms} ms): a replay. (If the aggregator's clock was set back, delete "
                           f"{self.state_path or 'the agent state'}'s trust record.)")
        if last is None or sig.signed_at_ms > last.signed_at_ms:
            self.accepted[kind] = Accepted(sig.signed_at_ms, run_id, int(number or 0))
            self._save()

    def adopt(self, pems: list[str]) -> None:
        """Trust these keys from now on (a verified FleetKeys message's): they replace the keyring."""
        keyring = Keyring.from_pem("".join(pems).encode(), "the fleet's keys message")
        if keyring.ids() != self.keyring.ids():
            self.keyring, self.adopted = keyring, list(pems)
            self._save()

    def _save(self) -> None:
        if self.state_path is None:
            return
        body = {"accepted": {k: vars(v) for k, v in self.accepted.items()}, "keys": self.adopted}
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(body, indent=1))
        os.replace(tmp, self.state_path)
