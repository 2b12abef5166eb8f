"""What a compressed-tensors checkpoint stores each linear as, from its config.json alone, for the planner.

Kimi K2 Thinking (and K2.5 / K2.6), llm-compressor outputs and moepress's own ``compressed-tensors``
exports say in ``quantization_config`` which linears are quantized and how: ``config_groups`` (a
scheme each, with ``targets``), ``ignore``, and the compressed format (per group or for all). A linear
takes the first group whose targets match its name or class and that ``ignore`` does not exclude, as
compressed-tensors matches them (``compressed_tensors.utils.match.is_match``, 0.15-0.20: ``re:`` regex
matched from the name's start, else the exact name or a class name such as ``Linear``); the
library's own function is called here. The scheme is mapped to the moepress format whose own
compressed-tensors scheme (``Format.ct_scheme``, what the exporter writes) has the same weight and
input-activation arguments; AWQ formats are skipped (compressed-tensors stores no ``pre_quant_scale``:
AWQ folded into the weights is GPTQ's stored form). Kimi K2 Thinking's routed experts: INT4 symmetric,
group 32, weight-only -> ``int4-gptq`` group 32; everything else bf16 (its ``ignore``). Group scales are
counted in F32, as moepress stores them; Kimi's are BF16, so its experts are planned about 8% over what
it stores (a plan that errs towards more memory).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable

from moepress.compress import formats
from moepress.errors import MoepressError

CT_METHOD = "compressed-tensors"
UNKNOWN = "?"  # the format of a linear whose scheme no moepress format stores
# the QuantizationArgs fields that decide stored bytes and the kernels a runtime picks
_KEYS = ("num_bits", "type", "symmetric", "strategy", "group_size", "block_structure", "dynamic")


def is_ct(cfg: dict) -> bool:
    qc = cfg.get("quantization_config")
    return isinstance(qc, dict) and qc.get("quant_method") == CT_METHOD


def _args(a) -> dict | None:
    if a is None:
        return None
    d = a if isinstance(a, dict) else a.model_dump()
    return {k: d.get(k) for k in _KEYS}


def scheme_format(scheme: dict, ct_format: str | None) -> tuple[str, int | None] | None:
    """(moepress format, INT4 group) whose compressed-tensors scheme equals ``scheme`` (a config group), or None."""
    from compressed_tensors.quantization import QuantizationScheme

    w = scheme.get("weights") or {}
    group = w.get("group_size") if isinstance(w, dict) else None
    try:
        theirs = QuantizationScheme(**{**scheme, "targets": scheme.get("targets") or ["Linear"]})
    except (ValueError, TypeError):  # pydantic's ValidationError is a ValueError
        return None
    for f in formats.FORMATS.values():
        if f.ct_scheme is None or f.awq or f.ct_format != ct_format:
            continue
        if f.element == "int4" and group is None:  # its scheme needs a group: a channel-strategy config is not ours
            continue
        ours = f.ct_scheme(group, ["Linear"])
        if (_args(ours.weights), _args(ours.input_activations)) == \
                (_args(theirs.weights), _args(theirs.input_activations)):
            return f.name, group if f.element == "int4" else None
    return None


def ct_matcher(cfg: dict, where: str, strict: bool = True) -> Callable[[str], tuple[str, int | None] | None] | None:
    """For a compressed-tensors checkpoint's config: full linear name -> (moepress format, INT4 group), None for a
    linear left unquantized; None for any other config. A scheme no moepress format stores is refused in one line
    (``strict``), else its linears get the format ``UNKNOWN`` (the checkpoint then has no format of its own)."""
    import torch
    from compressed_tensors.utils.match import is_match

    if not is_ct(cfg):
        return None
    qc = cfg["quantization_config"]
    groups = []
    cg = qc.get("config_groups") or {}
    if not isinstance(cg, dict):
        raise MoepressError(f"{where}: quantization_config.config_groups is not an object")
    for name, g in cg.items():
        if not isinstance(g, dict):
            raise MoepressError(f"{where}: quantization_config.config_groups.{name} is not an object")
        got = scheme_format(g, g.get("format") or qc.get("format"))
        if got is None and not strict:
            got = (UNKNOWN, None)
        elif got is None:
            raise MoepressError(f"{where}: quantization_config.config_groups.{name} "
                                f"({g.get('format') or qc.get('format')}, weights {_args(g.get('weights'))}) is no "
                                f"format moepress plans; expected one of {', '.join(formats.FORMATS)}: plan it with "
                                "--format")
        groups.append((g.get("targets") or [], got))
    ignore = qc.get("ignore") or []
    with torch.device("meta"):
        probe = torch.nn.Linear(1, 1)  # every planned linear is an nn.Linear: class targets match alike
    return lambda full: next((f for t, f in groups if is_match(full, probe, t, ignore)), None)


def ct_stored(rows: Iterable[tuple[str, str, int, int]], match, unquantized: str) -> tuple[Counter, str | None,
                                                                                        int | None]:
    """The planner's stored rows ((kind, out, in, format) counts) of linears ``rows`` (full name, kind, out, in) by
    ``match`` (:func:`ct_matcher`); the checkpoint's format (the routed experts', else the most common
    quantized one; None if none is quantized) and its smallest INT4 group."""
    stored: Counter = Counter()
    weight: Counter = Counter()
    int4 = set()
    for full, kind, o, n in rows:
        got = match(full)
        stored[(kind, o, n, got[0] if got else unquantized)] += 1
        if got:
            weight[got[0]] += (1 << 40) if kind == "routed" else 1
            if got[1]:
                int4.add(got[1])
    if not weight or UNKNOWN in weight:  # nothing quantized, or in a scheme moepress has no format of
        return Counter(), None, None
    return stored, max(weight, key=weight.get), (min(int4) if int4 else None)
