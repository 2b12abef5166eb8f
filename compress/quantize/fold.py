"""AWQ folded into the model (``--awq-fold``): llm-compressor's form of AWQ, whose output is plain INT4.

Unfolded AWQ (Model-Optimizer's, the default) stores ``pre_quant_scale`` p per linear: the consumer
computes (x * p) Q(W / p)^T. Folded, the multiplication by p moves into the operation that
produces x, so the checkpoint holds only Q(W / p) and a modified predecessor; the model is the same
function before rounding. The folds are llm-compressor's AWQ mappings
(vllm-project/llm-compressor src/llmcompressor/modifiers/transform/awq/mappings.py, 0.13.0-37:
``default_mappings``, ``_moe_default_mappings``, ``_deepseek_mappings``):

    input_layernorm          -> q/k/v (q_a_proj, kv_a_proj_with_mqa)     norm weight * p
    q_a_layernorm            -> q_b_proj   (MLA)                          norm weight * p
    kv_a_layernorm           -> kv_b_proj  (MLA)                          norm weight * p
    v_proj                   -> o_proj                                    v_proj rows * p
    kv_b_proj (value rows)   -> o_proj     (MLA; not in llm-compressor)   kv_b_proj value rows * p
    post_attention_layernorm -> router, every expert's and the shared   norm weight * p,
                                expert's gate/up (dense MLP: gate/up)    router columns / p
    up_proj                  -> down_proj  (each expert its own)          up_proj rows * p

One vector per input: every linear reading it shares it (all routed experts, the shared expert and
the router read the post-attention norm's output), searched by :func:`awq.search_shared` on each
expert's own tokens. v_proj -> o_proj under grouped-query attention: one value head feeds several
query heads, so the vector is tied across them (geometric mean of the candidate over the heads of
a group); llm-compressor skips that case instead (base.py ``_check_layers_are_compatible``).
MLA (DeepSeek-V3, Kimi K2): llm-compressor's mappings leave o_proj unsmoothed, but its input is
the per-head values kv_b_proj produces (transformers modeling_deepseek_v3.py: kv_b_proj's output
viewed [heads, qk_nope_head_dim + v_head_dim], split into k_nope and values; attention output
[heads * v_head_dim] -> o_proj), and attention is linear in the values, so scaling kv_b_proj's value
rows by p is exact, as v_proj's rows are (its key rows stay: the scores do not change).
A fold is skipped (the linears quantized without smoothing) when a reader of its input is not an
AWQ linear (a ``--rule`` gave it another format, or no INT4 group divides its in_features).

A site read by one group of linears (q/k/v, the MLA norms, a dense MLP, v -> o, up -> down) is
searched exactly as unfolded AWQ searches it (the same loss, statistics and grid, the Hessian GPTQ
rounds with is that of x * p), plus no smoothing as a candidate (awq.search_shared), so a fold is
never worse than no smoothing on the calibration loss. Where the grid's vector wins and the norms
are kept in float32, such a site's INT4 codes equal unfolded AWQ's bit for bit on the same input;
stored in bf16, the vector moves by up to 2^-9 per channel and GPTQ's rounding decisions follow
(bench/awq_fold.py ``--float32-norms`` measures what that does to perplexity).
A routed expert's up -> down fold follows calibrated.py's evidence rule: an expert that unfolded
AWQ rounds to nearest unsmoothed (too few routed tokens) gets no vector either.

The norm is stored in its checkpoint dtype (bf16), so the vector the linears divide by is the one
the rounded norm carries (round(g * p) / g): the fold is exact up to float rounding; the router,
not quantized, is divided by it and rounded to its dtype (logits equal up to that rounding).

How: after the layer's calibration pass (compress/quantize/calibrated.py), :func:`fold_layer`
searches the vectors on the observed statistics, then hands the quantizers the folded model's view:
statistics of x * p, weights W / p (and p-scaled rows) through :class:`FoldedWeights`, and the
norms and router changed in place and recorded in the layer's result for the writer. The format's
quantizer runs with ``QuantContext.awq_folded`` (GPTQ / clip as for AWQ, no search, no
``pre_quant_scale``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from moepress.compress import formats
from moepress.compress.moe import expert_tokens
from moepress.compress.quant import awq, int4
from moepress.compress.quantize.config import AWQ_SAMPLE_ROWS, SHARED_INPUT
from moepress.compress.quantize.group import FloatWeights
from moepress.compress.quantize.stats import LinearStats

TINY = torch.finfo(torch.float32).tiny
MLA_NORMS = (("self_attn.q_a_layernorm", "self_attn.q_b_proj"), ("self_attn.kv_a_layernorm", "self_attn.kv_b_proj"))


@dataclass
class Fold:
    """One folded input: ``source`` (a norm, or a linear whose output rows produce the input) times the
    vector; the linears ``readers`` divide their columns by ``p`` (and the ``router``, not quantized).
    ``row_p``: the vector on the source's rows (a GQA-tied ``p`` has fewer distinct values than ``p``)."""

    source: str
    readers: list[str]
    p: torch.Tensor
    row_p: torch.Tensor | None = None  # source is a linear (v_proj, up_proj)
    router: str | None = None
    choice: torch.Tensor | None = None  # awq.search_shared's candidate (its alpha read once a layer: apply)
    stats: list[LinearStats] = field(default_factory=list)  # observed statistics of this input


