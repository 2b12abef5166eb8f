"""What a check measures and the gates it must pass: one frozen config, built from flags or a recipe."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from moepress.calib.model_limits import check_generation
from moepress.calib.sources.spec import TEXT_SUFFIXES
from moepress.errors import MoepressError


def windowed(src: str | None) -> bool:
    """Whether the check's data ``src`` is read as consecutive windows (a text file, or None: the bundled held-out
    text), which no seed draws."""
    return src is None or (Path(src).suffix.lower() in TEXT_SUFFIXES and not Path(src).is_dir())

OFF = ("none", "off")  # not "": an unset CI variable (--max-ppl-increase "$X") must not turn a gate off


def parse_fraction(value, option: str) -> float | None:
    """``2%`` -> 0.02, ``0.02`` -> 0.02, ``none``/``off`` -> None (the gate is off)."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise MoepressError(f"{option} {value}: expected a number such as 0.02 or 2%, or 'none'")
    if isinstance(value, (int, float)):
        out = float(value)
    else:
        s = str(value).strip().lower()
        if s in OFF:
            return None
        try:
            out = float(s[:-1]) / 100.0 if s.endswith("%") else float(s)
        except ValueError:
            raise MoepressError(f"{option} {value}: expected a number such as 0.02 or 2%, or 'none'") from None
    if not math.isfinite(out) or out < 0:
        raise MoepressError(f"{option} {value}: expected a non-negative number")
    name = option.lstrip("-").replace("-", "_")
    if out > 1 and name in AT_MOST_ONE:  # agreement and cosine are at most 1: such a gate never passes
        raise MoepressError(f"{option} {value}: expected at most 1 (100%), a share of tokens or a cosine")
    bare = not (isinstance(value, str) and str(value).strip().endswith("%"))
    if not bare and name in GATE_FIELDS and name not in SHARES:  # 5% of a KL in nats, of a relative error: no meaning
        raise MoepressError(f"{option} {value}: this gate is not a share (a KL divergence in nats, a relative error); "
                            "expected a plain number")
    if bare and out > 1 and name in SHARES:
        # `--max-ppl-increase 2` meant 2% far more often than 200% (a gate that can hardly fail)
        hint = f"for {out:g} x 100% write {out * 100:g}%" if math.isfinite(out * 100) else "'none' turns it off"
        raise MoepressError(f"{option} {value}: expected a fraction such as 0.02 or a percentage such as 2% ({hint})")
    return out


GATE_FIELDS = ("max_ppl_increase", "min_top1", "max_kl", "max_kl_p99", "min_cosine", "max_layer_error",
               "min_routing_overlap", "max_expert_error", "max_expert_error_ratio", "max_weight_error_ratio",
               "max_attention_error_ratio")
# gates whose values are shares, written <= 1 or as %
SHARES = ("max_ppl_increase", "min_top1", "min_cosine", "min_routing_overlap")
AT_MOST_ONE = ("min_top1", "min_cosine", "min_routing_overlap")  # what they gate is at most 1


PROMPT_TOKENS = 16  # tokens of each --generate prompt: the start of an evaluation sample


