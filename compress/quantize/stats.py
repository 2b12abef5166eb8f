"""Calibration statistics of a linear's input (amax, mean |x|, a row sample, the Hessian), and the
groups of linears that read one input and so share them."""

from __future__ import annotations

import copy

import torch

from moepress.calib.distributed import all_gather_saved
from moepress.compress.quant import gptq
from moepress.compress.quantize.config import AWQ_SAMPLE_ROWS, SHARED_INPUT


class LinearStats:
    """Inputs seen by one linear (or one group sharing an input): amax and mean |x| per channel,
    a sample of rows (AWQ), the Hessian (GPTQ).

    Each forward call contributes (sum |x| in float64, sample rows, x^T x); contributions are folded
    in call order. Under torchrun every rank keeps its own calls (their inputs) until :meth:`gather`,
    which folds all ranks' calls in global batch order with the same operations — so the
    statistics, and the quantized checkpoint, are bit-identical to one process's.
    """

    def __init__(self, hessian: bool, defer: bool = False):
        self.amax = None
        self.hessian = hessian
        self.defer = defer  # keep per-call contributions for gather() (distributed)
        self.calls: list[tuple] = []
        self.abs_sum = None
        self.n = 0
        self.rows: list[torch.Tensor] = []
        self.n_rows = 0
        self.S = None  # sum of x^T x (float64; float32 above gptq.WIDE_INPUT)
        # set by the owner when one quantizer call alone reads these statistics: that call may take
        # the Hessian (make_hessian(take=True)), made in S's own memory rather than a copy of it
        self.single_use = False
        self.taken = False

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        if x.shape[0] == 0:
            return
        a = x.abs()
        self.amax = a.amax(0) if self.amax is None else torch.maximum(self.amax, a.amax(0))
        take = x[: max(0, AWQ_SAMPLE_ROWS - self.n_rows)].clone()
        self.n_rows += take.shape[0]
        # deferred (torchrun): the call's rows, not its x^T x: gather() folds every call exactly as one
        # process does (a wide input's addmm_ rounds unlike a product then a sum), and rows
        # [tokens, in] take less memory than one [in, in] matrix per call
        inputs = (x.clone() if self.defer else x) if self.hessian else None
        call = (a.sum(0, dtype=torch.float64), x.shape[0], take, inputs)
        if self.defer:
            self.calls.append(call)
        else:
            self._fold(call)

    def _fold(self, call) -> None:
        s, n, sample, inputs = call
        self.abs_sum = s if self.abs_sum is None else self.abs_sum + s
        self.n += n
        if sample.shape[0] and sum(r.shape[0] for r in self.rows) < AWQ_SAMPLE_ROWS:
            self.rows.append(sample[: AWQ_SAMPLE_ROWS - sum(r.shape[0] for r in self.rows)])
        if inputs is not None:
            self._add_hessian(inputs)

    def _add_hessian(self, x: torch.Tensor) -> None:
        """S += x^T x: float64, or float32 above gptq.WIDE_INPUT, where later calls add in place
        (addmm_: no [in, in] temporary beside S)."""
        xd = x.to(gptq.hessian_dtype(x.shape[1]))
        if self.S is None:
            self.S = xd.T @ xd
        elif xd.dtype == torch.float32:
            self.S.addmm_(xd.T, xd)
        else:
            self.S.add_(xd.T @ xd)  # in place: one [in, in] sum alive

    def gather(self, env, device: torch.device) -> None:
        """Fold every rank's calls, in global order (ranks hold contiguous shards of the batches), on ``device``
        (where this rank computes)."""
        everyone = all_gather_saved((self.calls, self.amax), env, device)
        self.calls = []
        amaxes = [am for _, am in everyone if am is not None]
        self.amax = torch.stack(amaxes).amax(0) if amaxes else None
        for calls, _ in everyone:
            for call in calls:
                self._fold(call)
        self.defer = False

    @property
    def H(self):
        return self.make_hessian()

    def make_hessian(self, take: bool = False) -> torch.Tensor | None:
        """H = 2 S / n, a new [in, in] tensor; ``take``: made in S's own memory (the same values) and
        the statistics let go of it, so one [in, in] matrix is alive, not two (an 18432-wide input's
        float32 S is 1.36 GB). A second request after a take is an error, never a silent None."""
        if self.taken:
            raise RuntimeError("LinearStats: the Hessian was taken by an earlier quantizer call")
        if self.S is None:
            return None
        if not take:
            return (2.0 * self.S).div_(max(self.n, 1))
        H, self.S, self.taken = self.S, None, True
        return H.mul_(2.0).div_(max(self.n, 1))

    @property
    def act_mean(self) -> torch.Tensor:
        return (self.abs_sum / max(self.n, 1)).float()

    def sample(self) -> torch.Tensor:
        return torch.cat(self.rows) if self.rows else torch.zeros(0)