class FoldedWeights(FloatWeights):
    """``weights[name]`` of the folded model, float32 on demand: W / p (columns), times the rows' vector."""

    def __init__(self, linears: dict[str, nn.Linear], cols: dict[str, torch.Tensor], rows: dict[str, torch.Tensor]):
        super().__init__(linears)
        self.cols, self.rows = cols, rows

    def __missing__(self, name: str) -> torch.Tensor:
        w = super().__missing__(name)
        if name in self.cols:
            w = w / self.cols[name][None, :]
        if name in self.rows:
            w = w * self.rows[name][:, None]
        return w


def scale_stats(st: LinearStats, p: torch.Tensor) -> None:
    """Statistics of x -> those of x * p (p > 0), in place."""
    st.amax = None if st.amax is None else st.amax * p
    st.abs_sum = None if st.abs_sum is None else st.abs_sum * p.double()
    st.rows = [r * p[None, :] for r in st.rows]
    if st.S is not None:
        st.S = st.S * p.double()[:, None] * p.double()[None, :]


def gqa_tie(attn: nn.Module, v_out: int, o_in: int):
    """(tie, rows): the map making an o_proj candidate foldable into v_proj (equal across the query
    heads that share a value head: transformers' repeat_kv, query head h reads value head h // n_rep)
    and the map from a tied vector to v_proj's rows; (None, identity) without GQA; None when the
    shapes do not say how heads map."""
    if v_out == o_in:
        return None, lambda p: p
    hd = getattr(attn, "head_dim", None)
    if not hd or v_out % hd or o_in % v_out:
        return None
    n_kv, n_rep = v_out // hd, o_in // v_out

    def tie(s: torch.Tensor) -> torch.Tensor:
        t = s.reshape(n_kv, n_rep, hd).clamp(min=TINY).log().mean(1, keepdim=True).exp()
        return t.expand(n_kv, n_rep, hd).reshape(-1)

    return tie, lambda p: p.reshape(n_kv, n_rep, hd)[:, 0, :].reshape(-1)


