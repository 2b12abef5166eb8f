"""Calibration statistics of a linear's input (amax, mean |x|, a row sample, the Hessian), and the
groups of linears that read one input and so share them."""

from __future__ import annotations

import torch
import torch.distributed as tdist

from moepress.compress.quantize.config import AWQ_SAMPLE_ROWS, SHARED_INPUT


class LinearStats:
    """Inputs seen by one linear (or one group sharing an input): amax and mean |x| per channel,
    a sample of rows (AWQ), the Hessian (GPTQ).

    Each forward call contributes (sum |x| in float64, rows, x^T x); contributions are folded in
    call order. Under torchrun every rank keeps its own calls' contributions until
    :meth:`gather`, which folds all ranks' calls in global batch order — so the statistics, and
    the quantized checkpoint, are bit-identical to one process's.
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
        self.S = None  # sum of x^T x (float64)

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        if x.shape[0] == 0:
            return
        a = x.abs()
        self.amax = a.amax(0) if self.amax is None else torch.maximum(self.amax, a.amax(0))
        take = x[: max(0, AWQ_SAMPLE_ROWS - self.n_rows)].clone()
        self.n_rows += take.shape[0]
        xd = x.double() if self.hessian else None
        call = (a.sum(0, dtype=torch.float64), x.shape[0], take, xd.T @ xd if self.hessian else None)
        if self.defer:
            self.calls.append(call)
        else:
            self._fold(call)

    def _fold(self, call) -> None:
        s, n, rows, xtx = call
        self.abs_sum = s if self.abs_sum is None else self.abs_sum + s
        self.n += n
        if rows.shape[0] and sum(r.shape[0] for r in self.rows) < AWQ_SAMPLE_ROWS:
            self.rows.append(rows[: AWQ_SAMPLE_ROWS - sum(r.shape[0] for r in self.rows)])
        if xtx is not None:
            self.S = xtx if self.S is None else self.S + xtx

    def gather(self, env) -> None:
        """Fold every rank's calls, in global order (ranks hold contiguous shards of the batches)."""
        everyone: list = [None] * env.world_size
        tdist.all_gather_object(everyone, (self.calls, self.amax))
        self.calls = []
        amaxes = [am for _, am in everyone if am is not None]
        self.amax = torch.stack(amaxes).amax(0) if amaxes else None
        for calls, _ in everyone:
            for call in calls:
                self._fold(call)
        self.defer = False

    @property
    def H(self):
        return None if self.S is None else 2.0 * self.S / max(self.n, 1)

    @property
    def act_mean(self) -> torch.Tensor:
        return (self.abs_sum / max(self.n, 1)).float()

    def sample(self) -> torch.Tensor:
        return torch.cat(self.rows) if self.rows else torch.zeros(0)


def gather_list(items: list, env) -> list:
    """Every rank's list, concatenated in rank order (= global batch order)."""
    if not env.enabled:
        return items
    everyone: list = [None] * env.world_size
    tdist.all_gather_object(everyone, items)
    return [x for part in everyone for x in part]


def shared_input_groups(names: list[str]) -> list[list[str]]:
    """Linears (module names in a layer) grouped by shared input; order preserved."""
    out, seen = [], set()
    for n in names:
        if n in seen:
            continue
        parent, _, leaf = n.rpartition(".")
        grp = [n]
        for fam in SHARED_INPUT:
            if leaf in fam:
                grp = [m for m in names if m.rpartition(".")[0] == parent and m.rpartition(".")[2] in fam]
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
