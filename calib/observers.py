"""Observers on the layer stream.

They attach to a loaded decoder layer (``attach(i, layer)``), accumulate while the
stream runs the calibration batches through it, and detach. Sums are float64,
counts int64, so statistics over millions of tokens stay exact; every observer can
``merge`` another of its kind (ranks of a distributed run, shards of a dataset).
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from moepress.compress.moe import DecoderLayer


def reference_renormalize(moe) -> bool:
    """Whether REAP's reference renormalises its gates over the top-k: ``getattr(model.config,
    "norm_topk_prob", False)`` (CerebrasResearch/reap src/reap/main.py ``_setup_observer``, commit
    1970473c). Mixtral's config has no such field, so there the gate is the softmax over all experts
    although Mixtral itself renormalises. The config is the adapter's whose ``route`` the block runs."""
    hf = getattr(getattr(moe.route, "__self__", None), "hf_config", None)
    return bool(getattr(hf, "norm_topk_prob", False))


@dataclass
class LayerRouting:
    """Routing statistics of one MoE layer, per routed expert.

    ``counts``, ``gate_sum``, ``norm_sum`` follow the family's real routing. ``reap_sum`` /
    ``reap_count`` follow REAP's reference observer exactly (CerebrasResearch/reap, commit
    1970473c51ca3caeb98c10392f15b3a08a672974, src/reap/pruning_metrics.py ``update_pruning_state`` and
    src/reap/observer.py ``MoETransformerObserver._hook_factory``): the tokens an expert is counted on
    are ``topk(router_logits, k)`` over the raw logits; the gate is ``softmax(router_logits)`` over
    all experts in float32, divided by its sum over those top-k when the config's ``norm_topk_prob``
    is true (:func:`reference_renormalize`), clamped at float32 eps; the norm is the L2 norm of the
    expert's unweighted output; REAP = sum(gate * norm) / tokens counted. For sigmoid routers with a
    correction bias and groups (DeepSeek-V3; the reference's Glm4MoeTopkRouter path returns the raw
    logits) that ignores the sigmoid, the bias, the group limit and the scaling factor, as the
    reference does; an expert counted there but not really routed is run on those tokens here.
    """

    num_experts: int
    top_k: int
    tokens: int = 0
    counts: torch.Tensor = None  # int64 [E]: tokens routed to each expert
    gate_sum: torch.Tensor = None  # float64 [E]: sum of routing weights received
    norm_sum: torch.Tensor = None  # float64 [E]: sum of ||expert output||_2 over routed tokens
    reap_sum: torch.Tensor = None  # float64 [E]: sum of reference gate * ||expert output||_2 (REAP)
    reap_count: torch.Tensor = None  # int64 [E]: tokens with the expert in the top-k of the raw logits
    coselect: torch.Tensor = None  # int64 [E, E]: tokens routed to both i and j

    def __post_init__(self):
        e = self.num_experts
        if self.counts is None:
            self.counts = torch.zeros(e, dtype=torch.int64)
            self.gate_sum = torch.zeros(e, dtype=torch.float64)
            self.norm_sum = torch.zeros(e, dtype=torch.float64)
            self.reap_sum = torch.zeros(e, dtype=torch.float64)
            self.reap_count = torch.zeros(e, dtype=torch.int64)
            self.coselect = torch.zeros(e, e, dtype=torch.int64)

    _FIELDS = ("counts", "gate_sum", "norm_sum", "reap_sum", "reap_count", "coselect")
    _DTYPES = {"counts": torch.int64, "gate_sum": torch.float64, "norm_sum": torch.float64,
               "reap_sum": torch.float64, "reap_count": torch.int64, "coselect": torch.int64}
    _ref = None  # (reference gate [T, E], reference hit [T, E]) of the forward under way (not a field)

    # observer protocol (moepress.compress.moe.MoEObserver)
    def on_route(self, moe, x, logits, weights, indices) -> None:
        if self.counts.device != x.device:  # accumulate where the layer runs (CUDA has no int64 matmul)
            self.to(x.device)
        self.tokens += x.shape[0]
        # co-selection: every ordered pair of a token's top-k slots, counted with one bincount
        # (same numbers as hit.T @ hit for the one-hot hit matrix; diagonal = tokens per expert)
        idx = indices.detach().long()
        e = self.num_experts
        pairs = (idx[:, :, None] * e + idx[:, None, :]).reshape(-1)
        self.coselect += torch.bincount(pairs, minlength=e * e).view(e, e)
        self._reference_route(moe, x, logits, idx)

    def _reference_route(self, moe, x, logits, idx) -> None:
        """REAP's gate and token set (see the class docstring); experts the reference counts on tokens
        the family did not route to them are run on those tokens here, the rest in ``on_expert``.
        Without logits (a caller feeding routes only) REAP is not accumulated."""
        self._ref = None
        if logits is None:
            return
        logits = logits.detach()
        ref_idx = torch.topk(logits, self.top_k, dim=-1).indices
        g = torch.softmax(logits, dim=1, dtype=torch.float)
        if reference_renormalize(moe) and ref_idx.numel() > 0:
            g = g / torch.gather(g, 1, ref_idx).sum(dim=-1, keepdim=True)
            g = torch.clamp(g, min=torch.finfo(g.dtype).eps)
        hit = torch.zeros_like(g, dtype=torch.bool).scatter_(1, ref_idx, True)
        routed = torch.zeros_like(hit).scatter_(1, idx, True)
        self._ref = (g, hit)
        extra = torch.nonzero((hit & ~routed).t())  # (expert, token), grouped by expert, tokens ascending
        counts = torch.bincount(extra[:, 0], minlength=hit.shape[1]).tolist()  # one host sync per forward
        for e, tok in enumerate(torch.split(extra[:, 1], counts)):
            if tok.numel() == 0:
                continue
            with torch.no_grad(), side_computation():
                self._add_reap(e, g[tok, e], moe.experts[e](x[tok]))

    def _add_reap(self, e: int, g: torch.Tensor, y: torch.Tensor) -> None:
        self.reap_sum[e] += (g.double() * y.detach().double().norm(dim=-1)).sum()
        self.reap_count[e] += g.numel()

    def on_expert(self, moe, e, tokens, slots, gate, x_e, y_e) -> None:
        n = y_e.detach().double().norm(dim=-1)
        g = gate.detach().double()
        self.counts[e] += tokens.numel()
        self.gate_sum[e] += g.sum()
        self.norm_sum[e] += n.sum()
        if self._ref is not None:  # a masked sum, not a boolean index (a nonzero: one host sync per expert on CUDA)
            ref_g, hit = self._ref
            m = hit[tokens, e]
            self.reap_sum[e] += torch.where(m, ref_g[tokens, e].double() * n, 0.0).sum()  # an inf elsewhere: not NaN
            self.reap_count[e] += m.sum()

    def to(self, device) -> "LayerRouting":
        for k in self._FIELDS:
            setattr(self, k, getattr(self, k).to(device))
        return self

    # derived
    def _per_token(self, s: torch.Tensor) -> torch.Tensor:
        return torch.where(self.counts > 0, s / self.counts.clamp(min=1), torch.zeros_like(s))

    @property
    def share(self) -> torch.Tensor:
        """Fraction of routing slots each expert received (sums to 1)."""
        return self.counts.double() / max(int(self.counts.sum()), 1)

    @property
    def mean_norm(self) -> torch.Tensor:
        return self._per_token(self.norm_sum)

    @property
    def reap(self) -> torch.Tensor:
        """REAP saliency as its reference computes it: sum of gate x ||expert output||_2 over the
        tokens the reference counts, divided by their number (0 for an expert never counted)."""
        return torch.where(self.reap_count > 0, self.reap_sum / self.reap_count.clamp(min=1),
                           torch.zeros_like(self.reap_sum))

    @property
    def mean_gate(self) -> torch.Tensor:
        """Mean routing weight an expert receives when it is selected."""
        return self._per_token(self.gate_sum)

    def merge(self, other: "LayerRouting") -> None:
        if (other.num_experts, other.top_k) != (self.num_experts, self.top_k):
            raise ValueError(f"cannot merge routing of {other.num_experts} experts top-{other.top_k} into "
                             f"{self.num_experts} experts top-{self.top_k}")
        self.tokens += other.tokens
        for k in self._FIELDS:
            mine = getattr(self, k)
            mine.add_(getattr(other, k).to(mine.device))

    def to_dict(self) -> dict:
        return {"num_experts": self.num_experts, "top_k": self.top_k, "tokens": self.tokens,
                **{k: getattr(self, k).tolist() for k in self._FIELDS}}

    @classmethod
    def from_dict(cls, d: dict) -> "LayerRouting":
        out = cls(d["num_experts"], d["top_k"], d["tokens"])
        for k, dt in cls._DTYPES.items():
            setattr(out, k, torch.tensor(d[k], dtype=dt))
        return out


