"""The quantize stage's configuration (one frozen dataclass, built from CLI flags or a recipe) and
the constants the stage's steps share.

``QuantConfig``'s fields stay flat: the stage writes ``asdict(cfg)`` into the output manifest and
quant_report.json, and the run pipeline hashes it into the stage key.
"""

from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass

from moepress.calib.config import CalibConfig
from moepress.compress import formats
from moepress.errors import MoepressError

REPORT = "quant_report.json"
PROGRESS = "moepress-quant-progress.json"  # the totals of the finished layers, in OUT.partial (resume)

FORMATS = formats.produced()  # what --format / --rule may name
NONE = "none"  # --rule PATTERN=none: the matching modules stay unquantized (a keyword, not a format)
# --kv-cache: k_scale / v_scale are one static scale per tensor (amax / 448, FP8 E4M3), the cache's format
KV_CACHE_FORMATS = tuple(n for n, f in FORMATS.items() if f.scale == "tensor" and f.static_input)
GROUP_SIZES = (32, 64, 128)

# Linears that read the same input tensor (siblings under one parent): fused by TensorRT-LLM.
SHARED_INPUT = ({"q_proj", "k_proj", "v_proj", "q_a_proj", "kv_a_proj_with_mqa"}, {"gate_proj", "up_proj", "w1", "w3"})
MIN_EXPERT_TOKENS = 8  # fewer routed calibration tokens: the expert's statistics are never its own
# Routed experts with too little evidence (compress/quantize/calibrated.py says the rule and why): an
# expert is "sparse" when calibration routed it fewer than max(MIN_EXPERT_TOKENS, SPARSE_EXPERT_RATIO x its
# input width) tokens; SPARSE_EXPERT_RULE is what it gets ("rtn": round to nearest; "all-tokens": statistics
# from every MoE-input token, llm-compressor's moe_calibrate_all_experts; "borrow": gate/up statistics from
# every token, down rounded to nearest). ALL_TOKENS_STATISTICS: every expert's from every token.
SPARSE_EXPERT_RATIO = 1.0
SPARSE_EXPERT_RULE = "rtn"
ALL_TOKENS_STATISTICS = False
SPARSE_EXPERT_RULES = ("rtn", "all-tokens", "borrow")
AWQ_SAMPLE_ROWS = 1024  # rows of calibration input the AWQ search evaluates per linear group


# the settings of the calibration a config reads (none of them matters to a calibration-free one)
CALIBRATION_FIELDS = ("sequential", "calib", "num_samples", "seq_len", "seed", "batch_size")


