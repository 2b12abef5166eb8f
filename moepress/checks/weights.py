"""Each linear's weights held to the error their own rounding makes: a fault in the stored bytes (a scale tensor
rolled by one row or transposed, one expert's weights exchanged) that the block's output reads within the spread
of correct blocks.

Each linear of a decoder layer (attention, a dense MLP, the shared experts; the routed experts where the candidate
has the reference's, matched through their router rows) is compared with the reference's as the candidate computes
with it (decoded; AWQ's ``pre_quant_scale`` multiplied into its columns; no activation quantization: what the
stored bytes say). The norm of the difference is estimated through a sketch, the weight times fixed Gaussian
columns (SKETCH, more where the weight has few rows: SAMPLES entries at least; a weight narrower than that whole),
to about 1% for quantization noise, without holding the reference's weights beside the candidate's (Kimi K2: 138 MB
of sketches per MoE layer, against 17 GB of weights); the weights' own norms are exact.

That error is held to the error the format's own rounding makes on the same reference weight: while the reference
layer is in memory, each weight the candidate stores in a format ``moepress quantize`` rounds to nearest (fp8,
fp8-block, fp8-dynamic, nvfp4, nvfp4-a16, mxfp4; named by the candidate's moepress_quant.json) is quantized by that
format's quantizer (the linears that read one input together, as ``quantize`` groups them), decoded and sketched
through the same columns. A correct candidate reads 1 whatever its weights look like; held to the median of the
layer's other experts instead, one expert fine-tuned off a grid its peers sit on exactly (a bf16 upcast of an MXFP4
or block-FP8 model, re-quantized to its format) read 10. Both errors are floored at FLOOR, bf16's precision: a
reference weight may reach the quantizer through bf16 (a float32 or block-FP8 checkpoint decoded to the working
dtype), so differences at that level are no fault. Calibrated rounding (AWQ, GPTQ), quantized weights moepress did
not write (a compressed-tensors or third-party checkpoint) and weights stored in float (an export may hold a
rounding dequantized) have no rounding to reproduce and are not judged (the output-level gates judge them).

The routed and shared experts' rounded weights also give the output error their rounding makes on the expert
gate's probe tokens: the floor of the expert-ratio gate's denominator (peers.peer_ratios).
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
from torch import nn

from moepress.checks.peers import norm_ratio, relative_error, worst_of
from moepress.compress.formats import FORMATS, layout_of
from moepress.compress.formats.base import QuantContext
from moepress.compress.moe import SparseMoE, StoredLinear
from moepress.compress.quantize.stats import by_format, shared_input_groups

SKETCH = 8  # Gaussian columns each weight is multiplied by, at least
SAMPLES = 8192  # sketch entries per linear, at least: its error's norm estimated to 0.8% (1 / sqrt(2 SAMPLES))
FLOOR = 2.0 ** -8  # relative weight error below which two weights count as equal: bf16's precision (module docstring)


@lru_cache(maxsize=8)
def _columns(width: int, rows: int, device: str) -> torch.Tensor | None:
    """[width, k] float32: k = max(SKETCH, SAMPLES / rows) standard normal columns scaled by 1 / sqrt(k), so that
    |D P| estimates |D| (Frobenius), seeded by the shape (the same for the reference and the candidate); None
    where k would reach ``width``: the weight is compared whole."""
    k = max(SKETCH, -(-SAMPLES // rows))
    if k >= width:
        return None
    g = torch.Generator().manual_seed(width * 65537 + rows)
    return (torch.randn(width, k, generator=g) / math.sqrt(k)).to(device)


def effective_weight(lin: nn.Linear) -> torch.Tensor:
    """The float32 weight ``lin`` computes with: decoded where kept quantized, times the ``pre_quant_scale`` its
    input is multiplied by (``fake_quant.attach`` keeps it on the module), so an AWQ weight compares with the
    unscaled reference weight."""
    if isinstance(lin, StoredLinear) and lin.qweight is not None:
        w = lin.qweight().float()
    elif isinstance(lin, StoredLinear):
        w = lin.stored_weight(torch.float32)
    else:
        w = lin.weight.detach().float()
    pqs = getattr(lin, "pre_quant_scale", None)
    return w if pqs is None else w * pqs.to(w.device, torch.float32)[None]


def sketch(lin: nn.Linear) -> tuple[torch.Tensor, float]:
    """:func:`sketch_weight` of the linear's effective weight."""
    return sketch_weight(effective_weight(lin))


