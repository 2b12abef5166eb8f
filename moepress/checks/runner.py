"""Run a check: the reference streamed layer by layer, the candidate beside it, metrics, gates.

A streamed candidate advances in lockstep with the reference: read reference layer i, run it on every
batch, free it; read candidate layer i, run it, compare the two outputs, free it. The next layer is read in
the background while one runs, so memory is about two layers plus the activations of both models, whatever
the models' sizes. A whole candidate (transformers, ONNX, engine) runs in its own runtime; the reference
keeps each layer's output (activations only) until the candidate's are compared at the end.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F

from moepress.calib.data import DEFAULT_EVAL, calibration_set, eval_batches, load_tokenizer, split_rows
from moepress.calib.metrics import LayerStats, LogitStats
from moepress.checks.candidates import Candidate, open_candidate
from moepress.checks.candidates.checkpoint import native_block_fp8, runtime_activations, unstreamed_activations
from moepress.checks.config import (
    PROMPT_TOKENS,
    CheckConfig,
    check_passed,
    evaluate_gates,
    refuse_unmeasurable,
    refuse_unmeasured,
    windowed,
)
from moepress.checks.consistency import refuse_other_config, refuse_other_family
from moepress.checks.lineage import calibrated_on, made_from_another, quantized_twice
from moepress.checks.local import BlockErrors, BlockProbe
from moepress.checks.routing import Agreement, RouteCapture
from moepress.checks.rows import UNPEERED, layer_metrics, unpeered_notes
from moepress.checks.weights import candidate_formats
from moepress.compress.moe import first_non_finite
from moepress.compress.stream import StreamedModel
from moepress.errors import MoepressError
from moepress.exporters.artifacts import misloading_consumers


def eval_data(ref_dir: Path, cfg: CheckConfig) -> tuple[list[torch.Tensor], dict]:
    """Token batches [B, seq_len] from the held-out data, tokenized with the reference's tokenizer.

    A text file gives consecutive windows (the first ``max_samples``); any other source
    ``calib.data`` reads (JSONL, Parquet, a dataset folder, a token file, hf:NAME) gives
    ``max_samples`` samples drawn with ``seed``.
    """
    src = cfg.data
    if windowed(src):
        path = Path(src) if src else DEFAULT_EVAL
        rows = torch.cat(eval_batches(ref_dir, path, cfg.seq_len, cfg.max_samples, cfg.trust_remote_code))
        info = {"source": str(path), "windows": "consecutive"}
    else:
        try:
            cs = calibration_set(ref_dir, (src,), _at_most(src, cfg.max_samples), cfg.seq_len, cfg.seed,
                                 cfg.trust_remote_code)
        except MoepressError as e:  # calibration's refusals name its options: check's are --data and --max-samples
            msg = str(e).replace("--num-samples", "--max-samples")
            raise MoepressError(re.sub(r"--calib(?![\w-])", "--data", msg)) from None
        rows = cs.input_ids
        tokens = [x for x in cs.meta.get("sources", []) if isinstance(x, dict) and x.get("type") == "tokens"]
        # a token file gives its first samples (calib/data.py: _prepared_samples): no seed draws them
        how = f"the token file's first {rows.shape[0]}" if tokens else f"sampled (seed {cfg.seed})"
        info = {"source": src, "windows": how}
    batches = split_rows(rows, cfg.batch_size)
    return batches, {**info, "samples": int(rows.shape[0]), "seq_len": cfg.seq_len, "tokens": int(rows.numel())}


def _at_most(src: str, n: int) -> int:
    """--max-samples for ``src``: a token file gives at most the samples it holds (its sidecar's num_samples), as a
    text file gives at most its windows; any other source is sampled ``n`` times."""
    from moepress.calib.sources import parse_sources, sidecar_path

    spec = parse_sources((src,))[0]
    if spec.type != "tokens":
        return n
    try:
        held = json.loads(sidecar_path(spec.path).read_text()).get("num_samples")
    except (OSError, ValueError, AttributeError):
        return n  # calibration_set refuses the file in one line
    return min(n, held) if isinstance(held, int) and held > 0 else n


class _Lockstep:
    """Reads layer states in the order the loop runs them, one ahead, in a background thread."""

    def __init__(self, order: list[tuple[object, int]]):
        self.order = order
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moepress-check")

    def __iter__(self):
        try:
            nxt = self.pool.submit(self.order[0][0].read_layer_state, self.order[0][1]) if self.order else None
            for k, (sm, i) in enumerate(self.order):
                state = nxt.result()
                after = self.order[k + 1] if k + 1 < len(self.order) else None
                # a stream's read and build share its kept-as-stored weights: its next layer is read once this one
                # is built (only the other stream's is read beside the build)
                nxt = self.pool.submit(after[0].read_layer_state, after[1]) if after and after[0] is not sm else None
                layer = sm.build_layer(i, state)
                if nxt is None and after is not None:
                    nxt = self.pool.submit(sm.read_layer_state, after[1])
                del state
                yield sm, i, layer
                del layer
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)


@torch.no_grad()
def _streamed(ref, cand: Candidate, batches, layers: list[LayerStats] | None, logit_stats: LogitStats, task,
              routing: dict[int, Agreement], blocks: dict[int, BlockErrors], weigh: bool = True):
    """The candidate streamed beside the reference; per layer (``layers`` given: the same layer count) its hidden
    states, its blocks on the reference's inputs (``blocks``) and its routing and experts (``routing``); its
    weights too where ``weigh`` (checks/weights.py)."""
    cs = cand.stream
    hr, hc = ref.embed(batches), cs.embed(batches)
    embed = LayerStats()
    for a, b in zip(hr, hc, strict=True):
        embed.add(a, b)
    n = max(ref.num_layers, cs.num_layers)
    order = [(m, i) for i in range(n) for m in (ref, cs) if i < m.num_layers]
    capture = probe = None
    for sm, i, layer in _Lockstep(order):
        if sm is ref:
            _refuse_non_finite(ref, i, layer)
            moe = layer.moe
            fmts, ffn = candidate_formats(cs, i) if weigh else None, f"{ref.adapter.ffn_attr}."
            probe = BlockProbe(ref, layer, hr, fmts, f"{ffn}experts.") if layers is not None else None  # before hooks
            alike = cs.adapter.num_experts == ref.adapter.num_experts  # else no expert is compared
            capture = RouteCapture(moe, batches[0].shape[1], fmts if alike else None, ffn,
                                   _norm(layer)) if moe is not None else None
            hr = ref.run_layer(layer, hr)
            del layer, moe  # freed before the next one is built: one layer runs, the next is being read
            continue
        moe = layer.moe
        if capture is not None and moe is not None and (got := capture.overlap(moe, _norm(layer))) is not None:
            routing[i] = got
        if probe is not None:
            blocks[i] = probe.compare(cs, layer)
        capture = probe = None
        hc = cs.run_layer(layer, hc)
        del layer, moe
        if layers is not None:
            for a, b in zip(hr, hc, strict=True):
                layers[i].add(a, b)
        if task is not None:
            note = f"rel. error {layers[i].summary()['rel_error']:.3g}" if layers is not None else ""
            task.advance(note=note)
    (nr, wr), (nc, wc) = ref.head_weights(), cs.head_weights()
    for ids, a, b in zip(batches, hr, hc, strict=True):
        for r in range(ids.shape[0]):  # one sequence's [S, V] logits at a time, not the batch's
            logit_stats.add(F.linear(nr(a[r:r + 1]), wr), F.linear(nc(b[r:r + 1]), wc), ids[r:r + 1])
    return embed


def _norm(layer) -> torch.Tensor | None:
    """The weight of the layer's norm before its feed-forward block (RouteCapture: an AWQ fold rescales it)."""
    return getattr(getattr(layer, "post_attention_layernorm", None), "weight", None)


def _refuse_non_finite(ref, i: int, layer) -> None:
    """A reference weight holding NaN / Inf makes every figure NaN, which would read as the candidate's failure."""
    if (bad := first_non_finite(layer)) is not None:
        raise MoepressError(f"{ref.ckpt.path}: reference {ref.adapter.layer_prefix(i)}{bad[0]}: {bad[1]} values are "
                            "not finite (NaN or Inf) as decoded; expected finite weights")


@torch.no_grad()
def _whole(ref, cand: Candidate, batches, layers: list[LayerStats] | None, logit_stats: LogitStats, task):
    hr = ref.embed(batches)
    emb_ref = hr if cand.has_hidden else None
    kept: list[list[torch.Tensor]] = []
    for i, layer in ref.layers():
        _refuse_non_finite(ref, i, layer)
        hr = ref.run_layer(layer, hr)
        del layer  # not held while the next layer is built
        if layers is not None:
            kept.append(hr)  # activations only: one [B, S, H] per batch and layer
        if task is not None:
            task.advance(note="reference")
    norm, w = ref.head_weights()
    embed = LayerStats()
    for b, ids in enumerate(batches):
        out = cand.run(ids)
        if out.logits.shape[-1] != w.shape[0]:
            raise MoepressError(f"{cand.path}: candidate logits have {out.logits.shape[-1]} entries per token, "
                                f"the reference vocabulary has {w.shape[0]}")
        logit_stats.add(F.linear(norm(hr[b]), w), out.logits, ids)
        if layers is not None and out.hidden is not None:
            if len(out.hidden) != len(kept):
                raise MoepressError(f"{cand.path}: the candidate returned {len(out.hidden)} hidden states, "
                                    f"expected one per decoder layer ({len(kept)})")
            for i, h in enumerate(out.hidden):
                r = kept[i][b]
                if out.last_normed and i == len(out.hidden) - 1:
                    r = norm(r)
                layers[i].add(r, h)
            if out.embed is not None and emb_ref is not None:
                embed.add(emb_ref[b], out.embed)
    return embed if embed.cos else None


@torch.no_grad()
def _greedy(fn, prompts: torch.Tensor, n: int) -> torch.Tensor:
    """n new tokens per prompt, greedy, recomputing the whole prefix each step (no KV cache)."""
    ids = prompts
    for _ in range(n):
        nxt = fn(ids)[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt.to(ids.dtype)], dim=1)
    return ids[:, prompts.shape[1]:]


