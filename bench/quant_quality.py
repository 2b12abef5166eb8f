"""Quantization quality, time and memory: moepress vs Model-Optimizer, every bundled model x format.

    python bench/quant_quality.py [--models tiny-qwen3-moe,...] [--formats fp8,...] [--num-samples 32]

For each bundled model and format, in one run, each in its own process (peak RSS from wait4):
  * ours: `moepress quantize` (streamed), then held-out perplexity of its fake-quant forward;
  * modelopt: `mtq.quantize` on the transformers model (fp32) with the matching config and the
    same calibration tokens; its perplexity straight out of mtq.quantize ("fake-quant"), as
    deployed (``as_deployed``: the numerics its exported checkpoint runs with on TensorRT-LLM) in
    its own transformers forward, and — the comparison — as deployed in moepress's forward
    (``as_moepress_checkpoint``: its quantized weights and activation scales written as a checkpoint
    that the forward ours is measured with runs), all on the same held-out windows;
  * the unquantized baseline.
Prints a Markdown table and notes; "ours <= modelopt" compares with modelopt as deployed, run by the
same forward as ours, at full precision (equal counts; fp8-dynamic gives bit-identical models).

modelopt configs: FP8_DEFAULT_CFG, FP8_2D_BLOCKWISE_WEIGHT_ONLY_CFG (its only 128x128 block FP8
config: weight-only), FP8_PER_CHANNEL_PER_TOKEN_CFG, INT4_AWQ_CFG (awq_lite), INT4_AWQ_CFG's weight
quantizer with algorithm "gptq" (modelopt 0.47 has GPTQ), and W4A8_AWQ_BETA_CFG, INT4 block size
set to ``--group-size``. Its quantizers on transformers 5's fused experts are counted (enabled
quantizers, those on experts) and it is checked whether its AWQ / GPTQ changed the fused expert
weights at all (column "algo on experts").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

MODELOPT_CFG = {"fp8": "FP8_DEFAULT_CFG", "fp8-block": "FP8_2D_BLOCKWISE_WEIGHT_ONLY_CFG",
                "fp8-dynamic": "FP8_PER_CHANNEL_PER_TOKEN_CFG", "int4-awq": "INT4_AWQ_CFG",
                "int4-gptq": "INT4_AWQ_CFG", "w4a8-awq": "W4A8_AWQ_BETA_CFG",
                "nvfp4": "NVFP4_DEFAULT_CFG", "nvfp4-a16": "W4A16_NVFP4_CFG"}
FOLD = "+fold"  # ours with --awq-fold (compress/quantize/fold.py); modelopt's side: the format without it
MODELOPT_CFG["int4-awq" + FOLD] = MODELOPT_CFG["int4-awq"]
FORMATS = list(MODELOPT_CFG)


def _eval(model_name, seq_len=256, windows=32):
    from moepress.calib.data import eval_batches
    from moepress.models import resolve

    return eval_batches(resolve(model_name), seq_len=seq_len, max_windows=windows)


# What the runtimes' FP8 MoE loaders do with per-expert static input scales; applied to BOTH sides'
# checkpoints before they are evaluated (runtime_expert_input_scales):
#  * fp8 (per-tensor, static): one input scale per layer and projection, the max over experts (and over
#    w1/w3): vLLM vllm/model_executor/layers/quantization/fp8.py Fp8MoEMethod.process_weights_after_loading
#    ("Using the maximum across experts for each layer", commit 0071b24b), TensorRT-LLM
#    tensorrt_llm/_torch/modules/fused_moe/quantization.py load_activation_scales_fp8_qdq
#    (tmp_fc31_input_scale.max(), tmp_fc2_input_scale.max(), commit 002366a4);
#  * w4a8-awq: TensorRT-LLM's WInt4AFP8FusedMoEMethod.load_quant_scales (same file) keeps a Model-Optimizer
#    checkpoint's input scale per expert, max(w1, w3) for fc31 (all_w3_w1_input_scales_greater); vLLM's
#    Model-Optimizer loader has no W4A8 AWQ.
# * nvfp4: one per layer and projection, the max over experts: TensorRT-LLM quantization.py NVFP4FusedMoEMethod
#   (load_expert_fc31_input_scale_nvfp4 into tmp_fc31_input_scale, then its max).
EXPERT_INPUT_SCALES = {"fp8": "layer", "w4a8-awq": "expert", "nvfp4": "layer"}


def runtime_expert_input_scales(ckpt: Path, fmt: str) -> int:
    """Rewrite the routed experts' ``input_scale`` tensors of checkpoint ``ckpt`` as the runtime loads
    them (EXPERT_INPUT_SCALES); returns how many changed."""
    import re

    from safetensors.torch import load_file, save_file

    how = EXPERT_INPUT_SCALES.get(fmt)
    if how is None:
        return 0
    pat = re.compile(r"^(.*\.experts\.)(\d+)\.(gate_proj|up_proj|w1|w3|down_proj|w2)\.input_scale$")
    files = {f: load_file(f) for f in sorted(ckpt.glob("*.safetensors"))}
    groups: dict[tuple, list[tuple[Path, str]]] = {}
    for f, ts in files.items():
        for n in ts:
            m = pat.match(n)
            if m:
                proj = "down" if m.group(3) in ("down_proj", "w2") else "gate_up"
                key = (m.group(1), proj) if how == "layer" else (m.group(1), m.group(2), proj)
                groups.setdefault(key, []).append((f, n))
    changed, dirty = 0, set()
    for members in groups.values():
        top = torch.stack([files[f][n].float().reshape(()) for f, n in members]).max()
        for f, n in members:
            if not torch.equal(files[f][n].float().reshape(()), top):
                files[f][n] = top.to(files[f][n].dtype).reshape(files[f][n].shape)
                changed += 1
                dirty.add(f)
    for f in dirty:
        save_file(files[f], str(f), metadata={"format": "pt"})
    return changed


def _apply_settings(sets: str) -> None:
    """``--set NAME=VALUE,...``: override constants of moepress.compress.quantize.config in this worker
    (the bench's way to measure alternatives of a default without a CLI option)."""
    import ast

    from moepress.compress.quantize import config as qconfig

    for item in filter(None, sets.split(",")):
        k, _, v = item.partition("=")
        if k.startswith("cfg."):  # a QuantConfig field (_ours)
            continue
        if not hasattr(qconfig, k):
            raise SystemExit(f"--set {k}: no such constant in moepress.compress.quantize.config")
        setattr(qconfig, k, ast.literal_eval(v))


def worker(args) -> dict:
    """One side (baseline / ours / modelopt) on one model and calibration seed, every format of
    ``args.format`` (comma-separated) in turn; {format: result}."""
    torch.set_num_threads(1)
    from moepress.calib.metrics import perplexity
    from moepress.compress.stream import StreamedModel
    from moepress.models import resolve

    _apply_settings(args.set or "")
    src = resolve(args.model)
    ev = _eval(args.model)
    if args.side == "baseline":
        return {"none": {"ppl": perplexity(StreamedModel(str(src)).forward(ev), ev), "seconds": 0.0}}
    out = {}
    for fmt in args.format.split(","):
        with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
            one = _ours if args.side == "ours" else _modelopt
            try:
                out[fmt] = one(args, fmt if one is _ours else fmt.removesuffix(FOLD), src, ev, Path(tmp))
            except Exception as e:  # one format failing must not lose the others
                out[fmt] = {"error": f"{type(e).__name__}: {e}"[:160]}
    return out


def _ours(args, fmt: str, src: Path, ev, tmp: Path) -> dict:
    import ast

    from moepress.calib.data import calibration_batches
    from moepress.calib.metrics import perplexity
    from moepress.compress.quantize import QuantConfig, quantize_checkpoint
    from moepress.compress.stream import StreamedModel

    t0 = time.monotonic()
    out = tmp / "q"
    fold, fmt = fmt.endswith(FOLD), fmt.removesuffix(FOLD)
    fields = {k[4:]: ast.literal_eval(v) for k, _, v in (i.partition("=") for i in (args.set or "").split(","))
              if k.startswith("cfg.")}  # --set cfg.FIELD=VALUE: a QuantConfig field
    cfg = QuantConfig(format=fmt, num_samples=args.num_samples, seq_len=args.seq_len, group_size=args.group_size,
                      seed=args.seed, awq_fold=fold, **fields)
    batches = calibration_batches(src, (), args.num_samples, args.seq_len, args.seed, 8)
    quantize_checkpoint(src, out, cfg, batches=batches, force=True)
    secs = time.monotonic() - t0
    changed = runtime_expert_input_scales(out, fmt)
    return {"ppl": perplexity(StreamedModel(str(out)).forward(ev), ev), "seconds": secs,
            "runtime_scales_changed": changed, "rss_mb": _rss()}


def _rss() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _modelopt(args, fmt: str, src: Path, ev, tmp: Path) -> dict:
    import copy
    import warnings

    warnings.simplefilter("ignore")
    import modelopt.torch.quantization as mtq
    from transformers import AutoModelForCausalLM

    from moepress.calib.data import calibration_batches
    from moepress.calib.metrics import perplexity
    from moepress.compress.stream import StreamedModel

    t0 = time.monotonic()
    batches = calibration_batches(src, (), args.num_samples, args.seq_len, args.seed, 8)
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    cfg = copy.deepcopy(getattr(mtq, MODELOPT_CFG[fmt]))
    if fmt == "int4-gptq":  # modelopt/torch/quantization/config.py GPTQCalibConfig defaults
        cfg["algorithm"] = {"method": "gptq", "perc_damp": 0.01, "block_size": 128}
    for entry in cfg["quant_cfg"]:  # INT4 group size (first quantizer of W4A8's sequential pair)
        c = entry.get("cfg")
        c = c[0] if isinstance(c, list) else c
        if entry.get("quantizer_name") == "*weight_quantizer" and c and c.get("num_bits") == 4:
            c["block_sizes"][-1] = args.group_size
    experts_before = {n: p.detach().clone() for n, p in model.named_parameters() if ".experts." in n}

    def loop(m):
        for b in batches:
            m(input_ids=b, use_cache=False)

    with torch.no_grad():
        mtq.quantize(model, cfg, loop)
    secs = time.monotonic() - t0
    from modelopt.torch.quantization.nn import TensorQuantizer

    enabled = [n for n, m in model.named_modules() if isinstance(m, TensorQuantizer) and m.is_enabled]
    n_q, n_exp = len(enabled), sum(1 for n in enabled if ".experts." in n)
    # did the algorithm (AWQ smoothing folded into the weight, GPTQ updates) touch the experts?
    touched = sum(1 for n, p in model.named_parameters()
                  if n in experts_before and not torch.equal(p, experts_before[n]))
    from moepress.compress.quantize import FORMATS as QF

    # modelopt 0.47's NVFP4 fake quant runs on CUDA only (tensor_quant.py: "amax must be a CUDA tensor"): on
    # CPU its own forwards are skipped and its weights come from its export numerics (as_moepress_checkpoint)
    own = not (QF[fmt].element == "fp4" and not torch.cuda.is_available())
    with torch.no_grad():
        fake = perplexity([model(input_ids=b, use_cache=False).logits.float() for b in ev], ev) if own else None
        fused = as_deployed(model, fmt)
        logits = [model(input_ids=b, use_cache=False).logits.float() for b in ev] if own else None
        rss = _rss()  # modelopt's peak, before the bench's copy
        same = tmp / "modelopt-in-moepress"
        n_mod = as_moepress_checkpoint(model, src, fmt, same)
        changed = runtime_expert_input_scales(same, fmt)
        ppl_same = perplexity(StreamedModel(str(same)).forward(ev), ev)
    return {**({"ppl": perplexity(logits, ev), "ppl_fake_quant": fake} if own else {}),
            "ppl_same_forward": ppl_same, "modules_same_forward": n_mod, "rss_mb": rss,
            "fused_groups": fused, "seconds": secs, "runtime_scales_changed": changed,
            "quantizers": n_q, "expert_quantizers": n_exp, "experts_touched": f"{touched}/{len(experts_before)}"}


@torch.no_grad()
def as_moepress_checkpoint(model, src: Path, fmt: str, out: Path) -> int:
    """Write modelopt's quantized model (after :func:`as_deployed`) as a checkpoint that moepress's
    streamed forward runs, so that both sides are evaluated by the same code: the same float32 ops
    in the same order, so float summation order cannot flip an FP8 rounding on one side only (on
    tiny-deepseek-v3 fp8 that alone moves perplexity by ~0.02% either way). Returns the number of
    quantized linears.

    Each quantized weight is replaced by its fake-quantized value (what its quantizer returns: the
    dequantized weight its exporter writes; for W4A8 the INT4 step only, q * scale, which is what
    moepress's forward decodes for ours too), transformers' ``save_pretrained``
    writes the checkpoint's own tensor names (per-expert names for the fused experts), and the
    activation side goes into moepress's layout: ``pre_quant_scale`` (AWQ) and ``input_scale`` (static
    FP8: its calibrated amax / 448) per linear, and the sidecar's per-module format (dynamic per-token
    / 1x128 activations for fp8-dynamic / fp8-block, as in ``as_deployed``).
    """
    from modelopt.torch.quantization.nn import SequentialQuantizer, TensorQuantizer
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from moepress.compress.quantize import FORMATS, SIDECAR

    def weight_fq(q, w):
        q = q[0] if isinstance(q, SequentialQuantizer) else q
        if q.is_enabled and FORMATS[fmt].element == "fp4":  # NVFP4: its exporter's numerics (CPU), not q(w)
            from modelopt.torch.quantization.qtensor import NVFP4QTensor

            s2 = NVFP4QTensor.get_weights_scaling_factor_2_from_quantizer(q) if q.amax is not None else None
            qt, s, s2 = NVFP4QTensor.quantize(w, 16, weights_scaling_factor_2=s2)
            return qt.dequantize(dtype=torch.float32, scale=s, double_scale=s2, block_sizes={-1: 16})
        return q(w) if q.is_enabled else None

    def activation(iq):
        pqs = getattr(iq, "_pre_quant_scale", None)
        pqs = pqs.detach().float().reshape(-1).clone() if pqs is not None else None
        isc = None
        if FORMATS[fmt].static_input and iq.is_enabled and iq.amax is not None:
            isc = FORMATS[fmt].input_scale(iq.amax.detach().float().amax()).reshape(())  # FP8: amax / 448
        return pqs, isc

    fresh = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
    params = dict(fresh.named_parameters())
    linears: list[tuple] = []  # (weight view in `fresh`, pre_quant_scale, input_scale) per quantized linear
    for name, mod in model.named_modules():
        wq = getattr(mod, "weight_quantizer", None)
        if isinstance(wq, (TensorQuantizer, SequentialQuantizer)) and hasattr(mod, "weight"):
            w = weight_fq(wq, mod.weight)
            if w is not None:
                params[name + ".weight"].copy_(w)
                linears.append((params[name + ".weight"], *activation(mod.input_quantizer)))
        for p in ("gate_up_proj", "down_proj"):  # transformers 5 fused experts [E, out, in]
            qs = getattr(mod, p + "_weight_quantizers", None)
            if qs is None:
                continue
            act = activation(getattr(mod, p + "_input_quantizer"))
            for e, q in enumerate(qs):
                w = weight_fq(q, getattr(mod, p)[e])
                if w is not None:
                    params[f"{name}.{p}"][e].copy_(w)
                    linears.append((params[f"{name}.{p}"][e], *act))
    tmp = out.with_name(out.name + ".hf")
    fresh.save_pretrained(tmp)
    tensors = {}
    for f in sorted(tmp.glob("*.safetensors")):
        tensors.update(load_file(f))
    # The checkpoint's names of each quantized linear, as transformers writes them (Mixtral: the fused
    # gate_up_proj of model.layers.N.mlp is split into block_sparse_moe.experts.E.w1 / w3): save once
    # more with every weight set to 0 and linear k's to k + 1, and read which tensors hold k + 1.
    for t in params.values():
        t.zero_()
    for k, (w, _, _) in enumerate(linears):
        w.fill_(k + 1)
    tags = tmp.with_name(tmp.name + ".tags")
    fresh.save_pretrained(tags)
    names: dict[int, list[str]] = {}
    for f in sorted(tags.glob("*.safetensors")):
        for n, t in load_file(f).items():
            v = int(t.flatten()[0]) if n.endswith(".weight") and t.numel() else 0
            if v and bool((t == v).all()):
                names.setdefault(v - 1, []).append(n[: -len(".weight")])
    modules, extra = {}, {}
    for k, (_, pqs, isc) in enumerate(linears):
        for n in names[k]:  # gate_up: the gate and the up linear
            modules[n] = {"format": fmt}
            if pqs is not None:
                extra[n + ".pre_quant_scale"] = pqs.clone()
            if isc is not None:
                extra[n + ".input_scale"] = isc.clone()
    out.mkdir(parents=True)
    save_file({**tensors, **extra}, str(out / "model.safetensors"))
    (out / "config.json").write_text((tmp / "config.json").read_text())
    (out / SIDECAR).write_text(json.dumps({"format": fmt, "modules": modules, "shared": [], "borrowed": []}))
    return len(modules)


def as_deployed(model, fmt: str) -> int:
    """Give modelopt's quantized model the numerics its exported checkpoint runs with on TensorRT-LLM,
    the numerics ours is evaluated with; returns the number of fused linear groups.

    1. Linears that TensorRT-LLM fuses into one GEMM (q/k/v, DeepSeek's q_a/kv_a, gate/up: the groups
       moepress shares scales over, compress/quantize.py SHARED_INPUT) get one set of scales.
       modelopt's fake-quant keeps a scale per projection; its own export step does the unification
       (modelopt/torch/export/quant_utils.py ``preprocess_linear_fusion``: max input amax, max per-tensor
       weight amax, averaged AWQ pre_quant_scale with the weights requantized), and TensorRT-LLM's
       loader takes the max again (_torch/modules/linear.py ``rescale_fused_weights``). We call
       modelopt's function on those groups.
    2. FP8 per-tensor / per-channel weights as modelopt's exporter writes them (export/quant_utils.py
       ``to_quantized_weight``: (w / (amax / 448)).to(float8_e4m3fn)); its fake-quant kernel
       multiplies by 448 / amax instead, which rounds some exact ties (common with bf16 weights) the
       other way, so its fake-quant model is not bit-for-bit its own checkpoint.
    3. Activations of calibration-free formats as the kernels quantize them: fp8-block dynamic per
       1x128 (FP8_BLOCK_SCALES; modelopt's only 128x128 config is weight-only) and fp8-dynamic per token
       (FP8_PER_CHANNEL_PER_TOKEN; modelopt's dynamic input quantizer, axis (0, 1), is per token on
       [batch, seq, hidden] inputs but per element on the fused experts' [tokens, hidden] inputs,
       i.e. it leaves them unquantized). The input quantizers of the quantized linears (fused experts
       included) apply moepress's fp8.fake_quant_per_token instead; weights stay modelopt's.
    """
    from modelopt.torch.export.quant_utils import preprocess_linear_fusion
    from modelopt.torch.quantization.nn import TensorQuantizer

    from moepress.compress.quant import fp8
    from moepress.compress.quantize import SHARED_INPUT

    n = 0
    # (block-FP8 weights are not unified: a fused GEMM keeps each block's scale. modelopt's 2D-block fake
    # quantizer holds a scalar amax that preprocess_linear_fusion would take for a per-tensor one.)
    for mod in model.modules() if fmt != "fp8-block" else ():
        for fam in SHARED_INPUT:
            group = [c for name, c in mod.named_children() if name in fam and hasattr(c, "weight_quantizer")
                     and c.weight_quantizer.is_enabled]
            if len(group) > 1:
                preprocess_linear_fusion(group)
                n += 1
    if fmt in ("fp8", "fp8-dynamic"):  # weights as its exporter writes them (see the docstring)
        for name, q in model.named_modules():  # fused experts: ...experts.gate_up_proj_weight_quantizers.3
            if (isinstance(q, TensorQuantizer) and "weight_quantizer" in name and q.is_enabled
                    and q.num_bits == (4, 3) and not q.block_sizes and q.amax is not None):
                q.forward = lambda w, q=q: fp8.fake_quant(w, fp8.scale_from_amax(q.amax))  # w / s -> e4m3 -> * s
    if fmt in ("fp8-block", "fp8-dynamic"):
        block = 128 if fmt == "fp8-block" else None
        for mod in model.modules():
            for name, q in list(mod.named_children()):
                if not (isinstance(q, TensorQuantizer) and name.endswith("input_quantizer")):
                    continue
                w = getattr(mod, name.replace("input_quantizer", "weight_quantizer"), None)
                w = w if w is not None else getattr(mod, name.replace("input_quantizer", "weight_quantizers"), None)
                w = w[0] if isinstance(w, torch.nn.ModuleList) else w
                if w is not None and w.is_enabled:
                    q.forward = lambda x, block=block: fp8.fake_quant_per_token(x, block)
    return n


def run_one(side, model, fmt, a, seed: int = 0, sets: str = "") -> dict:
    """One worker process: ``side`` on ``model`` and calibration ``seed`` for the formats ``fmt``
    (comma-separated; None for the baseline); {format: result}."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, __file__, "--worker", side, "--model", model, "--format", fmt or "none",
               "--num-samples", str(a.num_samples), "--seq-len", str(a.seq_len), "--group-size",
               str(a.group_size), "--seed", str(seed), "--set", sets, "--tmp", tmp]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        p = subprocess.run(cmd, env=env, capture_output=True, text=True)
        try:
            return json.loads(p.stdout.strip().splitlines()[-1])  # rss_mb: the worker's own peak (ru_maxrss)
        except (ValueError, IndexError):
            err = {"error": (p.stderr.strip().splitlines() or ["?"])[-1][:120]}
            return {f: err for f in (fmt or "none").split(",")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="tiny-qwen3-moe,tiny-mixtral,tiny-deepseek-v3")
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--num-samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--group-size", type=int, default=128, help="INT4 group (ours and modelopt's block size)")
    ap.add_argument("--worker", default=None)
    ap.add_argument("--model", default=None)
    ap.add_argument("--format", default=None)
    ap.add_argument("--seed", type=int, default=0, help="calibration seed (both sides)")
    ap.add_argument("--seeds", default=None, help="calibration seeds, comma-separated (overrides --seed)")
    ap.add_argument("--json", default=None, help="also write every cell's results to this file")
    ap.add_argument("--set", default="", help="worker: NAME=VALUE,... constants of moepress.compress.quantize.config")
    ap.add_argument("--tmp", default=None)
    a = ap.parse_args(argv)
    if a.worker:
        a.side = a.worker
        res = worker(a)
        for r in res.values():
            r.setdefault("rss_mb", _rss())
        print(json.dumps(res))
        return 0
    print(f"# quant quality: {a.num_samples} calibration samples x {a.seq_len} tokens (bundled calib text); "
          f"held-out perplexity on 32 windows x 256 tokens of calib/data/eval.txt; {os.cpu_count()} CPUs, "
          f"1 thread per run")
    print("| model | format | ppl ours | ppl modelopt (same forward) | ours - modelopt | Δ ours | Δ modelopt | "
          "modelopt as deployed, "
          "its forward | modelopt fake-quant ppl | s ours | s modelopt | peak RSS MB ours | peak RSS MB modelopt | "
          "modelopt quantizers: enabled / on experts | modelopt algo changed expert weights |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    wins = {"ppl": 0, "ppl_own": 0, "rss": 0, "n": 0, "n_own": 0}
    seeds = [int(s) for s in a.seeds.split(",")] if a.seeds else [a.seed]
    cells = []
    for model, seed, fmt in ((m, s, f) for m in a.models.split(",") for s in [None, *seeds]
                             for f in (a.formats.split(",") if s is not None else [None])):
        if seed is None:  # the baseline needs no calibration
            base = run_one("baseline", model, None, a, a.seed)["none"]
            print(f"| {model} | bf16 (baseline) | {base.get('ppl', float('nan')):.3f} | | | | | | | | | "
                  f"{base.get('rss_mb', 0):.0f} | | | |", flush=True)
            continue
        label = model if len(seeds) == 1 else f"{model} (seed {seed})"
        ours = run_one("ours", model, fmt, a, seed, a.set)[fmt]
        ref = (run_one("modelopt", model, fmt, a, seed)[fmt] if MODELOPT_CFG.get(fmt)
               else {"error": "no modelopt config"})
        cells.append({"model": model, "seed": seed, "format": fmt, "baseline": base, "ours": ours, "modelopt": ref})

        def f(d, k, spec):
            return format(d[k], spec) if k in d else d.get("error", "-")

        def rel(d, k="ppl", base=base):
            return f"{(d[k] / base['ppl'] - 1) * 100:+.2f}%" if k in d and "ppl" in base else "-"

        if "ppl" in ours and "ppl_same_forward" in ref:
            wins["n"] += 1
            wins["ppl"] += ours["ppl"] <= ref["ppl_same_forward"]
            wins["ppl_own"] += "ppl" in ref and round(ours["ppl"], 3) <= round(ref["ppl"], 3)
            wins["n_own"] += "ppl" in ref  # none for NVFP4 / MXFP4 on CPU (its fake quant is CUDA-only)
            wins["rss"] += ours["rss_mb"] < ref["rss_mb"]
        algo = ref.get("experts_touched", "-") if fmt in ("int4-awq", "int4-gptq", "w4a8-awq") else "n/a"
        diff = "-"
        if "ppl" in ours and "ppl_same_forward" in ref:
            d = ours["ppl"] - ref["ppl_same_forward"]
            diff = "0 (equal)" if d == 0 else f"{d:+.5f}"
        print(f"| {label} | {fmt} | {f(ours, 'ppl', '.3f')} | {f(ref, 'ppl_same_forward', '.3f')} | {diff} | "
              f"{rel(ours)} | {rel(ref, 'ppl_same_forward')} | {f(ref, 'ppl', '.3f')} | "
              f"{f(ref, 'ppl_fake_quant', '.3f')} | "
              f"{f(ours, 'seconds', '.1f')} | {f(ref, 'seconds', '.1f')} | "
              f"{f(ours, 'rss_mb', '.0f')} | {f(ref, 'rss_mb', '.0f')} | {ref.get('quantizers', '-')} / "
              f"{ref.get('expert_quantizers', '-')} | {algo} |", flush=True)
    print(f"\nours <= modelopt (same forward, full precision) in perplexity in {wins['ppl']}/{wins['n']} cells "
          f"(against modelopt as deployed in its own forward, at the table's 3 decimals: "
          f"{wins['ppl_own']}/{wins['n_own']}); "
          f"lower peak RSS in {wins['rss']}/{wins['n']}.")
    print("Notes: peak RSS is each run's own ru_maxrss (one process per cell, including the held-out "
          "evaluation); modelopt's includes the whole fp32 model, ours one streamed layer. Times are wall "
          "seconds on a shared machine (noisy); ours = calibration + streamed quantize + write, modelopt = "
          "load + mtq.quantize. 'Same forward' (the comparison): modelopt's result as deployed (below), written as a "
          "checkpoint that moepress's streamed forward evaluates (as_moepress_checkpoint), so both sides run the "
          "same code. 'As deployed': modelopt's result with its own export step "
          "for fused linears (preprocess_linear_fusion on q/k/v, q_a/kv_a, gate/up: shared scales, as "
          "TensorRT-LLM loads them), FP8 per-tensor / per-channel weights as its exporter rounds them, and, for "
          "fp8-block / fp8-dynamic, the kernels' dynamic activations (1x128 / per token: its fp8-block config "
          "is weight-only, and its per-token input quantizer, axis (0, 1), keeps one scale per element on the "
          "fused experts' 2-D inputs); 'fake-quant' is its model straight out of mtq.quantize. With "
          "transformers 5's fused experts modelopt attaches one weight quantizer per expert (gate_up fused) and "
          "one input quantizer per projection, but its AWQ / GPTQ only run on nn.Linear modules: the experts "
          "column shows whether they changed any fused expert weight (0/N: the experts are plain "
          "round-to-nearest INT4 in modelopt's result).")
    if a.json:
        Path(a.json).write_text(json.dumps(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