def gather_list(items: list, env, device: torch.device) -> list:
    """Every rank's list, concatenated in rank order (= global batch order), its tensors on ``device``."""
    if not env.enabled:
        return items
    return [x for part in all_gather_saved(items, env, device) for x in part]


def shared_input_groups(names: list[str]) -> list[list[str]]:
    """Linears (module names in a layer) grouped by shared input; order preserved. Siblings are looked up
    by parent module, so a layer of 384 experts x 3 projections costs one pass, not one per linear."""
    siblings: dict[str, list[str]] = {}
    for m in names:
        siblings.setdefault(m.rpartition(".")[0], []).append(m)
    out, seen = [], set()
    for n in names:
        if n in seen:
            continue
        parent, _, leaf = n.rpartition(".")
        grp = [n]
        for fam in SHARED_INPUT:
            if leaf in fam:
                grp = [m for m in siblings[parent] if m.rpartition(".")[2] in fam]
                break
        seen.update(grp)
        out.append(grp)
    return out


def by_format(names: list[str], fmt_of: dict[str, str | None]) -> dict[str, list[str]]:
    """``names`` split by their format, in order of first appearance (a group with mixed rules)."""
    out: dict[str, list[str]] = {}
    for n in names:
        out.setdefault(fmt_of[n], []).append(n)
    return out


def hessian_evidence(x: torch.Tensor | None, damp: float, exact_width: int = 512) -> dict:
    """How well the rows ``x`` [tokens, width] determine a linear's input Hessian H = x^T x / n:
    its rank and the condition number of the damped H that GPTQ inverts (H + damp * mean diag(H) I).

    Exact (eigvalsh) up to ``exact_width`` channels, where it costs little; wider inputs get the
    bound min(tokens, width) and the ratio of the damped diagonal's extremes (a lower bound of the
    condition number), so a 7168-wide expert costs O(tokens x width), not O(width^3)."""
    return hessian_read([hessian_pending(x, damp, exact_width)])[0]


def hessian_pending(x: torch.Tensor | None, damp: float, exact_width: int = 512) -> tuple:
    """:func:`hessian_evidence`'s figures, a float64 tensor on ``x``'s device not yet read on the host (on a GPU
    each read waits for the device: a layer's experts are read at once by :func:`hessian_read`)."""
    if x is None or x.shape[0] == 0:
        return None, 0, 0, damp
    n, width = x.shape
    xd = x.double()
    if width <= exact_width:
        ev = torch.linalg.eigvalsh(xd.T @ xd / n)
        top = ev[-1]
        rank = (ev > top.clamp(min=1e-300) * width * 1e-12).sum().double()
        return torch.stack([top, rank, ev.sum(), ev[0]]), n, width, damp
    diag = (xd * xd).sum(0) / n
    return torch.stack([diag.mean(), diag.max(), diag.min()]), n, width, damp


def hessian_read(pending: list[tuple]) -> list[dict]:
    """The evidence of :func:`hessian_pending`'s figures, all read from their device in one copy."""
    figs = [f for f, *_ in pending if f is not None]
    vals = iter(torch.cat(figs).tolist() if figs else [])
    out = []
    for f, n, width, damp in pending:
        if f is None:
            out.append({"rank": 0, "condition": None, "estimate": "none"})
        elif f.numel() == 4:  # eigvalsh: the largest eigenvalue, the rank, their sum, the smallest
            top, rank, total, low = (next(vals) for _ in range(4))
            d = damp * total / width
            cond = (top + d) / max(low + d, 1e-300)
            out.append({"rank": int(rank), "condition": round(cond, 1), "estimate": "eigvalsh"})
        else:  # the diagonal's mean, max and min
            mean, high, low = (next(vals) for _ in range(3))
            d = damp * mean
            cond = (high + d) / max(low + d, 1e-300)
            out.append({"rank": min(n, width), "condition": round(cond, 1), "estimate": "diagonal (rank: upper bound)"})
    return out


def amax_only(x: torch.Tensor | None) -> LinearStats:
    """Statistics that carry only the input's amax (for its static input scale): no rows, no Hessian,
    n = 0, so the format's quantizer rounds to nearest (no AWQ search, no GPTQ)."""
    st = LinearStats(hessian=False)
    if x is not None and x.shape[0]:
        st.amax = x.detach().reshape(-1, x.shape[-1]).float().abs().amax(0)
    return st


def amax_of(st: LinearStats | None) -> LinearStats | None:
    """Only the amax of ``st`` (None: None), the rest let go: what recording a group whose quantizer has
    run still reads (its static input scale, compress/quantize/group.py quantize_group)."""
    if st is None:
        return None
    kept = LinearStats(hessian=False)
    kept.amax = st.amax
    return kept


def with_amax(st: LinearStats, x: torch.Tensor | None) -> LinearStats:
    """A view of ``st`` whose amax is that of the rows ``x`` (None without rows): statistics from one
    token set, the static input scale from another."""
    view = copy.copy(st)
    view.amax = amax_only(x).amax
    view.single_use = False  # it shares st's S: never taken (made in place) through a view
    return view