def generations(ref, cand: Candidate, batches, ref_dir: Path, cfg: CheckConfig) -> dict:
    """Greedy continuations of ``cfg.generate`` prompts (the start of evaluation windows), side by side.

    Each new token streams every layer of a streamed model once: cheap for small models,
    a full read of the checkpoint per token for large ones.
    """
    if cand.fixed_seq is not None:
        return {"skipped": f"the candidate accepts sequences of {cand.fixed_seq} tokens only"}
    rows = torch.cat(batches)
    k = min(cfg.generate, rows.shape[0])
    pick = torch.linspace(0, rows.shape[0] - 1, k).round().long()
    prompts = rows[pick, : min(PROMPT_TOKENS, rows.shape[1])]
    r = _greedy(lambda ids: ref.forward([ids])[0], prompts, cfg.gen_tokens)
    c = _greedy(cand.logits, prompts, cfg.gen_tokens)
    tok = load_tokenizer(ref_dir, cfg.trust_remote_code)
    out = []
    for p, a, b in zip(prompts, r, c, strict=True):
        same = int((a == b).int().cumprod(0).sum())
        out.append({"prompt": tok.decode(p), "reference": tok.decode(a), "candidate": tok.decode(b),
                    "same_prefix_tokens": same, "new_tokens": cfg.gen_tokens})
    return {"samples": out, "mean_same_prefix": sum(s["same_prefix_tokens"] for s in out) / max(len(out), 1)}


