"""Sign a bundle and check its signature with OpenSSF model-signing (elliptic-curve keys in
PEM files, offline).

The manifest's sha256 values catch corruption, but whoever can edit a file can edit the
manifest too. A signature made with a private key the deployer trusts covers every file of the
bundle (graphs, external data, tokenizer, manifest); verifying it with the public key refuses a
bundle that anyone else changed. Not covered: the signature file itself and `engines/`, which
`sdrt build` writes later on the deploying machine.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import UserError

SIGNATURE = "sdrt.sig"
UNSIGNED = (SIGNATURE, "engines")
INSTALL_HINT = "bundle signatures need model-signing: run `pip install 'sdrt[sign]'`"


def sign_bundle(root: str | Path, private_key: str | Path, password: str | None = None) -> Path:
    """Write ROOT/sdrt.sig, a signature by `private_key` over every file of the bundle."""
    ms = _model_signing()
    root, key = Path(root), _key_file(private_key, "private")
    _check_bundle_dir(root)
    signature = root / SIGNATURE
    hashing = ms.hashing.Config().set_ignored_paths(paths=list(UNSIGNED))
    try:
        config = ms.signing.Config().use_elliptic_key_signer(private_key=key, password=password)
        config.set_hashing_config(hashing).sign(root, signature)
    except (ValueError, TypeError) as err:
        raise UserError(
            f"cannot sign {root} with {key} ({_first_line(err)}); pass an elliptic-curve "
            "private key in PEM format (e.g. `openssl ecparam -genkey -name prime256v1 -noout`)"
        ) from err
    return signature


def verify_bundle(root: str | Path, public_key: str | Path) -> None:
    """Refuse the bundle (UserError) unless ROOT/sdrt.sig is a valid signature by the private
    key matching `public_key` over exactly the files the bundle holds now.

    This is the load-side check behind `Pipeline.load(..., trusted_key=...)`, `sdrt verify`
    and `sdrt serve --trusted-key`: call it before anything in the bundle is read.
    """
    root, key = Path(root), _key_file(public_key, "public")
    _check_bundle_dir(root)
    _verify(
        root,
        root / SIGNATURE,
        key,
        f"{root} is not signed ({SIGNATURE} is missing) and a trusted key was given; "
        f"sign it with `sdrt sign {root} --key PRIVATE.pem` or load it without the key",
        lambda err: (
            f"{root} fails signature verification with {key}: {_reason(err)}; the bundle was "
            "changed after signing or signed with another key, so it is not trusted"
        ),
    )


def file_signature(path: Path) -> Path:
    """Where a single file's signature lies: beside it, named FILE.sig."""
    return path.with_name(f"{path.name}.sig")


def sign_file(path: str | Path, private_key: str | Path, password: str | None = None) -> Path:
    """Write PATH.sig, a signature by `private_key` over one file (a run-time LoRA)."""
    ms = _model_signing()
    path, key = Path(path), _key_file(private_key, "private")
    if not path.is_file():
        raise UserError(f"{path} does not exist or is not a file")
    signature = file_signature(path)
    try:
        ms.signing.Config().use_elliptic_key_signer(private_key=key, password=password).sign(
            path, signature
        )
    except (ValueError, TypeError) as err:
        raise UserError(f"cannot sign {path} with {key} ({_first_line(err)})") from err
    return signature


def verify_file(path: str | Path, public_key: str | Path) -> None:
    """Refuse `path` unless PATH.sig is a valid signature over it by `public_key`'s pair."""
    path, key = Path(path), _key_file(public_key, "public")
    signature = file_signature(path)
    _verify(
        path,
        signature,
        key,
        f"{path.name} is not signed ({signature.name} is missing) and a trusted key was "
        f"given; sign it with `sdrt sign {path.name} --key PRIVATE.pem`",
        lambda err: (
            f"{path.name} fails signature verification with {key}: it was changed after "
            "signing or signed with another key, so it is not trusted"
        ),
    )


def _verify(
    target: Path,
    signature: Path,
    key: Path,
    unsigned: str,
    failed: Callable[[Exception], str],
) -> None:
    """Refuse `target` (a bundle folder or one file) unless `signature` is a valid signature
    over it by `key`'s pair: `unsigned` when there is none, `failed(err)` when it fails."""
    ms = _model_signing()
    if signature.is_symlink() or not signature.is_file():
        raise UserError(unsigned)
    try:
        ms.verifying.Config().use_elliptic_key_verifier(public_key=key).verify(target, signature)
    except Exception as err:  # model-signing reports every failure as a plain exception
        raise UserError(failed(err)) from err


def _model_signing() -> Any:
    try:
        import model_signing
    except ImportError as err:
        raise UserError(INSTALL_HINT) from err
    return model_signing


def _check_bundle_dir(root: Path) -> None:
    if not root.is_dir():
        raise UserError(f"bundle {root} does not exist or is not a directory")


def _key_file(path: str | Path, kind: str) -> Path:
    key = Path(path)
    if not key.is_file():
        raise UserError(f"{kind} key {key} does not exist; pass a PEM file")
    return key


def _reason(err: Exception) -> str:
    """model-signing's message, shortened to what changed: digests are noise to a reader."""
    text = str(err)
    parts = [
        f"{what} since signing: {', '.join(re.findall(pattern, text))}"
        for what, pattern in (
            ("changed", r"Hash mismatch for \\*'([^'\\]+)"),
            ("added", r"Extra files found in model [^:]*: ([^'\"\]]+)"),
            ("removed", r"Missing files in model [^:]*: ([^'\"\]]+)"),
        )
        if re.search(pattern, text)
    ]
    return "; ".join(parts) or _first_line(err)


def _first_line(err: Exception) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__
