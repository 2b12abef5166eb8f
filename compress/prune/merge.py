"""Merging: fold the dropped experts into the kept ones, after any selection.

Which experts stay is the selecting method's choice: the ``merge`` method keeps the highest REAP scores of each
routing group (REAM, arXiv 2604.04356, takes REAP-score centroids across the layer); ``auto`` folds into the kept
experts of the method its race chose (where the experts are stored in float, so quantized experts keep their
bytes); ``--merge`` folds after any per-layer method. The router: a kept expert keeps its own router row and
correction bias; a dropped expert's row is removed with it, as HC-SMoE does after merging (wazenmai/HC-SMoE
commit bd77eba, hcsmoe/merging/grouping_mixtral.py ``prune_experts``: ``gate.weight.data[dominant_experts]``),
and its correction bias likewise (HC-SMoE's models have none).
Tokens that chose a dropped expert are then routed among the kept ones by the family's own router (``route_masked``,
exact), so every layer keeps the same count and every runtime loads the result.

How a dropped expert is folded: into the kept experts that its tokens are routed to after pruning, in
output space. HC-SMoE and REAM average the members' parameters (weighted by routing frequency, resp. by
gate-weighted activations, after aligning neurons); a parameter average mixes neurons that compute different
functions, so here instead (bench/prune_quality.py compares the methods) each kept expert's down projection is refit
(:func:`refit`) so that, on calibration tokens, the pruned block's routed output reproduces the unpruned
block's: the kept expert takes, on each token routed to it, the share of the dropped experts' output
that its router weight gives it. The statistics are router-weighted output moments (Gram matrix of the
router-weighted intermediate activations, its cross moment with the target), ridge-regularised towards
the expert's own weights. Gate and up projections are unchanged. Where the runtime quantizes activations
(a block-FP8 input: 1x128 per-token groups), the target outputs are computed as the runtime computes them,
but the Gram matrix is of the down projections' inputs before that quantization: the fit is to inputs a
quantization step away from those the runtime multiplies.

The refit weights are written in the input's stored form (:func:`encode_like`): cast to the stored float
dtype, or re-quantized by the format registry's quantizer of the input's format (DeepSeek block FP8
through ``fp8-block``, a ``moepress quantize`` output through its layout's format); the report says which.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from moepress.compress import formats
from moepress.compress.formats import QuantContext, ct_inputs
from moepress.compress.moe import StoredLinear, expert_rows
from moepress.compress.prune.evidence import LayerEvidence
from moepress.compress.prune.routing import route_masked
from moepress.compress.quant import fp8
from moepress.compress.quant.exact import div
from moepress.compress.stream import HOST_SUFFIXES
from moepress.errors import MoepressError


def pruned_route(ev: LayerEvidence, kept: list[int]) -> tuple[torch.Tensor, ...]:
    """The recorder's tokens (MoE input, router logits, chosen experts, weights) and their routing once only
    ``kept`` remain: the family's router over the kept rows (``route_masked``, exact)."""
    x, logits, idx, w = ev.recorder.tensors()[:4]
    keep = torch.zeros(logits.shape[1], dtype=torch.bool, device=logits.device)
    keep[kept] = True
    bias = ev.moe.gate.e_score_correction_bias
    pw, pidx = route_masked(logits, keep, ev.routing, None if bias is None else bias.detach().float().to(logits.device))
    return x, logits, idx, w, pw, pidx


