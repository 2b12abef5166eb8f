"""The seal of a manifest's accuracy section: an HMAC-SHA256 with a key of the user who ran the check.

Why: ``moepress publish`` recomputes what it can of a recorded check (the files' digests, the
verdict from the recorded metrics and gates), but not the metrics and thresholds themselves
without running the check again. The check therefore seals the section it writes; an edit made
afterwards (a threshold raised, a metric lowered, a gate removed) no longer matches the seal.

The key: ``$MOEPRESS_KEY_FILE``, else ``~/.config/moepress/manifest.key``; 32 random bytes, hex,
created on first use with mode 0600 (its directory 0700); a key of one's own is any 32 or more ASCII
characters. A key file that others may read or
write, that another user owns, or whose directory others may write, is refused: whoever can read it can
seal any section, whoever can replace it can seal with their own. Without the key (another machine) publish
cannot verify the seal and refuses (``--force`` publishes on its recomputations alone, and says so).

The MAC covers the canonical JSON of the section without its ``seal`` entry: keys sorted, no
whitespace, ASCII, as the section reads back from the manifest (so a float prints the same way).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
from pathlib import Path

from moepress.errors import MoepressError

KEY_ENV = "MOEPRESS_KEY_FILE"
ALG = "hmac-sha256"


def key_path() -> Path:
    env = os.environ.get(KEY_ENV)
    return Path(env).expanduser() if env else Path.home() / ".config" / "moepress" / "manifest.key"


def _read(path: Path) -> bytes:
    try:
        st = path.stat()
        text = path.read_text(encoding="ascii").strip()
    except UnicodeDecodeError:  # raw random bytes (head -c 64 /dev/urandom): the key is text
        raise MoepressError(f"{path}: not a manifest key (not ASCII text); expected at least 32 ASCII characters, "
                            "as the 64 hex digits of a made key (e.g. `openssl rand -hex 32`)") from None
    except OSError as e:
        raise MoepressError(f"{path}: cannot read the manifest key ({e.strerror or e})") from None
    if st.st_mode & 0o077:
        raise MoepressError(f"{path}: the manifest key may be read or written by others (mode "
                            f"{st.st_mode & 0o777:o}); expected mode 600 (chmod 600 {path})")
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        raise MoepressError(f"{path}: the manifest key belongs to another user (uid {st.st_uid}); expected "
                            f"this user's own key file")
    parent = path.parent.stat()
    if parent.st_mode & 0o022 and not parent.st_mode & 0o1000:  # others could swap the key (sticky: they cannot)
        raise MoepressError(f"{path.parent}: others may write the directory of the manifest key (mode "
                            f"{parent.st_mode & 0o777:o}), so they could replace the key; expected one only its "
                            f"owner writes (chmod go-w {path.parent})")
    if len(text) < 32:
        raise MoepressError(f"{path}: not a manifest key (expected at least 32 ASCII characters, as the 64 hex "
                            "digits of a made key); remove it to make a new one")
    return text.encode("ascii")


def _create(path: Path) -> None:
    """A new key at ``path``, published atomically: written to a private temporary file, then linked
    into place (a concurrent first use keeps whichever key was linked first)."""
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, (secrets.token_hex(32) + "\n").encode("ascii"))
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    except OSError as e:
        raise MoepressError(f"{path}: cannot create the manifest key ({e.strerror}); set {KEY_ENV} to a "
                            f"writable path") from None


def load_key(create: bool = False) -> bytes | None:
    """This user's key; None when there is none and ``create`` is false (another machine)."""
    path = key_path()
    if not path.exists():
        if not create:
            return None
        _create(path)
    return _read(path)


def key_id(key: bytes) -> str:
    """A short public name of a key (names which key sealed a section, reveals nothing of it)."""
    return hashlib.sha256(b"moepress-key-id:" + key).hexdigest()[:16]


def canonical(section: dict) -> bytes:
    body = {k: v for k, v in section.items() if k != "seal"}
    body = json.loads(json.dumps(body, default=str))  # as it reads back from the manifest
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def seal(section: dict, key: bytes) -> dict:
    return {"alg": ALG, "key_id": key_id(key), "mac": hmac.new(key, canonical(section), hashlib.sha256).hexdigest()}


def check_seal(section: dict, key: bytes) -> str | None:
    """What is wrong with the section's seal under ``key`` (None: it matches)."""
    s = section.get("seal")
    if not isinstance(s, dict) or not isinstance(s.get("mac"), str):
        return "the accuracy section is not sealed (edited after the check, or recorded by an older moepress)"
    if not re.fullmatch(r"[0-9a-f]{64}", s["mac"]):
        return "the accuracy section's seal is not an HMAC-SHA256 in hex (edited after the check)"
    if s.get("key_id") != key_id(key):
        return (f"the accuracy section was sealed with another key (id {s.get('key_id')}, this user's is "
                f"{key_id(key)}): edited after the check, or checked by another user or machine; set {KEY_ENV} "
                f"to the key of the check")
    want = hmac.new(key, canonical(section), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(want, s["mac"]):
        return "accuracy section edited after the check (its seal does not match)"
    return None


__all__ = ["ALG", "KEY_ENV", "canonical", "check_seal", "key_id", "key_path", "load_key", "seal"]
