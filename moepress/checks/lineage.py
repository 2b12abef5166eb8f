"""Was the candidate fitted to the check's data? The calibrated stages upstream of a candidate.

prune and a calibrated quantize record the sha256 of what their calibration sources read
(``inputs.calibration_sha256`` in moepress-manifest.json); every stage records the checkpoint it
read (``inputs.model``). Following those links from the candidate finds each stage that was
calibrated on the bytes ``check --data`` reads: its perplexity and KL there are in-sample, and
read better than on held-out text.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from moepress.errors import MoepressError
from moepress.manifest import read_manifest

MAX_DEPTH = 8  # export <- quantize <- prune <- ... : far more links than a pipeline has


def upstream(candidate: str | Path) -> Iterator[tuple[Path, dict]]:
    """(directory, its moepress-manifest.json or {}) of ``candidate`` and of each checkpoint upstream of it,
    nearest first, following ``inputs.model``; ends at one without a manifest (an original) or an unreadable one."""
    d, seen = Path(candidate), set()
    d = d if d.is_dir() else d.parent  # an .onnx file: its export directory
    for _ in range(MAX_DEPTH):
        try:
            m = read_manifest(d) if d.is_dir() else {}
        except (OSError, ValueError, MoepressError):  # a damaged manifest upstream: not this check's to judge
            return
        m = m if isinstance(m, dict) else {}
        yield d, m
        up = _inputs(m).get("model")
        # stages record their input resolved; a relative one (older manifests) would be read against
        # this process's directory, which may hold another checkpoint of that name
        if not isinstance(up, str) or not Path(up).is_absolute() or up in seen:
            return
        seen.add(up)
        d = Path(up)


def calibrated_on(candidate: str | Path, data: str) -> list[str]:
    """``"DIR (stage)"`` of each stage upstream of ``candidate`` (itself included) whose calibration sources
    read the same files as the check's ``data`` (a ``--calib``-style source: names and bytes, as
    calib/sources/hashing.py ``content_hash`` covers them); [] when none or unknown."""
    from moepress.calib.data import read_hashes

    try:
        digests = read_hashes((data,))  # a token file: its own bytes and the sources it was sampled from
    except MoepressError:  # a source only the check's own reader accepts: nothing to compare
        return []
    if not digests:
        return []
    return [f"{d} ({m.get('stage')})" for d, m in upstream(candidate)
            if digests & set(_inputs(m).get("calibration_sha256") or [])]


def _inputs(manifest: dict) -> dict:
    """A manifest's ``inputs`` ({} where it has none, or not an object)."""
    v = manifest.get("inputs")
    return v if isinstance(v, dict) else {}


def made_from_another(candidate: str | Path, reference: Path) -> Path | None:
    """The original checkpoint ``candidate`` was made from (the end of its manifests' ``inputs.model`` links),
    where that is known, exists and is not ``reference``: not the same directory, nor one of the same config.json
    (a copy of it). None where it is the reference, a stage between is, or the chain says nothing."""
    chain = [d for d, _ in upstream(candidate)]
    root, ref = chain[-1] if len(chain) > 1 else None, reference.resolve()
    if root is None or not (root / "config.json").is_file() or any(d.resolve() == ref for d in chain):
        return None
    same = (ref / "config.json").is_file() and (root / "config.json").read_bytes() == (ref / "config.json").read_bytes()
    return None if same else root


def quantized_twice(candidate: str | Path, reference: Path) -> bool:
    """Whether more than one ``moepress quantize`` lies between ``candidate`` and ``reference`` (the whole chain
    where the reference is not in it): a quantize of a decoded export of a quantize output carries two roundings,
    and its weights are not the second's rounding of the reference's."""
    ref, n = reference.resolve(), 0
    for d, m in upstream(candidate):
        if d.resolve() == ref:
            break
        n += m.get("stage") == "quantize"
    return n > 1
