"""Site-signed spend: each site signs every spending line of its own privacy ledger with an
Ed25519 key only it holds (RFC 8032, through the `cryptography` package Flower installs).

The signature covers what the accounting reads (study, site, round, noise multiplier,
sample rate, steps, delta, accountant) and the signature of the site's previous spending
line in the same study (`previous`, "" for its first), so the site's lines form a chain:
a line changed, or one dropped from the middle, no longer verifies. The signatures travel
with the site's history in every READY and trained reply (the `signed` metric), the
server keeps them on the lines it charges from them, and a release ships them with each
site's public key: `fedsynth privacy verify` then checks that every counted line that is
not a server-side estimate was signed by its site, so a coordinator cannot rewrite the
ledger and the statement consistently without the sites' keys. A site confirms that the
key a release names for it is the public half of the one in its state dir.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    load_pem_private_key,
)

from fedsynth.common.errors import FedsynthError
from fedsynth.common.io import PRIVATE_MODE, atomic_write

KEY_FILE = "spend-signing-key.pem"  # in the site's state dir (0600 in 0700)
SIGNED_FIELDS = (
    "study",
    "site",
    "round",
    "noise_multiplier",
    "sample_rate",
    "steps",
    "delta",
    "accountant",
    "previous",
)


def load_or_create_key(path: Path) -> Ed25519PrivateKey:
    """The site's signing key at `path` (PEM, PKCS8), created owner-only on first use.
    Raises FedsynthError naming the file when it is not an Ed25519 private key."""
    if not path.exists():
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
        atomic_write(path, lambda tmp: tmp.write_bytes(pem), PRIVATE_MODE)
        return key
    try:
        loaded = load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as error:
        raise FedsynthError(f"{path}: not a readable PEM private key ({error})") from None
    if not isinstance(loaded, Ed25519PrivateKey):
        raise FedsynthError(f"{path}: the spend signing key must be Ed25519")
    return loaded


def public_key_hex(key: Ed25519PrivateKey) -> str:
    """The raw 32-byte public key as 64 hex digits: what a release names for the site."""
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()


def signed_message(fields: dict) -> bytes:
    """The bytes signed for one line: SIGNED_FIELDS as canonical JSON (sorted keys, no
    spaces; round and steps as integers, the rates as floats). Raises KeyError for a
    missing field."""
    canonical = {
        "study": str(fields["study"]),
        "site": str(fields["site"]),
        "round": int(fields["round"]),
        "noise_multiplier": float(fields["noise_multiplier"]),
        "sample_rate": float(fields["sample_rate"]),
        "steps": int(fields["steps"]),
        "delta": float(fields["delta"]),
        "accountant": str(fields["accountant"]),
        "previous": str(fields["previous"]),
    }
    return json.dumps(canonical, sort_keys=True, separators=(",", ":")).encode()


def sign(key: Ed25519PrivateKey, fields: dict) -> str:
    """The line's signature, 128 hex digits."""
    return key.sign(signed_message(fields)).hex()


def verify(public_hex: str, fields: dict, signature_hex: str) -> bool:
    """Whether `signature_hex` is `public_hex`'s signature of the line `fields`; False for
    malformed keys or signatures too."""
    try:
        public = Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_hex))
        public.verify(bytes.fromhex(signature_hex), signed_message(fields))
    except (InvalidSignature, ValueError, KeyError, TypeError):
        return False
    return True


def key_path(state_dir: str | os.PathLike) -> Path:
    return Path(state_dir) / KEY_FILE