def sketch_weight(w: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The weight times the fixed columns of its shape (``_columns``; the weight itself where narrow), and its own
    norm, exact: a sketched norm errs with the weight's spectrum, its error's not (quantization noise is flat)."""
    p = _columns(w.shape[1], w.shape[0], str(w.device))
    return (w if p is None else w @ p), float(w.norm())


def sketch_error(cand: tuple[torch.Tensor, float], ref: tuple[torch.Tensor, float]) -> float:
    """|W_c - W_r| / min(|W_c|, |W_r|) from their sketches (``peers.norm_ratio``): the difference's norm estimated,
    the norms exact."""
    (a, na), (b, nb) = cand, ref
    d = (a - b.to(a.device)).norm().cpu()
    return float(norm_ratio(d[None], torch.tensor([na], dtype=d.dtype), torch.tensor([nb], dtype=d.dtype))[0])


def candidate_formats(stream, i: int) -> dict[str, str] | None:
    """The format of each linear of layer ``i`` in the streamed checkpoint ``stream``, by module name in the layer
    (``self_attn.v_proj``, ``mlp.experts.3.gate_proj``), as its moepress_quant.json names them; None where it has
    none (not a ``moepress quantize`` output: its weights are not compared, so that a model fine-tuned or cast from
    the reference is not read as faulty)."""
    lay = layout_of(stream.ckpt)
    if not lay:
        return None
    prefix = stream.adapter.layer_prefix(i)
    return {k[len(prefix):]: m["format"] for k, m in (lay.get("modules") or {}).items()
            if k.startswith(prefix) and isinstance(m, dict) and isinstance(m.get("format"), str)}


class Sketches:
    """Named linears of a reference module, sketched, each with the error its rounding to nearest in the format the
    candidate stores it in makes (``formats``: by name; linears that read one input rounded together, as
    ``quantize`` groups them: FP8's shared weight scale, NVFP4's shared ``weight_scale_2``)."""

    def __init__(self, lins: dict[str, nn.Linear], formats: dict[str, str],
                 rounded: dict[str, torch.Tensor] | None = None):
        """Only the linears the candidate rounds to nearest are sketched (an AWQ candidate's: none); ``rounded``:
        where given, each such linear's rounded weight is put there (to run the module as its rounding would)."""
        self.sketches: dict[str, tuple[torch.Tensor, float]] = {}
        self.expected: dict[str, tuple[str, float]] = {}
        for n, w, r in _rounded(lins, formats):
            self.sketches[n] = sketch_weight(w)
            self.expected[n] = (formats[n], sketch_error(sketch_weight(r), self.sketches[n]))
            if rounded is not None:
                rounded[n] = r

    def ratio(self, lins: dict[str, nn.Linear]) -> tuple[float | None, str | None]:
        """(the largest over the candidate's linears ``lins`` of max(error, FLOOR) / max(expected, FLOOR), its name):
        a NaN the largest; (None, None) where none is judged: not known rounded to nearest, or rounded otherwise than
        its expected error was computed for."""
        names, ratios = [], []
        for n, lin in lins.items():
            if not rounded_to_nearest(lin) or n not in self.expected or self.expected[n][0] != lin.quant_format:
                continue
            err = sketch_error(sketch(lin), self.sketches[n])
            names.append(n)
            ratios.append(max(err, FLOOR) / max(self.expected[n][1], FLOOR) if not math.isnan(err) else math.nan)
        return worst_of(names, ratios)[::-1]


def _rounded(lins: dict[str, nn.Linear], formats: dict[str, str]):
    """(name, effective weight, its rounding to nearest in ``formats[name]``) for each linear of ``lins`` whose format
    rounds to nearest and leaves it quantized, each group's weights decoded once (a block-FP8 or INT4 reference)."""
    for names in _groups(list(lins), formats):
        ws = [effective_weight(lins[n]) for n in names]
        yield from zip(names, ws, expected_weights(ws, formats[names[0]]) or [], strict=False)


def _groups(names: list[str], formats: dict[str, str]) -> list[list[str]]:
    """The linears ``names`` a format moepress rounds to nearest names, grouped as ``quantize`` rounds them
    (compress/quantize/stats.py): those that read one input together, split by format where a --rule mixes them."""
    known = [n for n in names if rounds_to_nearest(formats.get(n))]
    return [part for grp in shared_input_groups(known) for part in by_format(grp, formats).values()]


def linears(module: nn.Module, skip: str | None = None) -> dict[str, nn.Linear]:
    """``module``'s linears by name, those under ``skip`` (a name prefix) left out."""
    return {n: m for n, m in module.named_modules()
            if isinstance(m, nn.Linear) and not (skip and n.startswith(skip))}


class WeightSketch:
    """The reference MoE layer's routed experts, sketched before the layer is freed (:class:`Sketches`), and each
    expert's output error its rounding makes on the probe tokens (``floors``)."""

    @torch.no_grad()
    def __init__(self, moe: SparseMoE, formats: dict[str, str] | None, prefix: str, probe: torch.Tensor,
                 outputs: torch.Tensor, shared: torch.Tensor | None = None):
        """``formats``: the candidate's by module name (:func:`candidate_formats`); ``prefix``: the MoE block's name
        in the layer (``mlp.``); ``probe``: the tokens the experts are compared on, ``outputs`` [experts, tokens,
        hidden]: the reference's experts' outputs on them, ``shared``: its shared experts' (None: it has none)."""
        formats = formats or {}
        self.prefix = prefix
        self.ref: list[Sketches] = []
        self.floors: list[tuple[dict[str, str], float | None]] = []  # per expert: the formats rounded in, the error
        for k, e in enumerate(moe.experts):
            rounded: dict[str, torch.Tensor] = {}
            self.ref.append(Sketches(linears(e), _own(formats, f"{prefix}experts.{k}."), rounded))
            fmts = {n: f for n, (f, _) in self.ref[-1].expected.items()}
            self.floors.append((fmts, _rounded_error(e, rounded, fmts, probe, outputs[k]) if rounded else None))
        # the shared experts' weights are sketched and judged with the layer's other linears (local.py): here only
        # their rounding, for their floor
        self.shared = None
        if shared is not None:
            own = _own(formats, f"{prefix}shared_experts.")
            rounded = {n: r for n, _, r in _rounded(linears(moe.shared_experts), own)}
            fmts = {n: own[n] for n in rounded}
            self.shared = (fmts, _rounded_error(moe.shared_experts, rounded, fmts, probe, shared) if rounded else None)

    def expected_errors(self, moe: SparseMoE, order: torch.Tensor) -> tuple[list[float | None], float | None]:
        """The expert-ratio gate's floors (peers.peer_ratios): per candidate expert j of ``moe``, the output error the
        rounding of the reference's expert ``order[j]`` makes on the probe, and the shared experts'. An expert that
        errs as its format rounds is no fault where its peers round exactly (reference weights on the format's
        grid). None where no linear was rounded, or where the candidate's expert stores one in another format than
        the floor was rounded in (the reference's expert k was rounded as the candidate's expert k is stored: a
        renumbered candidate whose --rule gave its experts different formats)."""
        floors = [_floor(*self.floors[k], e) for e, k in zip(moe.experts, order.tolist(), strict=True)]
        if self.shared is None or moe.shared_experts is None:
            return floors, None
        return floors, _floor(*self.shared, moe.shared_experts)

    @torch.no_grad()
    def ratios(self, moe: SparseMoE, order: torch.Tensor) -> list[tuple[float | None, str | None]]:
        """Per candidate expert (expert j against the reference's ``order[j]``): its :meth:`Sketches.ratio`, the
        linear named in the layer."""
        out = []
        for j, (e, k) in enumerate(zip(moe.experts, order.tolist(), strict=True)):
            v, n = self.ref[k].ratio(linears(e))
            out.append((v, None if n is None else f"{self.prefix}experts.{j}.{n}"))
        return out


def _floor(fmts: dict[str, str], floor: float | None, cand: nn.Module) -> float | None:
    """``floor`` where every linear it was rounded for (``fmts``: by name) is stored in that format in the candidate's
    module ``cand``."""
    lins = linears(cand)
    return floor if all(n in lins and getattr(lins[n], "quant_format", None) == f for n, f in fmts.items()) else None


def _own(formats: dict[str, str], at: str) -> dict[str, str]:
    """The formats of the linears named ``at`` + their name in a module, by that name."""
    return {n[len(at):]: f for n, f in formats.items() if n.startswith(at)}


@torch.no_grad()
def _rounded_error(expert: nn.Module, rounded: dict[str, torch.Tensor], fmts: dict[str, str],
                   probe: torch.Tensor, ref: torch.Tensor) -> float:
    """The relative error of ``expert``'s output on ``probe`` with the linears ``rounded`` computing with those
    weights (rounded in ``fmts``), their inputs quantized as their formats quantize them at run time (dynamic
    activations; a static input scale is the candidate's, unknown here: left out, so the error is, if anything,
    understated), against ``ref``, its output as it is."""
    mods = dict(expert.named_modules())
    handles = []
    for n, w in rounded.items():
        f, raw = FORMATS[fmts[n]], []

        # the input as it comes, before the reference's own pre-hooks (a native block-FP8 reference quantizes its
        # activations so): the candidate format's quantization replaces theirs
        def keep(mod, args, raw=raw):
            raw[:] = [args[0]]

        def hook(mod, args, out, w=w, f=f, raw=raw):
            x, b = f.fake_quant_input(raw[0].float()), getattr(mod, "bias", None)
            return torch.nn.functional.linear(x, w.to(x.device), None if b is None else b.float()).to(out.dtype)

        handles += [mods[n].register_forward_pre_hook(keep, prepend=True), mods[n].register_forward_hook(hook)]
    try:
        out = expert(probe).float()
    finally:
        for h in handles:
            h.remove()
    return float(relative_error((out - ref.to(out.device))[None], out[None], ref.to(out.device)[None])[0])


def expected_weights(ws: list[torch.Tensor], fmt: str) -> list[torch.Tensor] | None:
    """``ws`` (one group of linears reading one input) quantized to ``fmt`` by its own quantizer and decoded, float32
    (None: the format leaves them unquantized, e.g. a width not whole blocks)."""
    f = FORMATS[fmt]
    q = f.quantize(ws, QuantContext())
    if q.skipped:
        return None
    return [f.dequantize(t, torch.float32) for t in q.tensors]


def rounded_to_nearest(lin: nn.Linear) -> bool:
    """Whether ``lin``'s stored weight is known to be rounded to nearest: a ``moepress quantize`` output of a format
    that rounds so (not AWQ, not GPTQ: ``fake_quant.attach`` names the format on the module). Not a weight stored
    in float, which an export may hold dequantized (hf-fp8-block keeps a linear whose blocks a runtime would split
    in bf16, holding its FP8 rounding), and not a quantized weight of unknown origin (a compressed-tensors or
    third-party checkpoint: AWQ or GPTQ beside experts rounded to nearest for want of tokens)."""
    return rounds_to_nearest(getattr(lin, "quant_format", None))


def rounds_to_nearest(fmt: str | None) -> bool:
    """Does moepress's quantizer of ``fmt`` round each weight to nearest (no calibration: not AWQ, not GPTQ)?"""
    return fmt is not None and fmt in FORMATS and FORMATS[fmt].produced and not (FORMATS[fmt].awq or FORMATS[fmt].gptq)
