"""``reroute``: greedy backward elimination on the hidden state after the MoE block, with re-routing.

``ExpertOutputs`` caches f_e(x_t) for the (token, expert) pairs the search touches, ``PairProducts``
their inner products per token, from which the error of any routing is computed;
``RerouteSearch`` drops one expert at a time, re-evaluating only the tokens a drop can affect.
"""

from __future__ import annotations

from itertools import chain

import torch

from moepress.compress.moe import SparseMoE
from moepress.compress.prune.budget import Budget
from moepress.compress.prune.evidence import LayerEvidence, Selection
from moepress.compress.prune.routing import group_of, group_ranks, route_masked


class ExpertOutputs:
    """f_e(x_t) for (token, expert) pairs, computed once, on demand (exact, from the layer's experts).

    Stored in blocks of ``max(1024, tokens)`` rows added as the cache grows, never a grown copy of
    the whole cache (that copy would hold the old and the new buffer at once, beside the layer)."""

    def __init__(self, x: torch.Tensor, moe: SparseMoE):
        self.x, self.moe = x, moe
        t, h = x.shape
        self.slot = torch.full((t, moe.num_experts), -1, dtype=torch.long)
        self.rows = max(1024, t)
        self.blocks = [torch.empty(self.rows, h)]
        self.n = 0

    @torch.no_grad()
    def fill(self, t: torch.Tensor, e: torch.Tensor) -> None:
        miss = self.slot[t, e] < 0
        T = self.x.shape[0]
        key = torch.unique(e[miss] * T + t[miss])  # sorted: grouped by expert
        experts, counts = torch.stack(torch.unique_consecutive(key // T, return_counts=True)).tolist()  # one sync
        for ex, toks in zip(experts, torch.split(key % T, counts), strict=True):
            y = self.moe.experts[ex](self.x[toks]).float()
            self.slot[toks, ex] = torch.arange(self.n, self.n + toks.numel())
            done = 0
            while done < y.shape[0]:  # across the end of a block
                b, r = divmod(self.n, self.rows)
                if b == len(self.blocks):
                    self.blocks.append(torch.empty_like(self.blocks[0]))
                k = min(y.shape[0] - done, self.rows - r)
                self.blocks[b][r: r + k] = y[done: done + k]
                done, self.n = done + k, self.n + k

    def gather(self, slots: torch.Tensor) -> torch.Tensor:
        """The cached rows at ``slots`` [m] -> [m, hidden]."""
        if len(self.blocks) == 1:
            return torch.index_select(self.blocks[0], 0, slots)
        out = torch.empty(slots.numel(), self.blocks[0].shape[1])
        b = slots // self.rows
        order = torch.argsort(b, stable=True)  # positions grouped by block: one index_copy_ a block
        blocks, counts = torch.unique_consecutive(b[order], return_counts=True)
        for j, o in zip(blocks.tolist(), torch.split(order, counts.tolist()), strict=True):
            out.index_copy_(0, o, torch.index_select(self.blocks[j], 0, slots[o] - j * self.rows))
        return out

    def combine(self, t: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """sum_j w_j f_{e_j}(x_t) for rows t [n], indices/weights [n, k]."""
        tt = t[:, None].expand_as(indices).reshape(-1)
        ee = indices.reshape(-1)
        self.fill(tt, ee)
        y = self.gather(self.slot[tt, ee]).view(*indices.shape, -1)
        return torch.bmm(weights.float().unsqueeze(1), y).squeeze(1)


def rms_normalize(v: torch.Tensor) -> torch.Tensor:
    """v / rms(v) per row: an RMSNorm without its weight (the next layer's norm applies its own)."""
    return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + 1e-12)


class PairProducts:
    """Per token t, the float64 inner products of its cached expert outputs f_e(x_t) with each
    other (``gram``), with the search's target (``p``: ``ref``) and with the rest of the post-block
    state (``q``: ``base``), so that the error of any routing of t among its cached experts is a
    few k x k sums instead of k gathered hidden-size rows (``RerouteSearch._err``).

    Each token's experts get local indices 0.. in the order they are first needed (``loc``,
    ``lslot``: the row of ``ExpertOutputs`` each one is cached at). Products are computed from the
    cached rows when a pair is first needed: a token's whole table at once where most of it is new
    (the search's first candidates), else only the new pairs' rows and columns."""

    def __init__(self, out: ExpertOutputs, ref: torch.Tensor, base: torch.Tensor | None, chunk_bytes: int):
        self.out, self.ref, self.base, self.chunk_bytes = out, ref, base, chunk_bytes
        t, e = out.slot.shape
        self.loc = torch.full((t, e), -1, dtype=torch.long)
        self.cnt = torch.zeros(t, dtype=torch.long)
        self._alloc(0)

    def _alloc(self, c: int) -> None:
        """Empty tables for c experts per token."""
        t = self.cnt.numel()
        self.lslot = torch.full((t, c), -1, dtype=torch.long)
        self.p, self.q = torch.zeros(t, c, dtype=torch.float64), torch.zeros(t, c, dtype=torch.float64)
        self.gram = torch.zeros(t, c, c, dtype=torch.float64)

    def _grow(self, c: int) -> None:
        """Room for c experts per token, the products computed so far kept."""
        old = (self.lslot, self.p, self.q, self.gram)
        m = old[0].shape[1]
        self._alloc(c)
        self.lslot[:, :m], self.p[:, :m], self.q[:, :m], self.gram[:, :m, :m] = old

    @torch.no_grad()
    def ensure(self, t: torch.Tensor, e: torch.Tensor) -> None:
        """The products of every pair (t[i], e[i]) available (flat [m] token and expert ids)."""
        miss = self.loc[t, e] < 0
        E = self.loc.shape[1]
        key = torch.unique(t[miss] * E + e[miss])  # sorted: grouped by token
        if key.numel() == 0:
            return
        tt, ee = key // E, key % E
        self.out.fill(tt, ee)
        toks, counts = torch.unique_consecutive(tt, return_counts=True)
        first = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        new = self.cnt[tt] + torch.arange(key.numel()) - first
        c = int(new.max()) + 1  # one sync
        if c > self.lslot.shape[1]:
            self._grow(max(c, 2 * self.lslot.shape[1]))
        self.loc[tt, ee] = new
        self.lslot[tt, new] = self.out.slot[tt, ee]
        self.cnt[toks] += counts
        if 2 * key.numel() < toks.numel() * (c + 1):  # a few new experts a token: their products only
            self._pair_products(tt, new, c)
        else:
            self._products(toks, c)

    def _rows(self, slots: torch.Tensor) -> torch.Tensor:
        """The cached outputs at ``slots`` (any shape; -1: zeros) in float64, [*slots.shape, hidden]."""
        f = self.out.gather(slots.clamp(min=0).reshape(-1)).view(*slots.shape, -1).double()
        return f.mul_((slots >= 0)[..., None])

    def _products(self, toks: torch.Tensor, c: int) -> None:
        """gram, p and q of these tokens (at most c experts each), recomputed from the cached outputs."""
        n = max(1, self.chunk_bytes // (8 * c * self.ref.shape[1]))
        for s in range(0, toks.numel(), n):
            u = toks[s: s + n]
            f = self._rows(self.lslot[u, :c])
            self.gram[u, :c, :c] = f @ f.transpose(1, 2)
            self.p[u, :c] = (f @ self.ref[u].double()[..., None])[..., 0]
            if self.base is not None:
                self.q[u, :c] = (f @ self.base[u].double()[..., None])[..., 0]

    def _pair_products(self, tt: torch.Tensor, new: torch.Tensor, c: int) -> None:
        """The products of the new pairs (token tt[i], local new[i]) with their token's first c experts."""
        n = max(1, self.chunk_bytes // (8 * (c + 1) * self.ref.shape[1]))
        for s in range(0, tt.numel(), n):
            t, a = tt[s: s + n], new[s: s + n]
            f, g = self._rows(self.lslot[t, a]), self._rows(self.lslot[t, :c])
            d = (g @ f[..., None])[..., 0]  # [m, c]
            self.gram[t, a, :c] = d
            self.gram[t, :c, a] = d  # column a of row b (b new as well: the same value, written twice)
            self.p[t, a] = (f * self.ref[t].double()).sum(-1)
            if self.base is not None:
                self.q[t, a] = (f * self.base[t].double()).sum(-1)


class RerouteSearch:
    """Greedy backward elimination: drop, one at a time, the expert whose removal increases
    sum_t ||n(b_t + y_t) - n(b_t + y'_t)||^2 the least, where y is the layer's original
    routed-expert output, y' the output when the pruned router re-routes every token among the
    kept experts (``route_masked``: exact family routing), b_t the rest of the post-block hidden
    state (the residual stream plus the shared experts' output) and n(v) = v / rms(v): the error
    of what the next layer's RMSNorm reads. Against the plain squared error of y this weighs an
    error by the size of the residual it lands in and counts a change of direction, not of
    length. Without a recorded residual (``RouteRecorder.attach`` not used) the objective is
    sum_t ||y_t - y'_t||^2.

    ``contrib[t, c]`` is how much token t's error grows if c is dropped next; it is non-zero only
    where dropping c can change t's routing (t is routed to c; c makes t's group score in
    DeepSeek's groups; any c for a softmax without renormalisation). After a drop only the rows
    whose entries can have changed are re-evaluated: tokens re-routed by the drop, tokens whose
    evaluations used the dropped expert as a replacement, and (groups) tokens for which it was
    the third best of its group. The result equals re-evaluating everything at every step (a test
    checks it against that brute force), at a fraction of the cost.
    """

    # routings and errors are computed ``chunk`` rows at a time (CHUNK_BYTES of temporaries); the
    # expert outputs that a step's rows lack are computed together, each expert called once (each
    # call casts its stored weights); the pair products and the reference states are computed from
    # temporaries of at most ``work`` bytes: a 64th of the layer's experts, 256 KB-128 MB, so that the
    # search stays small beside the layer whatever the layer's size
    CHUNK_BYTES = 128 * 2**20
    STEP_LAYER_SHARE = 64

    def __init__(self, ev: LayerEvidence, budget: Budget):
        self.ev, self.budget = ev, budget
        x, self.logits, idx0, w0 = ev.recorder.tensors()
        self.r = ev.routing
        self.bias = ev.moe.gate.e_score_correction_bias
        self.E = budget.num_experts
        self.T = x.shape[0]
        # bytes a row: its kept set, routing temporaries ([E] floats) and k x k float64 products
        self.chunk = max(64, self.CHUNK_BYTES // (16 * self.E + 32 * budget.top_k ** 2))
        # the experts as stored: a weight kept quantized (StoredLinear.keep) is buffers, its parameter empty
        stored = chain(ev.moe.experts.parameters(), ev.moe.experts.buffers())
        experts = sum(t.numel() * t.element_size() for t in stored)
        self.work = min(self.CHUNK_BYTES, max(2**18, experts // self.STEP_LAYER_SHARE))
        self.out = ExpertOutputs(x, ev.moe)
        cand = self._prefill(idx0)
        self._reference(idx0, w0)
        self.prod = PairProducts(self.out, self.y0 if self.ref is None else self.ref, self.base, self.work)
        self.prod.ensure(torch.arange(self.T)[:, None].expand_as(cand).reshape(-1), cand.reshape(-1))
        self.keep = torch.ones(self.E, dtype=torch.bool)
        self.droppable = torch.ones(self.E, dtype=torch.bool)
        self.droppable[list(budget.protected_in(ev.layer))] = False
        self.grouped = self.r["scoring"] == "sigmoid" and self.r["n_group"] > 1
        self.dense = self.r["scoring"] == "softmax" and not self.r["renormalize"]
        everyone = torch.arange(self.T)
        self.w, self.idx = route_masked(self.logits, self.keep, self.r, self.bias)
        self.err = self._err(everyone, self.idx, self.w)
        if self.grouped:
            self.top2, self.third = group_ranks(self.logits, self.keep, self.r, self.bias)
        self.contrib = torch.zeros(self.T, self.E, dtype=torch.float64)
        self.used = torch.zeros(self.T, self.E, dtype=torch.bool)
        self._evaluate(everyone)

    def _prefill(self, idx0: torch.Tensor) -> torch.Tensor:
        """Each token's routed experts and its next candidates by router preference (a renormalised
        top-k that loses up to m experts re-routes within these), computed; returns them [T, n]."""
        budget = self.budget
        m = min(budget.top_k, self.E - budget.keep)
        pref = self.logits if self.r["scoring"] == "softmax" else self.logits.sigmoid() + self.bias.float()
        cand = torch.cat([idx0, pref.topk(budget.top_k + m, dim=-1)[1]], 1)
        self.out.fill(torch.arange(self.T)[:, None].expand_as(cand).reshape(-1), cand.reshape(-1))
        return cand

    def _reference(self, idx0: torch.Tensor, w0: torch.Tensor) -> None:
        """y0, the original routed output; b = post-block state - y0 (the residual stream plus the shared
        experts), so that b + y0 is the recorded state, and its normalisation ``ref``; their per-token
        products in float64. y0 is kept only as the target without a recorded state (else a chunk's own).
        Computed ``work`` bytes of rows at a time (each row on its own: the same numbers as all at once):
        the routed output of all tokens at once would gather top-k hidden-size rows a token (Kimi K2:
        16k tokens x 8 x 7168 floats, 3.8 GB), and the float64 copies of the states as much again."""
        post, (T, h) = self.ev.recorder.states(), self.out.x.shape
        n = max(1, self.work // (8 * self.budget.top_k * h))
        self.y0 = torch.empty(T, h) if post is None else None
        self.base = self.ref = None
        self.rr = torch.empty(T, dtype=torch.float64)
        if post is not None:
            self.base, self.ref = torch.empty_like(post), torch.empty_like(post)
            self.rb, self.bb = torch.empty_like(self.rr), torch.empty_like(self.rr)
        for s in range(0, T, n):
            r = slice(s, s + n)
            y0 = self.out.combine(torch.arange(s, min(s + n, T)), idx0[r], w0[r])
            if post is None:
                self.y0[r] = y0
                ref = y0.double()
            else:
                self.base[r] = post[r] - y0
                self.ref[r] = rms_normalize(self.base[r] + y0)
                ref, base = self.ref[r].double(), self.base[r].double()
                self.rb[r], self.bb[r] = (ref * base).sum(-1), (base * base).sum(-1)
            self.rr[r] = (ref * ref).sum(-1)
        self.ref_sq = float(self.rr.sum())

    def _err(self, rows, idx, w) -> torch.Tensor:
        """Each row's error under routing (idx, w) [n, k], from the pair products: with v = b + sum_j w_j f_j
        and s = 1 / rms(v), ||ref - s v||^2 = ||ref||^2 - 2 s <ref, v> + s^2 ||v||^2 (float64: the terms
        are of the size of the hidden width, their difference can be far smaller); without a residual,
        ||y0 - y||^2 = ||y0||^2 - 2 <y0, y> + ||y||^2."""
        out = torch.empty(rows.numel(), dtype=torch.float64)
        pr = self.prod
        pr.ensure(rows[:, None].expand_as(idx).reshape(-1), idx.reshape(-1))  # each expert called once
        for s in range(0, rows.numel(), self.chunk):
            c = slice(s, s + self.chunk)
            t = rows[c]
            C, wd = pr.p.shape[1], w[c].double()
            at = t[:, None] * C + pr.loc.take(t[:, None] * self.E + idx[c])  # flat (token, local) indices
            g = pr.gram.take(at[:, :, None] * C + (at[:, None, :] - t[:, None, None] * C))  # [n, k, k]
            yy = (wd[:, :, None] * g * wd[:, None, :]).sum((1, 2))
            ry = (wd * pr.p.take(at)).sum(-1)
            if self.base is None:
                out[c] = self.rr[t] - 2 * ry + yy
            else:
                vv = self.bb[t] + 2 * (wd * pr.q.take(at)).sum(-1) + yy
                inv = torch.rsqrt(vv / self.ref.shape[1] + 1e-12)
                out[c] = self.rr[t] - 2 * inv * (self.rb[t] + ry) + inv * inv * vv
        return out.clamp_(min=0.0)

    def _affected(self, rows: torch.Tensor) -> torch.Tensor:
        """[len(rows), E]: dropping e (kept, droppable) can change the routing of these tokens."""
        if self.dense:
            a = torch.ones(rows.numel(), self.E, dtype=torch.bool)
        else:
            a = torch.zeros(rows.numel(), self.E, dtype=torch.bool).scatter_(1, self.idx[rows], True)
            if self.grouped:
                a |= self.top2[rows]
        return a & self.keep & self.droppable

    def _evaluate(self, rows: torch.Tensor) -> None:
        """Recompute contrib and used for these tokens under the current kept set."""
        self.contrib[rows] = 0
        self.used[rows] = False
        ri, c = self._affected(rows).nonzero(as_tuple=True)
        t = rows[ri]
        w = torch.empty(t.numel(), self.budget.top_k)
        idx = torch.empty(t.numel(), self.budget.top_k, dtype=torch.long)
        for s in range(0, ri.numel(), self.chunk):
            sl = slice(s, s + self.chunk)
            keep = self.keep.expand(t[sl].numel(), self.E).clone()
            keep[torch.arange(t[sl].numel()), c[sl]] = False
            w[sl], idx[sl] = route_masked(self.logits[t[sl]], keep, self.r, self.bias)
        self.contrib[t, c] = self._err(t, idx, w) - self.err[t]
        self.used[t[:, None].expand_as(idx), idx] = True

    def drop(self, e: int) -> None:
        moved = (self.idx == e).any(1)
        if self.dense:
            moved[:] = True
        if self.grouped:
            moved |= self.top2[:, e]
        stale = moved | self.used[:, e]
        if self.grouped:
            stale |= self.third[:, e]
        self.keep[e] = False
        rows = moved.nonzero(as_tuple=True)[0]
        if rows.numel():
            self.w[rows], self.idx[rows] = route_masked(self.logits[rows], self.keep, self.r, self.bias)
            self.err[rows] = self._err(rows, self.idx[rows], self.w[rows])
        rows = stale.nonzero(as_tuple=True)[0]
        if self.grouped and rows.numel():
            self.top2[rows], self.third[rows] = group_ranks(self.logits[rows], self.keep, self.r, self.bias)
        self._evaluate(rows)

    def eligible(self) -> torch.Tensor:
        b = self.budget
        g = group_of(self.E, b.n_group)
        left = torch.zeros(b.n_group, dtype=torch.long).index_add_(0, g, self.keep.long())
        return self.keep & self.droppable & (left[g] > b.keep_per_group)

    def run(self) -> Selection:
        scores = torch.full((self.E,), float("nan"), dtype=torch.float64)
        order, boundary = [], None
        while int(self.keep.sum()) > self.budget.keep:
            delta = self.contrib.sum(0).masked_fill(~self.eligible(), float("inf"))
            best = int(torch.argmin(delta))  # first minimum: lowest expert id on ties
            scores[best] = float(delta[best])
            order.append(best)
            if int(self.keep.sum()) == self.budget.keep + 1:
                boundary = self._boundary(delta, best)
            self.drop(best)
        rest = self.keep & self.droppable  # kept experts: the error each would add if dropped now
        scores[rest] = self.contrib.sum(0)[rest]
        kept = self.keep.nonzero(as_tuple=True)[0].tolist()
        rel = float(self.err.sum()) / max(self.ref_sq, 1e-30)
        extra = {"drop_order": order, "post_moe_state_rel_error": rel, "search_tokens": self.T,
                 "cached_pairs": self.out.n}
        return Selection(kept, scores, {**extra, "boundary": boundary} if boundary else extra)

    def _boundary(self, delta: torch.Tensor, best: int) -> dict | None:
        """The last drop against the runner-up of that step: the margin between the error each would
        add, and its noise over tokens (the standard error of the sum of the per-token paired
        differences: a few tokens with large differences make a noisy margin)."""
        rest = delta.clone()
        rest[best] = float("inf")
        runner = int(torch.argmin(rest))
        if not torch.isfinite(rest[runner]):
            return None
        d = self.contrib[:, runner] - self.contrib[:, best]
        return {"weakest_kept": runner, "strongest_dropped": best, "margin": float(d.sum()),
                "noise": float(d.std() * d.numel() ** 0.5) if d.numel() > 1 else abs(float(d.sum())),
                "noise_from": f"per-token paired differences over {self.T} search tokens",
                "tokens_that_differ": int((d != 0).sum())}


def reroute_select(ev: LayerEvidence, budget: Budget) -> Selection:
    return RerouteSearch(ev, budget).run()