def transfer(ev: LayerEvidence, kept: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the routing mass goes once the dropped experts are gone, on the recorder's tokens:
    (own [E]: sum of the weight each kept expert had on the tokens it still gets, moved [E, E]: for
    dropped d and kept c, sum over the tokens that chose d of d's weight x c's weight after pruning).
    Weights are the family's real routing weights, pruned routing is ``route_masked`` (exact)."""
    _, logits, idx, w, pw, pidx = pruned_route(ev, kept)
    E = logits.shape[1]
    before = torch.zeros(idx.shape[0], E, dtype=torch.float64, device=w.device).scatter_(1, idx.long(), w.double())
    after = torch.zeros_like(before).scatter_(1, pidx.long(), pw.double())
    own = (before * (after > 0)).sum(dim=0)
    moved = before.T @ after
    moved[kept] = 0
    return own, moved


RIDGE = 0.01  # the refit's pull towards the kept expert's own down projection, relative to mean(diag(Gram))


def _hidden(expert, x: torch.Tensor) -> torch.Tensor:
    """An expert's intermediate activation [n, I] in float32, as the stream's layers compute it (bf16
    StoredLinear weights are cast per call)."""
    g, u, _ = expert.linears()
    xf = x.float()
    return expert.act_fn(g(xf)) * u(xf)


def _routed_output(ev: LayerEvidence, x: torch.Tensor, ids: torch.Tensor, ws: torch.Tensor, sign: float,
                   into: torch.Tensor) -> torch.Tensor:
    """``into`` + sign x the routed output (experts ``ids`` with weights ``ws``) on the recorder's tokens."""
    for e, tok, slot in expert_rows(ids, len(ev.moe.experts)):
        y = ev.moe.experts[e].linears()[2](_hidden(ev.moe.experts[e], x[tok]))
        into.index_add_(0, tok, sign * ws[tok, slot, None].float() * y)
    return into


@torch.no_grad()
def refit(ev: LayerEvidence, kept: list[int], release: bool = False) -> list[int]:
    """Fold the dropped experts' routed output into the kept experts' down projections (in place); returns
    the kept experts refit (those routed to on some recorded token).

    On the recorder's tokens, ``lost`` = (the MoE's routed output) - (the routed output after pruning,
    family routing over the kept experts). Each kept expert c then takes, on the tokens it is routed to
    after pruning, the share of ``lost`` its router weight gives it: its down projection D becomes the
    ridge least-squares solution of pw_c (D' h_c(x)) = pw_c (f_c(x) + lost(x) / sum(pw(x))), weighted by
    pw_c^2, pulled towards D by RIDGE x mean(diag(Gram)). The statistics are router-weighted output moments
    of the calibration tokens (Gram G of pw_c h_c, cross moment L of the lost share with it); as f_c = D h_c,
    the solution is D' = D + L (G + ridge)^-1, solved for the correction alone. ``release``: the dropped
    experts' weights are freed once ``lost`` is known (the stage's fold; the race's plans share the layer)."""
    x, logits, idx, w, pw, pidx = pruned_route(ev, kept)
    if "routed" not in ev.memo:  # the unpruned routed output: the same for every selection (auto's plans)
        ev.memo["routed"] = _routed_output(ev, x, idx, w, 1.0, torch.zeros(x.shape, dtype=torch.float32,
                                                                              device=x.device))
    lost = _routed_output(ev, x, pidx, pw, -1.0, ev.memo["routed"].clone())
    lost /= pw.float().sum(dim=-1, keepdim=True).clamp(min=1e-30)
    if release:  # the dropped experts are not needed again: their memory goes before the refit's moments
        for e in set(range(len(ev.moe.experts))) - set(kept):
            ev.moe.experts[e].to(device="meta")
    changed, rows = [], {c: (tok, slot) for c, tok, slot in expert_rows(pidx, len(ev.moe.experts))}
    for c in kept:
        if c not in rows:
            continue
        tok, slot = rows[c]
        _refit_down(ev.moe.experts[c], x[tok], pw[tok, slot], lost[tok])
        changed.append(c)
    return changed


def _refit_down(expert, x: torch.Tensor, pw: torch.Tensor, lost: torch.Tensor) -> None:
    """``refit`` for one kept expert: its down projection D += L (G + ridge)^-1 in place, from its tokens ``x``
    [n, H] (intermediate activations h [n, I]), their router weights ``pw`` [n] and the lost share ``lost`` [n, H].
    Solved through the [I, I] Gram matrix (:func:`_refit_gram`), or, where the expert has fewer tokens than its
    width, through its tokens' [n, n] kernel (:func:`_refit_kernel`); the correction is added to D in place."""
    h, pw = _hidden(expert, x).double(), pw.double()[:, None]
    if h.shape[0] < h.shape[1]:
        delta = _refit_kernel(h * pw, lost.double() * pw)
    else:
        delta = _refit_gram(h, pw, lost)
    del h
    down = expert.linears()[2]
    if isinstance(down, StoredLinear) and down.kept:  # kept quantized: re-encoded now, as it will be written
        w = delta.add_(down.stored_weight(torch.float32)).float()
        tensors, _ = encode_like(down.kept_reader, down.kept_name.removesuffix(".weight"), w, down.kept)
        # as the stream keeps a stored linear's companions: a decoder's numbers on the host (a read of each, at each
        # decode, would wait for the GPU), the rest on the layer's device
        down.keep(down.kept_reader, down.kept_name,
                  {n: t if n.endswith(HOST_SUFFIXES) else t.to(w.device) for n, t in tensors.items()})
    else:
        down.weight.data.copy_(delta.add_(down.weight))  # D + L G^-1 in float64, written into D's own storage


def _refit_gram(h: torch.Tensor, pw: torch.Tensor, lost: torch.Tensor) -> torch.Tensor:
    """L (G + ridge)^-1 [H, I] through the [I, I] float64 Gram matrix G = sum pw^2 h h^T (L = sum pw^2 lost h^T;
    ``pw`` [n, 1] float64): ``torch.linalg.solve``'s own two steps (LU factors, then the triangular solves; the
    same bits), so that the Gram matrix is freed once factored."""
    ha = h * pw ** 2
    gram = ha.T @ h
    gram.diagonal().add_(RIDGE * gram.diagonal().mean() + 1e-12)  # in place (the largest allocation); no host read
    lu, pivots, _ = torch.linalg.lu_factor_ex(gram)  # lu_factor's own call, without its error check: a host read
    del gram
    cross = lost.double().T @ ha
    del ha
    return torch.linalg.lu_solve(lu, pivots, cross.T).T  # gram is symmetric: L G^-1


def _refit_kernel(xw: torch.Tensor, yw: torch.Tensor) -> torch.Tensor:
    """The same L (G + ridge)^-1 as :func:`_refit_gram` for an expert with fewer tokens n than its width I,
    from the rows xw = pw h [n, I], yw = pw lost [n, H]: with G = xw^T xw and L = yw^T xw, the push-through
    identity xw^T (xw xw^T + ridge)^-1 = (G + ridge)^-1 xw^T gives yw^T (K + ridge)^-1 xw, K = xw xw^T
    [n, n]. Kimi K2's experts (2048 wide) get a few hundred search tokens each: an [n, n] solve and two
    products of n rows instead of an [I, I] factorisation and its solve with H = 7168 right-hand sides. The
    ridge is the same number: mean(diag(G)) = ||xw||^2 / I."""
    ridge = RIDGE * xw.square().sum() / xw.shape[1] + 1e-12  # a device scalar: no read per expert
    kernel = xw @ xw.T
    kernel.diagonal().add_(ridge)
    # solve's own call without its error check (a host read per expert on a GPU): the ridge makes the kernel
    # positive definite
    return yw.T @ torch.linalg.solve_ex(kernel, xw)[0]


def fold_dropped(ev: LayerEvidence, kept: list[int], num_experts: int) -> dict:
    """Fold the dropped experts' routed output into the kept experts that take over their tokens
    (``refit``, in place on the loaded layer); returns, per rewritten kept expert, the dropped experts whose
    routing mass it receives and the shares of that mass (the report's ``merged``; the writer adds the
    stored form). The dropped experts' weights are freed on the way (the stage writes the kept ones)."""
    own, moved = transfer(ev, kept)
    own, moved = own.double().tolist(), moved.double().tolist()  # the report's numbers: one copy to the host
    merged = {}
    for c in refit(ev, kept, release=True):
        ds = [d for d in range(num_experts) if moved[d][c] > 0]
        w = [own[c]] + [moved[d][c] for d in ds]
        total = math.fsum(w)
        # group-limited routing: a kept expert can be refit for tokens moved to it from other kept experts
        # alone, with no mass of its own or of a dropped expert; it is then listed alone, its own share 1
        shares = [round(v / total, 6) for v in w] if total > 0 else [1.0]  # ds is empty then
        merged[str(c)] = {"members": [c, *ds], "mass_share": shares,
                          "rewritten": ["down"]}
    return merged


@contextmanager
def folded(ev: LayerEvidence, kept: list[int], stored: Callable[[int], torch.Tensor] | None = None) -> Iterator[None]:
    """``refit`` on the loaded layer for the duration of the block, then the kept experts' own down
    projections back (``auto``'s race scores folded plans on a layer that the other plans share):
    ``stored(c)``, expert c's down projection as the checkpoint stores it, where the layer holds exactly
    that (float-stored experts: no second copy in memory), else a copy taken before; a down projection
    kept quantized (``StoredLinear.keep``) gets its stored tensors back, which the fold replaced, not changed."""
    lins = {c: ev.moe.experts[c].linears()[2] for c in kept}
    quantized = {c: lin.kept_tensors() for c, lin in lins.items() if isinstance(lin, StoredLinear) and lin.kept}
    downs = {c: lin.weight.detach().clone() for c, lin in lins.items()
             if c not in quantized} if stored is None else {}
    try:
        refit(ev, kept)
        yield
    finally:
        for c, lin in lins.items():
            if c in quantized:
                lin.keep(lin.kept_reader, lin.kept_name, quantized[c])
            else:
                lin.weight.data.copy_(downs[c] if stored is None else stored(c))


def stored_in_float(reader, names, bases: list[str]) -> bool:
    """Whether every linear in ``bases`` is stored as one float tensor ``<base>.weight`` of 16 bits or more
    and nothing else (``names``: stored names, e.g. the layer's): folding then rewrites it without
    re-quantizing anything. One pass over ``names``, however many bases."""
    owned: dict[str, set[str]] = {}
    for n in names:
        owner, _, leaf = n.rpartition(".")
        owned.setdefault(owner, set()).add(leaf)
    for base in bases:
        if owned.get(base) != {"weight"}:
            return False
        dt = reader.get_dtype(base + ".weight")
        if not dt.is_floating_point or dt.itemsize < 2:
            return False
    return True


def _format_of(reader, base: str):
    """The registered format whose stored form ``base`` has: the ``moepress quantize`` layout's, or the one
    whose input decoder reads it (DeepSeek's ``weight_scale_inv`` -> fp8-block); None if none."""
    layout = formats.layout_of(reader)
    if layout is not None:
        for prefix, m in layout.get("modules", {}).items():
            if base == prefix or base.startswith(prefix + "."):
                return formats.get(m["format"], option=f"{reader.path}: moepress_quant.json format"), m.get("group")
    for f in formats.FORMATS.values():
        if any(dec(reader, base, torch.float32) is not None for dec in f.input_decoders):
            return f, None
    return None, None


def _stored_names(base: str, names) -> list[str]:
    """The stored tensors of the linear ``base`` among ``names`` (``base.weight``, its scales, ...)."""
    return sorted(n for n in names if n.startswith(base + ".") and "." not in n[len(base) + 1:])


def stored_form(reader, base: str, stored: list[str]):
    """How a merged ``base`` is written back in its stored form (``stored``: its stored names): "float",
    "ct-int4", or the (format, group) that re-quantizes it; a one-line error where there is none."""
    if stored_in_float(reader, stored, [base]):
        return "float"
    if base + ct_inputs.PACKED in stored and ct_inputs.ct_format(reader, base) == ct_inputs.CT_PACKED:
        if base + ".weight_zero_point" in stored:  # asymmetric groups: encode_ct_int4 writes symmetric ones only
            raise MoepressError(f"{reader.path}: expert weight '{base}' is pack-quantized INT4 with a "
                                "weight_zero_point (asymmetric groups); merging (--merge, --method merge) re-quantizes "
                                "symmetric INT4 only: prune without merging, or merge a bf16 copy")
        return "ct-int4"
    fmt, group = _format_of(reader, base)
    if fmt is None or fmt.quantize is None or fmt.calibrated:
        what = "its calibrated format " + fmt.name if fmt is not None else "no format moepress can write"
        raise MoepressError(f"{reader.path}: expert weight '{base}' is stored as "
                            f"{', '.join(n[len(base) + 1:] for n in stored)} ({what}); merging (--merge, --method "
                            "merge) re-quantizes merged experts only to bf16/fp16/fp32, compressed-tensors INT4 or a "
                            "calibration-free registered format; prune without merging (a --method other than merge, "
                            "no --merge)")
    return fmt, group


def check_mergeable(reader, adapter, i: int) -> None:
    """Raise now (one line) if layer i's first routed expert's down projection, the one linear a fold rewrites
    (:func:`refit`), could not be written back in its stored form: every expert of a checkpoint is stored
    alike, so one says it for all. Gate and up projections are written as stored, whatever their format."""
    base = adapter.expert_prefix(i, 0) + adapter.expert_names[2]
    stored_form(reader, base, _stored_names(base, reader.layer_names(i)))


def form_label(reader, base: str, names, form=None) -> str:
    """How :func:`encode_like` writes ``base`` (the report's ``stored_as``); ``form``: its ``stored_form``
    where the caller has it."""
    form = form or stored_form(reader, base, _stored_names(base, names))
    if form == "float":
        return str(reader.get_dtype(base + ".weight")).removeprefix("torch.")
    return "compressed-tensors pack-quantized int4 (symmetric, group)" if form == "ct-int4" else form[0].name


def encode_like(reader, base: str, w: torch.Tensor, names) -> tuple[dict[str, torch.Tensor], str]:
    """``base``'s merged weight ``w`` in the form the input stores ``base`` in: ({name: tensor}, what form).
    ``names``: the stored names of ``base``'s layer."""
    stored = _stored_names(base, names)
    form = stored_form(reader, base, stored)
    if form == "float":
        return {base + ".weight": w.to(reader.get_dtype(base + ".weight"))}, form_label(reader, base, names, form)
    if form == "ct-int4":
        return encode_ct_int4(reader, base, w, stored), form_label(reader, base, names, form)
    fmt, group = form
    q = fmt.quantize([w.float()], QuantContext(group_size=group or 128))
    out = {}
    for suffix, t in q.tensors[0].items():
        hits = [n for n in stored if n == f"{base}.{suffix}"] or [n for n in stored if n.startswith(f"{base}.{suffix}")]
        if len(hits) != 1:
            raise MoepressError(f"{reader.path}: expert weight '{base}': the {fmt.name} quantizer gives '{suffix}', "
                                f"not among the stored {stored}")
        ref = reader.get(hits[0])
        t = _block_scale_as_stored(fmt, t, ref)
        if t.dtype != ref.dtype or t.shape != ref.shape:
            raise MoepressError(f"{reader.path}: '{hits[0]}' is {ref.dtype} {list(ref.shape)}; the {fmt.name} "
                                f"quantizer gives {t.dtype} {list(t.shape)} for the merged expert")
        out[hits[0]] = t
    if sorted(out) != stored:
        raise MoepressError(f"{reader.path}: expert weight '{base}' stores {stored}; the {fmt.name} quantizer "
                            f"writes {sorted(out)}")
    return out, fmt.name


def _block_scale_as_stored(fmt, t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """A block-FP8 scale in the stored one's layout: the fp8-block quantizer gives Model-Optimizer's 4-D
    [ceil(out/128), 1, ceil(in/128), 1], DeepSeek's ``weight_scale_inv`` (and a quantize output written before
    the quantizer did) is the 2-D grid of the same values (compress/quant/fp8.py ``block_grid``)."""
    return fp8.block_grid(t) if fmt.scale == "block" and ref.dim() == 2 else t


def encode_ct_int4(reader, base: str, w: torch.Tensor, stored: list[str]) -> dict[str, torch.Tensor]:
    """``w`` as compressed-tensors ``pack-quantized`` symmetric INT4 with the input's group count and scale
    dtype (Kimi K2: group 32, bf16 scales). compressed-tensors 0.20.1 minmax observer, symmetric:
    scale = max|w| over the group / ((q_max - q_min) / 2) = amax / 7.5 (quantization/utils/helpers.py
    ``calculate_qparams``), q = clamp(round(w / scale), -8, 7) (lifecycle/forward.py ``_quantize``),
    stored q + 8, eight to an int32 word, low nibble first (compressors/pack_quantized ``pack_to_int32``);
    ``formats.ct_inputs`` reads the same bytes back as compressed-tensors does. A group whose values all
    still round into [-8, 7] on the input's own scale keeps that scale: values the refit left alone keep
    their codes (a fresh amax / 7.5 scale re-rounds a group holding a -8 code, moving it by ~7%, and
    Kimi K2's INT4 grid is the one its experts were trained on), unless that scale is over twice the fresh one
    (a group the refit shrank: its values would use a few codes of the coarse grid, at 10x shrinkage a relative
    error of ~1 against ~0.1)."""
    packed, scale = reader.get(base + ct_inputs.PACKED), reader.get(base + ".weight_scale")
    out_f, in_f = w.shape
    if base + ".weight_zero_point" in stored or scale.ndim != 2 or packed.shape != (out_f, -(-in_f // 8)):
        raise MoepressError(f"{reader.path}: expert weight '{base}' is pack-quantized as {list(packed.shape)} with "
                            f"scale {list(scale.shape)}; --method merge re-quantizes only symmetric INT4 groups")
    groups = scale.shape[1]
    g = -(-in_f // groups)
    # in the scale's dtype throughout, as compressed-tensors computes on a bf16 model's weights
    wp = torch.zeros(out_f, groups * g, dtype=scale.dtype, device=w.device)
    wp[:, :in_f] = w.to(scale.dtype)
    fresh = div(wp.view(out_f, groups, g).abs().amax(dim=-1), 7.5)  # IEEE division on every device
    old = scale.to(device=w.device)
    q_old = torch.round(wp.view(out_f, groups, g) / old.masked_fill(old == 0, 1.0)[..., None])
    fits = (old > 0) & (q_old >= -8).all(dim=-1) & (q_old <= 7).all(dim=-1) & ((old <= 2 * fresh) | (fresh == 0))
    s = torch.where(fits, old, fresh)
    sd = s.masked_fill(s == 0, 1.0).repeat_interleave(g, dim=1)
    q = torch.clamp(torch.round(wp / sd), -8, 7)[:, :in_f].to(torch.int64) + 8
    q = torch.nn.functional.pad(q, (0, -in_f % 8)).view(out_f, -1, 8)
    words = (q << (4 * torch.arange(8, device=q.device))).sum(dim=-1)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    out = {base + ct_inputs.PACKED: words, base + ".weight_scale": s.to(scale.device)}
    if base + ".weight_shape" in stored:
        out[base + ".weight_shape"] = reader.get(base + ".weight_shape")
    return out
