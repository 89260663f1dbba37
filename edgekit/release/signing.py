"""Opt-in Ed25519 signatures over a bundle's ``manifest.json``, so a consumer can tell a bundle's origin.

The manifest lists the sha256 of every other file of the bundle, so signing its exact bytes signs the whole
bundle. ``release build --sign KEY`` writes two files beside the manifest, both left out of its file table
(they are about the manifest, so the manifest cannot list them):

- ``manifest.json.sig``: the raw 64-byte Ed25519 signature of ``manifest.json``'s bytes, so that tools other than
  edgekit can check it too (``openssl pkeyutl -verify -pubin -inkey PUB.pem -rawin -in manifest.json
  -sigfile manifest.json.sig``);
- ``manifest.json.sig.json``: which key signed (the sha256 of its DER SubjectPublicKeyInfo, as
  ``openssl pkey -pubin -in PUB.pem -outform DER | sha256sum`` prints it). It is a hint for the error message
  only: trust comes from the public key the consumer passes, never from a file inside the bundle.

The cryptography itself is the ``cryptography`` library's; only the file layout is edgekit's.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from edgekit.errors import EdgekitError

SIGNATURE = "manifest.json.sig"
SIGNATURE_INFO = "manifest.json.sig.json"
SIGNATURE_FILES = (SIGNATURE, SIGNATURE_INFO)
ALGORITHM = "Ed25519"
_MAKE_KEY = "make one with: openssl genpkey -algorithm ed25519 -out KEY.pem"


def _read_pem(path, what: str) -> bytes:
    p = Path(path)
    if not p.is_file():
        raise EdgekitError(f"the {what} {p} is not a file", f"pass a PEM file ({_MAKE_KEY})")
    try:
        return p.read_bytes()
    except OSError as e:
        raise EdgekitError(f"the {what} {p} could not be read ({e.strerror})", "check its permissions") from None


def load_private_key(path):
    """An unencrypted Ed25519 private key from a PKCS8 PEM file, or one sentence saying what it is instead."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    data = _read_pem(path, "signing key")
    try:
        key = load_pem_private_key(data, password=None)
    except TypeError:  # cryptography's way of saying "encrypted, and no password given"
        raise EdgekitError(f"the signing key {path} is encrypted with a passphrase",
                           "pass an unencrypted copy: openssl pkey -in KEY.pem -out plain.pem") from None
    except ValueError:
        hint = ("it is a public key; --sign takes the private key, --public-key the public one"
                if b"PUBLIC KEY-----" in data else f"pass an unencrypted Ed25519 private key in PEM (PKCS8): {_MAKE_KEY}")
        raise EdgekitError(f"the signing key {path} is not a readable PEM private key", hint) from None
    except Exception as e:  # noqa: BLE001 - cryptography raises UnsupportedAlgorithm for exotic key types
        raise EdgekitError(f"the signing key {path} is not a supported private key ({type(e).__name__})",
                           f"pass an Ed25519 private key in PEM (PKCS8): {_MAKE_KEY}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise EdgekitError(f"the signing key {path} is not an Ed25519 key (it is {_kind(key)})",
                           f"edgekit signs with Ed25519 only: {_MAKE_KEY}")
    return key


def load_public_key(path):
    """An Ed25519 public key from a PEM file (SubjectPublicKeyInfo)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    data = _read_pem(path, "public key")
    try:
        key = load_pem_public_key(data)
    except ValueError:
        hint = ("it is a private key: pass its public half (openssl pkey -in KEY.pem -pubout -out PUB.pem)"
                if b"PRIVATE KEY-----" in data else "pass the Ed25519 public key in PEM that the bundle was signed with")
        raise EdgekitError(f"the public key {path} is not a readable PEM public key", hint) from None
    except Exception as e:  # noqa: BLE001 - UnsupportedAlgorithm
        raise EdgekitError(f"the public key {path} is not a supported public key ({type(e).__name__})",
                           "pass an Ed25519 public key in PEM") from None
    if not isinstance(key, Ed25519PublicKey):
        raise EdgekitError(f"the public key {path} is not an Ed25519 key (it is {_kind(key)})",
                           "pass the Ed25519 public key in PEM that the bundle was signed with")
    return key


def _kind(key) -> str:
    return type(key).__name__.removeprefix("_").replace("PrivateKey", "").replace("PublicKey", "") or "different"


def fingerprint(public_key) -> str:
    """sha256 of the DER SubjectPublicKeyInfo (what ``openssl pkey -pubin -outform DER | sha256sum`` prints)."""
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return hashlib.sha256(public_key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)).hexdigest()


def sign_manifest(private_key, manifest_bytes: bytes, folder: Path) -> str:
    """Write the detached signature and its key hint into ``folder``; returns the key's fingerprint."""
    fp = fingerprint(private_key.public_key())
    (folder / SIGNATURE).write_bytes(private_key.sign(manifest_bytes))
    (folder / SIGNATURE_INFO).write_text(json.dumps({"algorithm": ALGORITHM, "signed_file": "manifest.json",
                                                     "public_key_sha256": fp}, indent=2) + "\n", encoding="utf-8")
    return fp


def check_signature(public_key, manifest_bytes: bytes, signature: bytes | None, info: bytes | None) -> dict | None:
    """None when the signature over ``manifest_bytes`` is valid for ``public_key``; else a problem entry."""
    from cryptography.exceptions import InvalidSignature

    if signature is None:
        return {"problem": "unsigned", "file": SIGNATURE,
                "detail": "a public key was given but the bundle has no signature (built without --sign)"}
    try:
        public_key.verify(signature, manifest_bytes)
        return None
    except InvalidSignature:
        pass
    signed_by = None
    try:
        signed_by = json.loads(info.decode("utf-8")).get("public_key_sha256") if info else None
    except (ValueError, UnicodeDecodeError, AttributeError):
        pass
    given = fingerprint(public_key)
    if isinstance(signed_by, str) and signed_by != given:
        detail = f"not signed by the given key {given[:16]}… (the bundle names key {signed_by[:16]}… as its signer)"
    else:
        detail = f"the signature does not match manifest.json for key {given[:16]}… (changed manifest or signature)"
    return {"problem": "signature", "file": SIGNATURE, "detail": detail}