@dataclass
class RoutingStats:
    """Routing statistics of every MoE layer the stream has run."""

    layers: dict[int, LayerRouting] = field(default_factory=dict)

    def attach(self, i: int, layer: DecoderLayer) -> LayerRouting | None:
        moe = layer.moe
        if moe is None:
            return None
        obs = self.layers.setdefault(i, LayerRouting(moe.num_experts, moe.top_k))
        moe.observers.append(obs)
        return obs

    def ensure(self, i: int, num_experts: int, top_k: int) -> LayerRouting:
        """The layer's statistics, created empty if absent (so every rank of a run holds the same layers)."""
        return self.layers.setdefault(i, LayerRouting(num_experts, top_k))

    @staticmethod
    def detach(layer: DecoderLayer) -> None:
        if layer.moe is not None:
            layer.moe.observers = [o for o in layer.moe.observers if not isinstance(o, LayerRouting)]

    def merge(self, other: "RoutingStats") -> None:
        for i, lr in other.layers.items():
            if i in self.layers:
                self.layers[i].merge(lr)
            else:
                self.layers[i] = lr

    def to_dict(self) -> dict:
        return {str(i): lr.to_dict() for i, lr in sorted(self.layers.items())}

    @classmethod
    def from_dict(cls, d: dict) -> "RoutingStats":
        return cls({int(i): LayerRouting.from_dict(v) for i, v in d.items()})

    # exact binary form: layers.{i}.{counts,gate_sum,norm_sum,reap_sum,coselect} (+ sizes in the metadata)
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"layers.{i}.{k}": getattr(lr, k).detach().cpu().contiguous()
                for i, lr in sorted(self.layers.items()) for k in LayerRouting._FIELDS}

    def save(self, path) -> None:
        """The exact binary form, byte for byte the same for the same statistics (the project's writer:
        safetensors' own save_file orders metadata keys differently from run to run)."""
        import json

        from moepress.compress.checkpoint.safetensors_io import write_safetensors

        meta = {str(i): {"num_experts": lr.num_experts, "top_k": lr.top_k, "tokens": lr.tokens}
                for i, lr in sorted(self.layers.items())}
        write_safetensors(Path(path), self.state_dict(), {"format": "moepress-routing", "layers": json.dumps(meta)})

    @classmethod
    def load(cls, path) -> "RoutingStats":
        import json

        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = json.loads(f.metadata()["layers"])
            out = cls()
            for i, m in meta.items():
                lr = LayerRouting(m["num_experts"], m["top_k"], m["tokens"])
                for k in LayerRouting._FIELDS:
                    setattr(lr, k, f.get_tensor(f"layers.{i}.{k}"))
                out.layers[int(i)] = lr
        return out


