"""Was the candidate fitted to the check's data? The calibrated stages upstream of a candidate.

prune and a calibrated quantize record the sha256 of what their calibration sources read
(``inputs.calibration_sha256`` in moepress-manifest.json); every stage records the checkpoint it
read (``inputs.model``). Following those links from the candidate finds each stage that was
calibrated on the bytes ``check --data`` reads: its perplexity and KL there are in-sample, and
read better than on held-out text.
"""

from __future__ import annotations

from pathlib import Path

from moepress.errors import MoepressError
from moepress.manifest import read_manifest

MAX_DEPTH = 8  # export <- quantize <- prune <- ... : far more links than a pipeline has


def calibrated_on(candidate: str | Path, data: str) -> list[str]:
    """``"DIR (stage)"`` of each stage upstream of ``candidate`` (itself included) whose calibration sources
    read the same bytes as the check's ``data`` (a ``--calib``-style source); [] when none or unknown."""
    from moepress.calib.data import read_hashes

    try:
        digests = read_hashes((data,))  # a token file: its own bytes and the sources it was sampled from
    except MoepressError:  # a source only the check's own reader accepts: nothing to compare
        return []
    if not digests:
        return []
    d, seen, hits = Path(candidate), set(), []
    d = d if d.is_dir() else d.parent  # an .onnx file: its export directory
    for _ in range(MAX_DEPTH):
        try:
            m = read_manifest(d) if d.is_dir() else {}
        except (OSError, ValueError, MoepressError):  # a damaged manifest upstream: not this check's to judge
            break
        inputs = m.get("inputs") if isinstance(m, dict) and isinstance(m.get("inputs"), dict) else {}
        if digests & set(inputs.get("calibration_sha256") or []):
            hits.append(f"{d} ({m.get('stage')})")
        up = inputs.get("model")
        # stages record their input resolved; a relative one (older manifests) would be read against
        # this process's directory, which may hold another checkpoint of that name
        if not isinstance(up, str) or not Path(up).is_absolute() or up in seen:
            break
        seen.add(up)
        d = Path(up)
    return hits