@dataclass(frozen=True)
class CheckConfig:
    """Accuracy check of a candidate against its reference checkpoint.

    Gates (None turns one off): ``max_ppl_increase`` relative perplexity increase
    (0.02 = 2%); ``min_top1`` top-1 next-token agreement; ``max_kl`` mean KL(ref || cand)
    per token in nats; ``max_kl_p99`` its 99th percentile; ``min_cosine`` the lowest
    per-layer mean cosine similarity of hidden states; ``max_layer_error`` the largest per-layer
    mean relative error of hidden states (1.0: a layer's outputs off by their own size, which no
    quantization or pruning that passes the other gates comes near, while one expert with a wrong
    scale that few eval tokens reach moves the whole-model metrics by a fraction of a percent);
    ``min_routing_overlap`` the lowest per-MoE-layer share of the reference's expert choices the candidate's
    router makes on the same inputs; ``max_expert_error`` the largest error of one routed expert's output on
    the reference's inputs to its layer against the reference expert its router row stands for, relative to
    the smaller of the two, every expert whether the eval tokens reach it or not, the shared experts too
    (checks/routing.py); ``max_expert_error_ratio`` the largest ratio of one expert's error to the median error
    of its layer's routed experts stored alike; ``max_weight_error_ratio`` the largest ratio of one linear's weight
    error to the error its format's rounding to nearest makes on the reference's weight (checks/weights.py);
    and ``max_attention_error_ratio`` of one layer's attention block's own error (on the reference's input to the
    layer) to the median over the layers whose attention is stored alike (checks/peers.py, checks/local.py): a
    fault in one block stands out against its peers.
    Data: ``data`` (None: the bundled held-out text), ``seq_len`` tokens per sample,
    ``max_samples`` samples, ``batch_size``. ``generate`` prompts decoded greedily for
    ``gen_tokens`` tokens each, side by side. ``kind`` the candidate kind (``auto``: detected).
    """

    max_ppl_increase: float | None = 0.02
    min_top1: float | None = 0.85
    max_kl: float | None = 0.05
    max_kl_p99: float | None = None
    min_cosine: float | None = None
    max_layer_error: float | None = 1.0
    min_routing_overlap: float | None = 0.95
    max_expert_error: float | None = 0.5
    max_expert_error_ratio: float | None = 3.0
    max_weight_error_ratio: float | None = 2.0
    max_attention_error_ratio: float | None = 4.0
    data: str | None = None
    seq_len: int = 256
    max_samples: int = 32
    batch_size: int = 8
    seed: int = 0
    generate: int = 0
    gen_tokens: int = 24
    kind: str = "auto"
    trust_remote_code: bool = False
    asked: tuple[str, ...] = ()  # gates given explicitly (an option, a recipe key): never shown unmeasured

    def __post_init__(self):
        for name in GATE_FIELDS:
            object.__setattr__(self, name, parse_fraction(getattr(self, name), name))
        asked = tuple(self.asked) if isinstance(self.asked, (list, tuple)) else None
        if asked is None or not set(asked) <= set(GATE_FIELDS):
            raise MoepressError(f"asked {self.asked!r}: expected gate names among {', '.join(GATE_FIELDS)}")
        object.__setattr__(self, "asked", asked)
        for name, low in (("seq_len", 2), ("max_samples", 1), ("batch_size", 1), ("generate", 0),
                          ("gen_tokens", 1)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise MoepressError(f"{name} {v!r}: expected an integer >= {low}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not -(2**63) <= self.seed < 2**63:
            raise MoepressError(f"seed {self.seed!r}: expected a 64-bit integer")
        for name, typ, what in (("data", (str, type(None)), "a file, directory or dataset name"),
                                ("kind", str, "a candidate kind"), ("trust_remote_code", bool, "true or false")):
            if not isinstance(getattr(self, name), typ):
                raise MoepressError(f"{name} {getattr(self, name)!r}: expected {what}")

    @classmethod
    def from_dict(cls, d: dict, where: str = "check") -> "CheckConfig":
        """From a recipe's ``check:`` section (keys as the fields, ``-`` or ``_``)."""
        known = {f.name for f in fields(cls)} - {"asked"}
        norm = {str(k).replace("-", "_"): v for k, v in (d or {}).items()}
        bad = sorted(set(norm) - known)
        if bad:
            # kind: the runner's, never a recipe's (each artifact is checked as what it is)
            raise MoepressError(f"{where}: unknown key '{bad[0]}' (expected {', '.join(sorted(known - {'kind'}))})")
        try:
            cfg = cls(**norm, asked=tuple(k for k in GATE_FIELDS if k in norm))
        except MoepressError as e:  # the value's own message, under the recipe file and section
            raise MoepressError(f"{where}: {e}") from None
        # keys that would have no effect, refused as the CLI refuses --seed / --gen-tokens
        if "seed" in norm and windowed(cfg.data):
            text = "the text check.data" if cfg.data else "the bundled held-out text (no check.data)"
            raise MoepressError(f"{where}.seed {cfg.seed}: {text} is read as consecutive windows, which no seed "
                                "draws; expected check.seed with JSONL, Parquet, a dataset folder or hf:NAME data")
        if "gen_tokens" in norm and not cfg.generate:
            raise MoepressError(f"{where}.gen_tokens {cfg.gen_tokens}: only with check.generate N (N prompts to "
                                "generate from)")
        if cfg.generate > cfg.max_samples:  # the prompts are the samples' starts: more would be cut silently
            raise MoepressError(f"{where}.generate {cfg.generate}: at most check.max_samples ({cfg.max_samples}), "
                                "since each prompt is the start of one evaluation sample")
        return cfg

    def refuse_long_generations(self, ref_dir: Path) -> None:
        """``generate``'s prompts and new tokens past the reference's positions, refused before any work (of a run's
        stages too)."""
        if self.generate:
            check_generation(ref_dir, min(PROMPT_TOKENS, self.seq_len), self.gen_tokens)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Gate:
    """One threshold on one metric: ``metric op threshold`` must hold."""

    metric: str  # key in the result's metrics
    field: str  # CheckConfig field holding the threshold
    op: str  # "<=" or ">="
    option: str  # the CLI flag
    percent: bool = False  # show as a percentage
    # measured only for some candidates: "layers" (per-layer hidden states), "routing" (a streamed candidate with the
    # reference's experts), "blocks" (a streamed candidate with the reference's layers)
    needs: str = ""


GATES = (
    Gate("ppl_increase", "max_ppl_increase", "<=", "--max-ppl-increase", percent=True),
    Gate("top1_agreement", "min_top1", ">=", "--min-top1"),
    Gate("kl_mean", "max_kl", "<=", "--max-kl"),
    Gate("kl_p99", "max_kl_p99", "<=", "--max-kl-p99"),
    Gate("min_layer_cosine", "min_cosine", ">=", "--min-cosine", needs="layers"),
    Gate("max_layer_rel_error", "max_layer_error", "<=", "--max-layer-error", needs="layers"),
    Gate("min_routing_overlap", "min_routing_overlap", ">=", "--min-routing-overlap", needs="routing"),
    Gate("max_expert_error", "max_expert_error", "<=", "--max-expert-error", needs="routing"),
    Gate("max_expert_error_ratio", "max_expert_error_ratio", "<=", "--max-expert-error-ratio", needs="routing"),
    Gate("max_weight_error_ratio", "max_weight_error_ratio", "<=", "--max-weight-error-ratio", needs="blocks"),
    Gate("max_attention_error_ratio", "max_attention_error_ratio", "<=", "--max-attention-error-ratio",
         needs="blocks"),
)


def _asked(cfg: CheckConfig) -> list[Gate]:
    """The gates asked for: on, and set to other than their default or named in ``cfg.asked``."""
    defaults = CheckConfig()
    return [g for g in GATES if (thr := getattr(cfg, g.field)) is not None
            and (g.field in cfg.asked or thr != getattr(defaults, g.field))]


def _refuse(cfg: CheckConfig, g: Gate, why: str) -> None:
    raise MoepressError(f"{g.option} {getattr(cfg, g.field)} (check.{g.field} in a recipe): {why}; expected the gate "
                        "off ('none') for this candidate")


def refuse_unmeasurable(cfg: CheckConfig, needs: str, why: str, field: str | None = None) -> None:
    """A gate that needs what this candidate does not give (``needs``: per-layer hidden states, a router)
    and was asked for (set to other than its default, or named in ``cfg.asked``) is refused before the check
    runs: a CI job's gate must never pass unmeasured (``field``: only that gate). A default gate nobody asked
    for is shown unmeasured."""
    for g in _asked(cfg):
        if g.needs == needs and field in (None, g.field):
            _refuse(cfg, g, why)


def refuse_unmeasured(cfg: CheckConfig, metrics: dict, why: dict[str, str]) -> None:
    """A gate asked for (as :func:`refuse_unmeasurable`) whose metric the run could not take, refused after it: a
    ratio gate where no block had 2 others stored alike to be held to (``why``: the metric's reason)."""
    for g in _asked(cfg):
        if metrics.get(g.metric) is None:
            _refuse(cfg, g, why.get(g.metric, "not measured for this candidate"))


def fmt(value: float, percent: bool = False, beside: float | None = None) -> str:
    """``value`` for a person (a percentage: signed, two decimals); with the threshold it is judged against
    (``beside``), as many more digits as tell the two apart, so a failing value never prints as the threshold."""
    if value is None:
        return "n/a"
    base = 2 if percent else 4
    bound = None if beside is None or beside == value else fmt(beside, percent)
    for d in range(base, base + 6):
        s = f"{100 * value:+.{d}f}%" if percent else f"{value:.{d}g}"
        if s != bound:
            return s
    return s


def evaluate_gates(cfg: CheckConfig, metrics: dict) -> list[dict]:
    """Every gate that is on: metric, value, op, threshold, passed (a NaN never passes)."""
    out = []
    for g in GATES:
        thr = getattr(cfg, g.field)
        if thr is None:
            continue
        v = metrics.get(g.metric)
        if v is None:  # e.g. no per-layer hidden states from this candidate kind
            out.append({"metric": g.metric, "value": None, "op": g.op, "threshold": thr, "option": g.option,
                        "passed": None, "note": "not measured for this candidate"})
            continue
        ok = (v <= thr) if g.op == "<=" else (v >= thr)
        out.append({"metric": g.metric, "value": v, "op": g.op, "threshold": thr, "option": g.option,
                    "passed": bool(ok and math.isfinite(v)), "percent": g.percent})
    return out


def check_passed(gates: list[dict]) -> bool | None:
    """A check's verdict from its gates: True every applied gate passed, False one failed, None no gate
    was applied (every gate 'none', or none measurable for this candidate): nothing was judged, as
    `moepress publish` recomputes it (checks/verify.py)."""
    applied = [g["passed"] for g in gates if g["passed"] is not None]
    return all(applied) if applied else None


def verdict(passed: bool | None, failed: list[str], word: tuple[str, str] = ("PASS", "FAIL")) -> str:
    """The verdict as the human outputs print it; no gate applied is said, never shown as a pass."""
    if passed is None:
        return "MEASURED, no gate applied (every gate 'none' or not measurable): nothing was judged"
    return word[0] if passed else f"{word[1]}: " + ", ".join(failed)


# a per-layer metric's row key in the check's "layers" rows, and the key naming what in that layer gave it
WHERE = {"max_expert_error": ("expert_error", "worst_expert", "expert "),
         "max_expert_error_ratio": ("expert_error_ratio", "ratio_expert", "expert "),
         "max_weight_error_ratio": ("weight_error_ratio", "weight_module", ""),
         "max_attention_error_ratio": ("attention_error_ratio", None, ""),
         "min_routing_overlap": ("routing_overlap", None, ""),
         "max_layer_rel_error": ("rel_error", None, ""), "min_layer_cosine": ("cosine", None, "")}


def _where(metric: str, value, layers: list[dict] | None) -> str:
    """" at layer L (what)": the layer row whose value is the failing headline value (NaN: the first NaN)."""
    key, what, word = WHERE.get(metric, (None, None, ""))
    if key is None:
        return ""
    for row in layers or []:
        v = row.get(key)
        if v is not None and (v == value or (v != v and value != value)):
            name = row.get(what) if what else None
            return f" at layer {row['layer']}" + (f" ({word}{name})" if name is not None else "")
    return ""


def failure_line(gates: list[dict], jump: dict | None, layers: list[dict] | None = None) -> str:
    """One line: the first failing metric, its value and threshold, the layer (and expert or linear) that gave a
    per-layer metric, the others, and where the error jumps."""
    failed = [g for g in gates if g["passed"] is False]
    first = failed[0]
    worse = ">" if first["op"] == "<=" else "<"
    bound = "max" if first["op"] == "<=" else "min"
    pct = first.get("percent", False)
    line = (f"{first['metric']} {fmt(first['value'], pct, first['threshold'])}"
            f"{_where(first['metric'], first['value'], layers)} "
            f"{worse} {bound} {fmt(first['threshold'], pct)} ({first['option']})")
    if len(failed) > 1:
        line += "; also " + ", ".join(f"{g['metric']} {fmt(g['value'], g.get('percent', False))}"
                                      for g in failed[1:])
    if jump is not None:
        line += (f"; hidden-state error jumps at layer {jump['layer']} "
                 f"(rel. error {jump['before']:.3g} -> {jump['after']:.3g})")
    return line