@dataclass(frozen=True)
class QuantConfig:
    """One quantize run. ``format`` applies to every linear of every decoder layer unless
    ``rules`` ((pattern, format|"none"), ...) say otherwise for modules whose name (relative to
    the layer, e.g. ``mlp.experts.3.gate_proj``, or full) matches the fnmatch pattern; the first
    matching rule wins."""

    format: str | None = "fp8"
    rules: tuple[tuple[str, str], ...] = ()
    group_size: int = 128
    kv_cache: str | None = None
    # None: sequential (each layer calibrated on the quantized layers before it) when a format in the run
    # rounds its weights by data (AWQ / GPTQ), which then fits the inputs it will see; one pass over the
    # unquantized model when only activation scales are calibrated (fp8, nvfp4), as Model-Optimizer and
    # TensorRT-LLM calibrate them: a quantized prefix only adds its noise to a per-tensor amax
    # (bench/quant_suite.py compares both over calibration seeds).
    sequential: bool | None = None
    calib: tuple[str, ...] = ()
    num_samples: int = 64
    seq_len: int = 256
    seed: int = 0
    batch_size: int = 8
    gptq_damp: float = 0.01
    # GPTQ columns by decreasing Hessian diagonal (llm-compressor's "static" act order) or in order.
    # None: act order for AWQ + GPTQ, in order for plain GPTQ (Model-Optimizer's GPTQ order), the
    # better of the two for each over calibration seeds and models (--gptq-act-order / --no-gptq-act-order
    # compare them).
    gptq_act_order: bool | None = None
    # AWQ (int4-awq, w4a8-awq): after the scale search, the smoothed weight W / pre_quant_scale is
    # rounded by GPTQ on the smoothed input's Hessian (scales amax / 7), llm-compressor's AWQ + GPTQ
    # stacking (bench/quant_quality.py compares it with round-to-nearest). The stored format is unchanged.
    awq_gptq: bool = True
    # with awq_gptq off: the clip search after the scale search (llm-awq auto_clip, modelopt awq_clip,
    # its awq_full); both off = modelopt's awq_lite
    awq_clip: bool = True
    # AWQ's smoothing folded into the preceding norm / v_proj / up_proj (llm-compressor's form, one vector
    # shared by every linear reading an input; compress/quantize/fold.py): no pre_quant_scale is stored,
    # so the checkpoint is plain INT4 (compressed-tensors pack-quantized). Off: Model-Optimizer's form.
    awq_fold: bool = False

    def __post_init__(self):
        if self.format is not None and self.format != NONE:
            formats.get(self.format, "--format", FORMATS)
        for pat, fmt in self.rules:
            if fmt != NONE and fmt not in FORMATS:
                raise MoepressError(f"--rule {pat}={fmt}: expected one of {', '.join([*FORMATS, NONE])}")
        if self.format is None and not self.rules:
            raise MoepressError("--format: required (or --rule PATTERN=FORMAT)")
        if self.group_size not in GROUP_SIZES:
            raise MoepressError(f"--group-size {self.group_size}: expected 128, 64 or 32")
        if self.awq_fold and not any(FORMATS[f].awq for f in self.formats()):
            awq_formats = ", ".join(n for n, f in FORMATS.items() if f.awq)
            raise MoepressError(f"--awq-fold: expected an AWQ format ({awq_formats})")
        if self.kv_cache is not None and self.kv_cache not in KV_CACHE_FORMATS:
            raise MoepressError(f"--kv-cache {self.kv_cache}: expected {', '.join(KV_CACHE_FORMATS)}")

    @classmethod
    def from_flags(cls, *, format: str | None, rules, group_size: int | None, kv_cache: str | None,
                   sequential: bool | None, calib: CalibConfig, gptq_act_order: bool | None, awq_clip: bool,
                   awq_gptq: bool, awq_fold: bool = False) -> QuantConfig:
        """``moepress quantize``'s options; ``rules`` are the ``--rule PATTERN=FORMAT`` strings; ``group_size``
        None: not given (128)."""
        return cls(format=format, rules=parse_rules(rules), group_size=128 if group_size is None else group_size,
                   kv_cache=kv_cache, sequential=sequential, calib=calib.sources, num_samples=calib.num_samples,
                   seq_len=calib.seq_len, seed=calib.seed, batch_size=calib.batch_size,
                   gptq_act_order=gptq_act_order, awq_clip=awq_clip, awq_gptq=awq_gptq,
                   awq_fold=awq_fold).refuse_unused_group(group_size, "--group-size")

    def refuse_unused_group(self, given: int | None, flag: str) -> QuantConfig:
        """Self, or a refusal of a group size given where no format takes one (a script's ``--group-size 64`` with
        ``--format fp8`` would otherwise quantize as if it had not been said)."""
        if given is not None and not any(FORMATS[f].element == "int4" for f in self.formats()):
            takes = ", ".join(n for n, f in FORMATS.items() if f.element == "int4")
            raise MoepressError(f"{flag} {given}: only the INT4 formats take a group size ({takes}); "
                                f"{', '.join(sorted(self.formats())) or 'no format'} here")
        return self

    def recorded(self) -> dict:
        """The config as the output's manifest and report record it and a resume compares it: a calibration-free one
        without the calibration settings, which change none of its bytes."""
        d = asdict(self)
        return d if self.needs_calibration else {k: v for k, v in d.items() if k not in CALIBRATION_FIELDS}

    def inputs(self, reader, out) -> tuple:
        """The stage's inputs, which its output ``out`` may not overlap: ``reader``'s model and, where calibrated,
        the local ``--calib`` files and folders (``-o`` over one with ``--force`` deleted it before it was read),
        refused here by name."""
        from moepress.calib.sources import local_paths, refuse_output_over

        paths = local_paths(self.calib) if self.needs_calibration else []
        refuse_output_over(out, paths)
        return (reader.path, *paths)

    def refuse_unused(self, asked) -> QuantConfig:
        """Self, or a refusal of an option ``asked`` (names of the options given; those it does not judge are
        ignored) that no format of this run uses:
        a script's ``--gptq-act-order`` or ``--num-samples`` with a calibration-free format would otherwise run as
        if it had not been said, and the manifest would record the value as used."""
        fmts = sorted(self.formats())
        awq = any(FORMATS[f].awq for f in fmts)
        uses = {"gptq_act_order": ("--gptq-act-order/--no-gptq-act-order", any(self.needs_hessian(f) for f in fmts),
                                   "only formats rounded by GPTQ take it (int4-gptq; int4-awq, w4a8-awq with "
                                   "--awq-gptq)"),
                "awq_gptq": ("--awq-gptq/--no-awq-gptq", awq, "only the AWQ formats take it"),
                "awq_clip": ("--awq-clip/--no-awq-clip", awq and not self.awq_gptq,
                             "only the AWQ formats with --no-awq-gptq search a clip"),
                **{k: (flag, self.needs_calibration, "only calibrated formats (or --kv-cache) read calibration data")
                   for k, flag in (("sequential", "--sequential/--no-sequential"), ("calib", "--calib"),
                                   ("num_samples", "--num-samples"), ("seq_len", "--seq-len"), ("seed", "--seed"))}}
        for name in (n for n in uses if n in asked):
            flag, used, why = uses[name]
            if not used:
                raise MoepressError(f"{flag}: {why}; {', '.join(fmts) or 'no format'} here")
        return self

    @classmethod
    def from_recipe(cls, q: dict, c: CalibConfig) -> QuantConfig:
        """A recipe's ``quantize`` section and its shared calibration (moepress/pipeline/recipe.py)."""
        rules = tuple((str(k), str(v)) for k, v in (q.get("rules") or {}).items())
        return cls(format=q.get("format"), rules=rules, group_size=q.get("group_size", 128),
                   kv_cache=q.get("kv_cache"), sequential=q.get("sequential"),
                   calib=c.sources, num_samples=c.num_samples, seq_len=c.seq_len, seed=c.seed,
                   batch_size=c.batch_size, gptq_act_order=q.get("gptq_act_order"),
                   awq_clip=q.get("awq_clip", True), awq_gptq=q.get("awq_gptq", True),
                   awq_fold=q.get("awq_fold", False))

    def rule_of(self, rel: str, full: str) -> int | None:
        """The index of the first --rule naming the linear ``rel`` (its name in the layer; ``full``: in the
        checkpoint), which decides its format; None: --format does."""
        return next((k for k, (pat, _) in enumerate(self.rules)
                     if fnmatch.fnmatchcase(rel, pat) or fnmatch.fnmatchcase(full, pat)), None)

    def format_of(self, rel: str, full: str) -> str | None:
        """The format of the linear ``rel`` (its name in the layer; ``full``: in the checkpoint)."""
        k = self.rule_of(rel, full)
        fmt = self.format if k is None else self.rules[k][1]
        return None if fmt == NONE else fmt

    def is_sequential(self) -> bool:
        """Calibrate layer i on the quantized layers 0..i-1 (see ``sequential``)."""
        if self.sequential is not None:
            return self.sequential
        return any(FORMATS[f].awq or FORMATS[f].gptq for f in self.formats())

    def formats(self) -> set[str]:
        return {f for f in [self.format, *(f for _, f in self.rules)] if f and f != NONE}

    @property
    def needs_calibration(self) -> bool:
        return any(FORMATS[f].calibrated for f in self.formats()) or self.kv_cache is not None

    def needs_hessian(self, fmt: str | None) -> bool:
        """Does a linear of format ``fmt`` need its input's Hessian (GPTQ rounding)?"""
        return fmt is not None and FORMATS[fmt].needs_hessian(self.awq_gptq)


def parse_rules(values) -> tuple[tuple[str, str], ...]:
    """``--rule`` values ``PATTERN=FORMAT`` -> ((pattern, format), ...), in order."""
    out = []
    for v in values:
        pat, eq, fmt = v.rpartition("=")
        if not eq or not pat:
            raise MoepressError(f"--rule {v}: expected PATTERN=FORMAT, e.g. 'mlp.experts.*=int4-awq'")
        out.append((pat.strip(), fmt.strip()))
    return tuple(out)