@contextlib.contextmanager
def libraries_silent(silent: bool):
    """With ``silent`` (--quiet, --json): what a candidate's library prints while it loads (transformers'
    load report and progress bars, compressed-tensors' tqdm bars) is not written to stderr, so that
    --json stays one JSON object per line. moepress's own progress keeps the stream it was made with."""
    if not silent:
        yield
        return
    from transformers.utils import logging as tf_logging

    level, bars = tf_logging.get_verbosity(), tf_logging.is_progress_bar_enabled()
    tf_logging.set_verbosity_error()
    tf_logging.disable_progress_bar()
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        tf_logging.set_verbosity(level)
        if bars:
            tf_logging.enable_progress_bar()


def _data_notes(candidate: Path, ref_dir: Path, data: dict, batches: list[torch.Tensor],
                trust_remote_code: bool) -> list[str]:
    """What the reader of the figures must know about the data: a stage upstream of the candidate was
    calibrated on it (in-sample figures; also ``data["calibrated_on_by"]``), the candidate was made from another
    model than the reference (its manifests say which; ``data["made_from"]``), the candidate's tokenizer
    file is not the reference's (the data was tokenized with the reference's). A candidate tokenizer that
    encodes the data's text to other ids is refused: its consumers tokenize with it, so figures measured on
    the reference's ids would pass a model they feed other ids."""
    notes = []
    fitted = calibrated_on(candidate, data["source"])
    if fitted:
        data["calibrated_on_by"] = fitted
        notes.append(f"the check's data {data['source']} is the calibration data of {', '.join(fitted)}: "
                     "measured on text the candidate was fitted to, it reads better than held-out text would")
    if (root := made_from_another(candidate, ref_dir)) is not None:  # recorded, sealed: publish refuses it
        data["made_from"] = str(root)
        notes.append(f"{candidate} was made from {root} (its moepress-manifest.json inputs.model), not from the "
                     f"reference {ref_dir}: the figures compare two models")
    if bad := misloading_consumers(candidate if candidate.is_dir() else candidate.parent):
        # the check reads the files as moepress does; those runtimes would not run this model
        notes.append(f"its export.json says {', '.join(f'{c} <= {v}' for c, v in sorted(bad.items()))} load it "
                     "wrongly or not at all (misloaded_why says how): these figures are moepress's reading of its "
                     "files, not theirs")
    tok_r, tok_c = ref_dir / "tokenizer.json", candidate / "tokenizer.json"
    if tok_c.is_file() and tok_r.is_file() and tok_c.read_bytes() != tok_r.read_bytes():
        _refuse_other_ids(candidate, ref_dir, batches, trust_remote_code)
        notes.append("the candidate's tokenizer.json differs from the reference's; "
                     "the data was tokenized with the reference's")
    return notes