_SIDE = threading.local()


@contextlib.contextmanager
def side_computation():
    """Forward calls an observer makes for its own statistic (REAP's reference tokens, which the family's
    router did not send to that expert): input observers must not count them as the layer's inputs."""
    prev = getattr(_SIDE, "on", False)
    _SIDE.on = True
    try:
        yield
    finally:
        _SIDE.on = prev


def in_side_computation() -> bool:
    return getattr(_SIDE, "on", False)


class InputAbsMax:
    """Per ``nn.Linear`` of a layer: running max |x| per input channel (float32), via pre-hooks.

    Keys are the linear's name inside the layer (``mlp.experts.3.down_proj``). An expert
    that received no tokens has no entry: the quantizer decides what it gets.
    """

    def __init__(self):
        self.amax: dict[str, torch.Tensor] = {}
        self._handles: list = []

    def attach(self, layer: nn.Module, include=lambda name: True) -> None:
        for name, mod in layer.named_modules():
            if isinstance(mod, nn.Linear) and include(name):
                self._handles.append(mod.register_forward_pre_hook(self._hook(name)))

    def _hook(self, name: str):
        def fn(mod, args):
            x = args[0]
            if x.numel() == 0 or in_side_computation():
                return
            a = x.detach().abs().reshape(-1, x.shape[-1]).amax(dim=0).float()
            prev = self.amax.get(name)
            self.amax[name] = a if prev is None else torch.maximum(prev, a)
        return fn

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def merge(self, other: "InputAbsMax") -> None:
        for k, v in other.amax.items():
            self.amax[k] = v if k not in self.amax else torch.maximum(self.amax[k], v.to(self.amax[k].device))

    def state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """``{prefix + linear name: amax}``, e.g. prefix ``model.layers.3.`` gives checkpoint-style names."""
        return {prefix + k: v.detach().cpu().contiguous() for k, v in sorted(self.amax.items())}

    def save(self, path, prefix: str = "") -> None:
        from safetensors.torch import save_file

        save_file(self.state_dict(prefix), str(path), metadata={"format": "moepress-input-absmax"})

    @classmethod
    def load(cls, path, prefix: str = "") -> "InputAbsMax":
        from safetensors.torch import load_file

        out = cls()
        out.amax = {k[len(prefix):]: v for k, v in load_file(str(path)).items() if k.startswith(prefix)}
        return out

