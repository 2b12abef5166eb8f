"""The prune stage's configuration: one frozen dataclass, built from CLI flags or a recipe.

Its fields stay flat: the stage writes ``asdict(cfg)`` into the output manifest and the report,
and the run pipeline hashes it into the stage key.
"""

from __future__ import annotations

from dataclasses import dataclass

from moepress.calib.config import CalibConfig
from moepress.errors import MoepressError

REPORT_NAME = "prune_report.json"
DEFAULT_METHOD = "auto"  # chosen with bench/prune_quality.py (README table)


@dataclass(frozen=True)
class PruneConfig:
    """One prune run. Exactly one of ``ratio`` (fraction of routed experts to drop) and ``keep``."""

    method: str = DEFAULT_METHOD
    ratio: float | None = None
    keep: int | None = None
    ep_size: int = 1
    protect: tuple[tuple[int, int], ...] = ()  # (layer, expert) pairs that always stay
    sequential: bool = False  # statistics of layer i+1 gathered on the already pruned layers 0..i
    calib: tuple[str, ...] = ()
    num_samples: int = 64
    seq_len: int = 256
    seed: int = 0
    # reroute: calibration tokens the search uses (a seeded subsample when there are more);
    # its cache holds about search_tokens * (2 * top_k + 4) * hidden floats.
    search_tokens: int = 16384
    # fold the dropped experts into the kept ones (True / False); None: as the method does (``auto``: where
    # the experts are stored in float; ``merge``: always; the others: never)
    merge: bool | None = None
    # auto: the methods raced, in auto's own order (``parse_race``); () = all of auto's own
    race: tuple[str, ...] = ()

    @classmethod
    def from_flags(cls, *, method: str | None, ratio: float | None, keep: int | None, ep_size: int,
                   protect: str | None, sequential: bool, calib: CalibConfig, search_tokens: int,
                   merge: bool | None = None, race: str | None = None) -> PruneConfig:
        """``moepress prune``'s options; ``protect`` is the ``--protect`` string (``parse_protect``)."""
        if search_tokens < 1:
            raise MoepressError(f"--search-tokens {search_tokens}: expected a positive number")
        return cls(method=method or DEFAULT_METHOD, ratio=ratio, keep=keep, ep_size=ep_size,
                   protect=parse_protect(protect), sequential=sequential, calib=calib.sources,
                   num_samples=calib.num_samples, seq_len=calib.seq_len, seed=calib.seed, search_tokens=search_tokens,
                   merge=merge, race=parse_race(race))

    @classmethod
    def from_recipe(cls, prune: dict, calib: CalibConfig) -> PruneConfig:
        """A recipe's ``prune`` section and its shared calibration (moepress/pipeline/recipe.py)."""
        return cls(method=prune["method"] or DEFAULT_METHOD, ratio=prune["ratio"], keep=prune["keep"],
                   ep_size=prune["ep_size"], protect=parse_protect(prune["protect"]), sequential=prune["sequential"],
                   calib=calib.sources, num_samples=calib.num_samples, seq_len=calib.seq_len,
                   seed=calib.seed, search_tokens=prune["search_tokens"], merge=prune["merge"],
                   race=parse_race(prune.get("race")))


def parse_race(spec: str | None) -> tuple[str, ...]:
    """``"frequency, ean"`` -> ("frequency", "ean"): names, blanks and repeats dropped (the stage checks them)."""
    return tuple(dict.fromkeys(n.strip() for n in (spec or "").split(",") if n.strip()))


def parse_protect(spec: str | None) -> tuple[tuple[int, int], ...]:
    """``"3:5,3:7,10:0"`` -> ((3, 5), (3, 7), (10, 0))."""
    out = []
    for part in (spec or "").split(","):
        part = part.strip()
        if not part:
            continue
        try:
            layer, expert = (int(v) for v in part.split(":"))
        except ValueError:
            raise MoepressError(f"--protect {part!r}: expected LAYER:EXPERT pairs like 3:5,3:7") from None
        if layer < 0 or expert < 0:
            raise MoepressError(f"--protect {part!r}: expected non-negative LAYER:EXPERT")
        out.append((layer, expert))
    if not out and (spec or "").strip():  # ',' protected nothing, where '' is refused as empty
        raise MoepressError(f"--protect {spec!r}: no LAYER:EXPERT pair; expected pairs like 3:5,3:7")
    return tuple(sorted(set(out)))