def _refuse_other_ids(candidate: Path, ref_dir: Path, batches: list[torch.Tensor], trust_remote_code: bool) -> None:
    """The data's first sample as text (the reference's decoding) encoded by both tokenizers: other ids, refused."""
    tok_r = load_tokenizer(ref_dir, trust_remote_code)
    text = tok_r.decode(batches[0][0])
    ids = [tok(text, add_special_tokens=False)["input_ids"]
           for tok in (tok_r, load_tokenizer(candidate, trust_remote_code))]
    if ids[0] != ids[1]:
        k = next((j for j, (a, b) in enumerate(zip(*ids, strict=False)) if a != b), min(map(len, ids)))
        raise MoepressError(f"{candidate / 'tokenizer.json'}: encodes the check's text to other token ids than the "
                            f"reference's (from token {k}); its consumers tokenize with it: expected the reference's "
                            "tokenizer, or a reference with this one")


def run_check(candidate: str | Path, reference: str | Path, cfg: CheckConfig, progress=None, device=None) -> dict:
    """Compare ``candidate`` with the ``reference`` checkpoint; returns the result (metrics, gates, ...).
    The streamed models run on ``device`` (None: the CPU)."""
    with libraries_silent(progress is None or progress.mode != "human"):
        return _run_check(candidate, reference, cfg, progress, device)


def _open_reference(candidate, reference, cfg: CheckConfig, device) -> StreamedModel:
    """The reference, streamed as its runtimes run it; one line where it is missing, is the candidate itself, or
    carries activation scales the streamed reference would not apply."""
    ref_dir = Path(reference)
    if not ref_dir.exists():
        raise MoepressError(f"--reference {reference}: reference checkpoint not found")
    if not (ref_dir / "config.json").is_file():
        raise MoepressError(f"--reference {reference}: not a checkpoint directory (no config.json)")
    if cfg.kind in ("auto", "checkpoint") and Path(candidate).resolve() == ref_dir.resolve():
        raise MoepressError(f"{candidate}: the candidate is the reference (--reference {reference}); the check "
                            "would compare the model with itself and pass")
    un = unstreamed_activations(ref_dir)  # streamed weights-only, it is not the model its consumers run
    if un is not None:
        raise MoepressError(f"--reference {reference}: {un.why}, which the streamed reference does not apply (it "
                            "streams the weights only); expected the checkpoint it was made from, or the `moepress "
                            "quantize` output it was exported from")
    # weights kept as stored (bf16, FP8, packed INT4), decoded at each call: the same forward at a half to an
    # eighth of a float32 layer (a Kimi K2 MoE layer: ~17 GB stored in FP8, ~68 GB in float32)
    return runtime_activations(StreamedModel(str(ref_dir), device=device, keep_stored=True))