def mla_value_rows(attn: nn.Module, kvb_out: int, o_in: int):
    """(None, rows): the map from an o_proj vector to kv_b_proj's rows (1 on the key rows, the vector
    on the value rows of each head); None when the attention does not say its head layout."""
    nope, vd = getattr(attn, "qk_nope_head_dim", None), getattr(attn, "v_head_dim", None)
    if not nope or not vd or o_in % vd or kvb_out != (o_in // vd) * (nope + vd):
        return None
    heads = o_in // vd

    def rows(p: torch.Tensor) -> torch.Tensor:
        return torch.cat([p.new_ones(heads, nope), p.reshape(heads, vd)], 1).reshape(-1)

    return None, rows


def _weights(ws) -> list[torch.Tensor]:
    return ws() if callable(ws) else ws


@torch.no_grad()
def consensus(parts: list[tuple], group: int, own: list | None = None) -> torch.Tensor | None:
    """One vector close to what each reader of a shared input would choose alone: every part's own AWQ
    vector (awq.search on its rows: unfolded AWQ's per-expert pre_quant_scale), their geometric mean
    weighted by the part's rows (its routed tokens), normalised as awq.candidate_scales; None
    without rows. ``own`` (default: the parts' rows): per part, the rows its own search runs on, as
    unfolded AWQ's statistics for it come from (calibrated.py's evidence rule), or None for a part
    that unfolded AWQ leaves unsmoothed (a sparse expert rounded to nearest): it then pulls toward
    the identity. The shared input's fold cannot give each expert its own vector; this candidate
    moves the shared one toward all of them at once, where the alpha grid on pooled statistics may
    suit none (the MoE fold would then be no better than leaving the experts unsmoothed)."""
    logs, weights = [], []
    for (ws, x), o in zip(parts, own if own is not None else [x for _, x in parts], strict=True):
        if x.shape[0] == 0:
            continue
        if o is None or o.shape[0] == 0:
            logs.append(torch.zeros(x.shape[1], device=x.device))
        else:
            logs.append(awq.search_vector(_weights(ws), o, o.abs().mean(0), group).clamp(min=TINY).log())
        weights.append(float(x.shape[0]))
    if not logs:
        return None
    w = torch.tensor(weights, device=logs[0].device)
    s = (-(torch.stack(logs) * w[:, None]).sum(0) / w.sum()).exp()  # s = 1 / pqs, as candidate_scales
    s = s / (s.max() * s.min()).sqrt()
    return (1.0 / s).float()


@torch.no_grad()
def shared_loss(parts: list[tuple], pqs: torch.Tensor, group: int) -> torch.Tensor:
    """Sum over the parts' linears and rows of the squared output error of smoothing by ``pqs`` and
    rounding to nearest (awq.search_shared's loss)."""
    return awq.shared_error(parts, 1.0 / pqs, group)


def fold_layer(cl) -> None:
    """Fold AWQ into calibrated layer ``cl`` (compress/quantize/calibrated.py, after its observation
    pass): search the vectors, then give its quantizers the folded model (see the module docstring)."""
    f = LayerFolder(cl)
    f.plan()
    f.apply()


class LayerFolder:
    """The folds of one calibrated decoder layer (``cl``: a CalibratedLayer after its observation pass)."""

    def __init__(self, cl):
        self.cl = cl
        self.layer, self.cfg = cl.layer, cl.cfg
        self.folds: list[Fold] = []

    # ---- the vectors, on the observed (unfolded) statistics and weights ----------------------------

    def _awq(self, n: str) -> bool:
        fmt, lin = self.cl.fmt_of.get(n), self.cl.linears.get(n)
        return (fmt is not None and formats.FORMATS[fmt].awq and lin is not None
                and int4.effective_group(lin.in_features, self.cfg.group_size) is not None)

    def _group(self, n: str) -> int:
        return int4.effective_group(self.cl.linears[n].in_features, self.cfg.group_size)

    def _search(self, readers: list[str], st: LinearStats | None, tie=None):
        if st is None or st.n == 0:
            return None
        return awq.search_shared([(lambda: [self.cl.weights[n] for n in readers], st.sample())], st.act_mean,
                                 self._group(readers[0]), tie=tie)

    def plan(self) -> None:
        lin, stats, fa = self.cl.linears, self.cl.stats, self.layer.ffn_attr
        qkv = [n for n in lin if n.startswith("self_attn.") and n.rpartition(".")[2] in SHARED_INPUT[0]]
        if qkv:
            self._norm_fold("input_layernorm", qkv, stats.get(qkv[0]))
        for norm, reader in MLA_NORMS:
            if reader in lin:
                self._norm_fold(norm, [reader], stats.get(reader))
        if not self.cfg.kv_cache:  # v_proj's rows scale the cached values: their FP8 scale would change
            self._v_to_o()
        ffn = self.layer.ffn
        if self.layer.moe is None:
            g, u, _ = ffn.names
            self._norm_fold("post_attention_layernorm", [f"{fa}.{g}", f"{fa}.{u}"], stats.get(f"{fa}.{g}"))
            self._up_to_down(fa, ffn, stats.get(f"{fa}.{ffn.names[2]}"))
            return
        X, tokens = self._moe_fold()
        if ffn.shared_experts is not None:
            sx = ffn.shared_experts
            self._up_to_down(f"{fa}.shared_experts", sx, stats.get(f"{fa}.shared_experts.{sx.names[2]}"))
        for e, ex in enumerate(ffn.experts if X is not None else ()):
            rows = self._own_rows(X, tokens[e], down=True)
            if rows is not None:  # None: unfolded AWQ rounds this down_proj to nearest, unsmoothed
                self._up_to_down(f"{fa}.experts.{e}", ex, None, rows)

    def _own_rows(self, X: torch.Tensor, toks: torch.Tensor, down: bool,
                  rows: int | None = None) -> torch.Tensor | None:
        """The MoE-input rows that unfolded AWQ's statistics of a routed expert come from, by the
        calibrated layer's evidence rule (calibrated.py ``_evidence_rule``): its own tokens
        (``routed``), every token (``all-tokens``; ``borrow``'s gate/up), or None (``rtn``, ``borrow``'s
        down: rounded to nearest without smoothing, so a fold would smooth on evidence the rule refuses); the first
        ``rows`` of them (default: all)."""
        rule = self.cl._evidence_rule(int(toks.numel()), X.shape[1], pooled=True)
        if rule == "routed":
            return X[toks[:rows]]
        return X[:rows] if rule == "all-tokens" or (rule == "borrow" and not down) else None

    def _norm_fold(self, norm: str, readers: list[str], st: LinearStats | None) -> None:
        if not all(self._awq(n) for n in readers):
            return
        found = self._search(readers, st)
        if found is not None:
            self.folds.append(Fold(norm, readers, found[0], choice=found[1], stats=[st]))

    def _v_to_o(self) -> None:
        """v_proj (GQA-tied) or MLA's kv_b_proj value rows -> o_proj."""
        lin, o = self.cl.linears, "self_attn.o_proj"
        v = "self_attn.v_proj" if "self_attn.v_proj" in lin else "self_attn.kv_b_proj"
        if v not in lin or o not in lin or not (self._awq(v) and self._awq(o)):
            return
        tied = gqa_tie if v.endswith("v_proj") else mla_value_rows
        maps = tied(self.layer.self_attn, lin[v].out_features, lin[o].in_features)
        if maps is None:
            return
        st = self.cl.stats.get(o)
        found = self._search([o], st, maps[0])
        if found is not None:
            self.folds.append(Fold(v, [o], found[0], row_p=maps[1](found[0]), choice=found[1], stats=[st]))

    def _moe_fold(self) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """post_attention_layernorm -> router + every routed and shared expert's gate/up: one vector,
        each expert scored on its own tokens. Returns the MoE input (None: none observed) and each routed expert's
        tokens."""
        cl, moe, fa = self.cl, self.layer.moe, self.layer.ffn_attr
        if not cl.moe_inputs:
            return None, []
        X, tokens = cl.moe_input(), expert_tokens(torch.cat(cl.routes), len(moe.experts))
        mlps = [(f"{fa}.experts.{e}", ex) for e, ex in enumerate(moe.experts)]
        if moe.shared_experts is not None:
            mlps.append((f"{fa}.shared_experts", moe.shared_experts))
        readers = [f"{p}.{n}" for p, ex in mlps for n in ex.names[:2]]
        downs = {f"{p}.{ex.names[2]}" for p, ex in mlps}
        others = [n for n in cl.linears if n.startswith(fa + ".") and n not in readers and n not in downs]
        if others or not all(self._awq(n) for n in readers):
            return X, tokens
        parts, own = [], []
        for k, (p, ex) in enumerate(mlps):
            names = [f"{p}.{n}" for n in ex.names[:2]]
            routed = k < len(moe.experts)
            # the first sampled rows only, not a copy of every routed row sliced (the copy would stay alive under
            # the slice: top-k copies of the MoE input over the layer's experts)
            first = X[tokens[k][:AWQ_SAMPLE_ROWS]] if routed else X[:AWQ_SAMPLE_ROWS]
            parts.append((lambda names=names: [cl.weights[n] for n in names], first))
            own.append(self._own_rows(X, tokens[k], down=False, rows=AWQ_SAMPLE_ROWS) if routed else first)
        p, choice = self._shared_vector(parts, own, X, self._group(readers[0]))
        shared = [cl.stats[readers[-1]]] if moe.shared_experts is not None and readers[-1] in cl.stats else []
        self.folds.append(Fold("post_attention_layernorm", readers, p, router=f"{fa}.gate", choice=choice,
                               stats=shared))
        return X, tokens

    def _shared_vector(self, parts: list[tuple], own: list, X: torch.Tensor,
                       group: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The vector of the MoE input: the best, by the loss summed over every reader on its own rows,
        of awq.search_shared's candidates (no smoothing, and the alpha grid on pooled statistics) and
        the consensus of the readers' own AWQ vectors (see :func:`consensus`), chosen on the device; the
        grid's candidate index, 0 where the consensus or no smoothing won."""
        p, k, loss = awq.search_shared(parts, X.abs().mean(0), group)
        c = consensus(parts, group, own)
        if c is None:
            return p, k
        better = shared_loss(parts, c, group) < loss
        return torch.where(better, c, p), torch.where(better, 0, k)

    def _up_to_down(self, prefix: str, ex, st: LinearStats | None, x: torch.Tensor | None = None) -> None:
        """up_proj -> down_proj of one MLP: its down input's observed statistics ``st``, or made from its
        tokens ``x`` with the unfolded weights (a routed expert)."""
        g, u, d = (f"{prefix}.{n}" for n in ex.names)
        if not (self._awq(u) and self._awq(d)):
            return
        if x is not None:
            st = LinearStats(hessian=False)
            w = self.cl.weights
            for c in x.split(4096):
                st.add(ex.act_fn(nn.functional.linear(c, w[g])) * nn.functional.linear(c, w[u]))
        found = self._search([d], st)
        if found is not None:
            self.folds.append(Fold(u, [d], found[0], row_p=found[0], choice=found[1],
                                   stats=[st] if x is None else []))

    # ---- the folded model ---------------------------------------------------------------------------

    def apply(self) -> None:
        """Norms and router changed in place (and recorded for the writer in their stored dtype), the
        statistics made those of the folded inputs, the weights seen through :class:`FoldedWeights`."""
        cl = self.cl
        mods = dict(self.layer.named_modules())
        cols, rows = {}, {}
        chosen = [f for f in self.folds if f.choice is not None]
        ks = torch.stack([f.choice for f in chosen]).tolist() if chosen else []  # one host read a layer
        for f, alpha in zip(chosen, map(awq.alpha_of, ks), strict=True):
            if alpha is not None:
                cl.res.awq_alpha[f.readers[0]] = alpha
        for f in self.folds:
            p = f.p
            if f.row_p is None:
                p = self._fold_norm(mods[f.source], f.source, p)
            else:
                rows[f.source] = f.row_p
                self._fold_bias(mods[f.source], f.source, f.row_p)
            if f.router is not None:
                self._fold_router(mods[f.router], f.router, p)
                cl.moe_inputs = [x.mul_(p[None, :]) for x in cl.moe_inputs]  # in place: held once
            for st in {id(s): s for s in f.stats if s is not None}.values():
                scale_stats(st, p)
            for n in f.readers:
                cols[n] = p
        cl.weights = FoldedWeights(cl.linears, cols, rows)

    def _stored_dtype(self, rel: str) -> torch.dtype:
        return self.cl.sm.ckpt.get(self.cl.sm.adapter.layer_prefix(self.cl.i) + rel).dtype

    def _store(self, param: torch.Tensor, rel: str, value: torch.Tensor) -> torch.Tensor:
        """``value`` rounded to ``rel``'s stored dtype: into ``param`` (the calibration that follows reads it) and
        recorded for the writer; returns the rounded tensor."""
        new = value.to(self._stored_dtype(rel))
        param.data.copy_(new.to(param.dtype))
        self.cl.res.tensors[rel] = new
        return new

    def _fold_norm(self, norm: nn.Module, name: str, p: torch.Tensor) -> torch.Tensor:
        """norm weight g -> round(g * p) in its stored dtype; returns the vector that rounded weight
        carries (round(g * p) / g), which the readers then divide by."""
        g = norm.weight.data.float().clone()  # float() of a float32 weight is the weight, which _store overwrites
        new = self._store(norm.weight, name + ".weight", g * p)
        return torch.where(g != 0, new.float() / torch.where(g != 0, g, 1.0), p)

    def _fold_bias(self, lin: nn.Module, name: str, p: torch.Tensor) -> None:
        """A source linear's bias b -> round(b * p) in its stored dtype: its rows are scaled by p, and so is its bias
        (llm-compressor's smoothing does the same), or the readers' output would gain W (b / p - b). In place for the
        calibration that follows, and recorded for the writer."""
        b = getattr(lin, "bias", None)
        if b is not None:
            self._store(b, name + ".bias", b.data.float() * p.to(b.device))

    def _fold_router(self, router: nn.Module, name: str, p: torch.Tensor) -> None:
        """Router columns / p, rounded to its stored dtype: logits unchanged up to that rounding."""
        self._store(router.weight, name + ".weight", router.weight.data.float() / p[None, :])
