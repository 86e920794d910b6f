"""Signed retained messages: the fleet's Ed25519 key authenticates every model, global, round and service message.

The aggregator wraps the encoded message (the *body*) in a ``signed`` envelope::

    {"v": 1, "kind": "signed", "alg": "ed25519", "key_id": <hex16>, "sig": <bin 64>, "body": <bin>}

``sig`` is the Ed25519 signature of ``sha256(b"fedmq-signed-v1\\0" + topic-channel + b"\\0" + body)``:
the digest of the exact bytes that will be decoded, bound to the channel it is published on (a
signed round announcement cannot be replayed as a global). A chunked message is signed whole: its
chunks carry pieces of the envelope, which is verified after reassembly, before the body is
decoded. ``key_id`` is the first 8 bytes (hex) of sha256 of the raw 32-byte public key.

Agents hold the fleet's public keys (``[agent] trusted_keys``; several during a key rotation) and
refuse, with a counted reason, anything on a signed channel that is unsigned (``unsigned``), signed
by a key they do not hold (``unknown_key``) or whose signature does not verify (``bad_signature``).
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from fedmq.broker.errors import ConfigError, DecodeError

DOMAIN = b"fedmq-signed-v1\0"
KEY_PREFIX = "ed25519:"


def _crypto():
    try:
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:  # pragma: no cover - the extras declare it
        raise ConfigError("model signatures need the 'cryptography' package: pip install 'fedmq[agent]'") from None
    return ed25519


def digest(channel: str, body: bytes | memoryview) -> bytes:
    h = hashlib.sha256(DOMAIN)
    h.update(channel.encode("ascii") + b"\0")
    h.update(body)
    return h.digest()


def key_id(raw_public: bytes) -> str:
    return hashlib.sha256(raw_public).hexdigest()[:16]


def public_key_string(raw_public: bytes) -> str:
    """The form a key takes in configuration files: ``ed25519:<base64 of the raw 32-byte key>``."""
    return KEY_PREFIX + base64.b64encode(raw_public).decode("ascii")


def generate() -> tuple[bytes, str]:
    """A new fleet signing key: (private key PEM, public key string for agents' configs)."""
    from cryptography.hazmat.primitives import serialization

    k = _crypto().Ed25519PrivateKey.generate()
    pem = k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                          serialization.NoEncryption())
    raw = k.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return pem, public_key_string(raw)


class Signer:
    """The aggregator's side: sign bodies with the fleet's private key (PEM, PKCS#8)."""

    def __init__(self, pem: bytes) -> None:
        from cryptography.hazmat.primitives import serialization

        key = serialization.load_pem_private_key(pem, password=None)
        if not isinstance(key, _crypto().Ed25519PrivateKey):
            raise ConfigError("the signing key is not an Ed25519 private key")
        self._key = key
        raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.key_id = key_id(raw)
        self.public = public_key_string(raw)

    @classmethod
    def from_file(cls, path: str | Path) -> "Signer":
        try:
            return cls(Path(path).read_bytes())
        except OSError as e:
            raise ConfigError(f"signing key {path}: {e}") from None
        except ValueError as e:
            raise ConfigError(f"signing key {path}: not a PEM private key ({e})") from None

    def sign(self, channel: str, body: bytes | memoryview) -> bytes:
        return self._key.sign(digest(channel, body))

    def wrap(self, channel: str, body: bytes | memoryview) -> bytes:
        """The encoded ``signed`` envelope of ``body`` (an encoded message) for ``channel``."""
        from fedmq.broker.contract import codec
        from fedmq.broker.contract.messages import Signed

        body = bytes(body)
        return codec.encode(Signed(self.key_id, self.sign(channel, body), body))


@dataclass
class TrustedKeys:
    """The agent's side: the public keys it accepts, by key id."""

    keys: dict[str, object]

    @classmethod
    def parse(cls, entries: Iterable[str]) -> "TrustedKeys":
        ed = _crypto()
        keys: dict[str, object] = {}
        for e in entries:
            if not isinstance(e, str) or not e.startswith(KEY_PREFIX):
                raise ConfigError(f"trusted key {e!r:.60}: use ed25519:<base64 of the 32-byte public key> "
                                  "(fedmq-broker provision writes it)")
            try:
                raw = base64.b64decode(e[len(KEY_PREFIX):], validate=True)
                k = ed.Ed25519PublicKey.from_public_bytes(raw)
            except ValueError as err:
                raise ConfigError(f"trusted key {e!r:.60}: {err}") from None
            keys[key_id(raw)] = k
        return cls(keys)

    def verify(self, channel: str, key: str, sig: bytes | memoryview, body: bytes | memoryview) -> None:
        """Raise DecodeError (``unknown_key`` / ``bad_signature``) unless ``sig`` is a valid signature."""
        from cryptography.exceptions import InvalidSignature

        k = self.keys.get(key)
        if k is None:
            raise DecodeError(f"signed by key {key}, which this agent does not trust", reason="unknown_key")
        try:
            k.verify(bytes(sig), digest(channel, body))  # type: ignore[attr-defined]
        except InvalidSignature:
            raise DecodeError(f"signature by key {key} does not verify", reason="bad_signature") from None