def _comparable(candidate, ref, cand, cfg: CheckConfig, notes: list[str]) -> bool:
    """Whether the candidate's layers compare with the reference's one by one; a note where they do not, refused
    where the gates need what cannot be measured."""
    comparable = cand.has_hidden and cand.num_layers == ref.num_layers
    if cand.has_hidden and not comparable:
        notes.append(f"per-layer comparison off: the candidate has {cand.num_layers} layers, "
                     f"the reference {ref.num_layers}")
    elif not cand.has_hidden:
        notes.append(f"per-layer comparison off: a {cand.kind} candidate gives logits only")
    if not comparable:
        refuse_unmeasurable(cfg, "layers", notes[-1])
    if not (cand.streamed and comparable):
        refuse_unmeasurable(cfg, "blocks", "the attention and weight gates need a streamed candidate with the "
                            f"reference's {ref.num_layers} layers")
    if not (cand.streamed and cand.stream.adapter.num_experts == ref.adapter.num_experts):
        refuse_unmeasurable(cfg, "routing", "the routing and expert gates need a streamed candidate with the "
                            f"reference's {ref.adapter.num_experts} experts per layer")
    if cand.streamed and cand.stream.adapter.hidden_size != ref.adapter.hidden_size:
        raise MoepressError(f"{candidate}: hidden size {cand.stream.adapter.hidden_size}, the reference has "
                            f"{ref.adapter.hidden_size}")
    return comparable


def _run_check(candidate: str | Path, reference: str | Path, cfg: CheckConfig, progress, device) -> dict:
    t0 = time.monotonic()
    ref_dir = Path(reference)
    cfg.refuse_long_generations(ref_dir)
    ref = _open_reference(candidate, reference, cfg, device)
    own = refuse_other_family(Path(candidate), reference, ref.adapter)  # its config's adapter
    cand = open_candidate(candidate, cfg, device)
    try:
        if cand.vocab_size is not None and cand.vocab_size != ref.adapter.vocab_size:
            raise MoepressError(f"{candidate}: vocabulary of {cand.vocab_size} tokens, the reference "
                                f"{reference} has {ref.adapter.vocab_size}")
        refuse_other_config(Path(candidate), reference, ref.adapter, own)
        batches, data = eval_data(ref_dir, cfg)
        notes = _data_notes(Path(candidate), ref_dir, data, batches, cfg.trust_remote_code) + cand.notes
        if cfg.max_samples and data.get("samples", cfg.max_samples) < cfg.max_samples:  # the text ran out
            notes.append(f"{data['source']} holds {data['samples']} windows of {cfg.seq_len} tokens, fewer than "
                         f"--max-samples {cfg.max_samples}: all of them were evaluated")
        native = [who for who, sm in (("the reference", ref), ("the candidate", getattr(cand, "stream", None)))
                  if sm is not None and native_block_fp8(sm)]
        if native:
            notes.append(f"{' and '.join(native)}: DeepSeek-layout block FP8, run with its runtimes' FP8 activations "
                         "(per token in 1x128 groups)")
        comparable = _comparable(candidate, ref, cand, cfg, notes)
        layers = [LayerStats() for _ in range(ref.num_layers)] if comparable else None
        logit_stats, routing, blocks = LogitStats(), {}, {}
        total = max(ref.num_layers, cand.num_layers or 0) if cand.streamed else ref.num_layers

        def run(task):
            if cand.streamed:
                # made from another model, or rounded twice (its manifests say so): other weights, not compared
                weigh = "made_from" not in data and not quantized_twice(candidate, ref_dir)
                return _streamed(ref, cand, batches, layers, logit_stats, task, routing, blocks, weigh)
            return _whole(ref, cand, batches, layers, logit_stats, task)

        if progress is not None:
            with progress.task("check", total) as task:
                embed = run(task)
        else:
            embed = run(None)
        metrics = logit_stats.summary()
        per_layer, jump = layer_metrics(layers, embed, routing, blocks, metrics)
        refuse_unmeasured(cfg, metrics, UNPEERED)
        notes += unpeered_notes(per_layer)
        renumbered = [i for i, a in routing.items() if a.renumbered]
        if renumbered:
            notes.append(f"the candidate's router rows are the reference's renumbered at layer(s) "
                         f"{', '.join(map(str, renumbered))}: each expert compared with the one its row stands for "
                         "(experts moved with their rows match; rows moved alone show in the expert error)")
        gates = evaluate_gates(cfg, metrics)
        gen = generations(ref, cand, batches, ref_dir, cfg) if cfg.generate else None
        failed = [g["metric"] for g in gates if g["passed"] is False]
        return {"passed": check_passed(gates), "failed": failed, "candidate": cand.describe(),
                "reference": str(ref_dir), "data": data, "metrics": metrics,
                "embedding": embed.summary() if embed is not None else None, "layers": per_layer,
                "error_jump": jump, "gates": gates, "generations": gen, "notes": notes,
                "config": cfg.to_dict(), "seconds": round(time.monotonic() - t0, 3)}
    finally:
        cand.close()

