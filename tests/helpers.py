"""Test helpers: small random checkpoints of each family, written the way transformers writes them."""

from __future__ import annotations

import collections
import json
import os
import shutil
import sys
import textwrap
from pathlib import Path

import torch
from safetensors.torch import save_file

import forkserver

TINY = {
    "qwen3_moe": dict(vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                      num_experts=8, num_experts_per_tok=2, norm_topk_prob=True),
    "mixtral": dict(vocab_size=256, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2),
    "deepseek_v3": dict(vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8,
                        n_group=4, topk_group=2, num_experts_per_tok=2, first_k_dense_replace=1, q_lora_rank=32,
                        kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
                        num_nextn_predict_layers=0),
}


def make_random_checkpoint(family: str, out: Path, seed: int = 0, max_shard_size: str = "100KB", **overrides) -> Path:
    import transformers as tf

    cls = {"qwen3_moe": (tf.Qwen3MoeConfig, tf.Qwen3MoeForCausalLM),
           "mixtral": (tf.MixtralConfig, tf.MixtralForCausalLM),
           "deepseek_v3": (tf.DeepseekV3Config, tf.DeepseekV3ForCausalLM)}[family]
    torch.manual_seed(seed)
    cfg = cls[0](**{**TINY[family], **overrides})
    model = cls[1](cfg)
    for m in model.modules():
        if getattr(m, "e_score_correction_bias", None) is not None:
            m.e_score_correction_bias.data = torch.randn_like(m.e_score_correction_bias) * 0.1
    model.save_pretrained(str(out), max_shard_size=max_shard_size)
    return Path(out)


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_json(path: Path, **changes) -> None:
    d = json.loads(path.read_text())
    d.update(changes)
    path.write_text(json.dumps(d))


def salient_inputs(n_batches: int = 4, tokens: int = 128, d: int = 256, seed: int = 0) -> list[torch.Tensor]:
    """Random activations [tokens, d] with 8 salient channels (x20), as real activations have and
    AWQ exploits; the quantization parity tests feed them to modelopt and to moepress alike."""
    g = torch.Generator().manual_seed(seed)
    ch = torch.ones(d)
    ch[torch.randperm(d, generator=g)[:8]] = 20.0
    return [torch.randn(tokens, d, generator=g) * ch for _ in range(n_batches)]


# A compressed-tensors checkpoint loaded by transformers in a process that never imports moepress:
# argv = checkpoint dir, ids .pt, output .pt ({"logits", "state"}).
CT_LOADER = textwrap.dedent("""
    import sys, torch
    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig
    d, ids_path, out_path = sys.argv[1:4]
    m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32,
                                             quantization_config=CompressedTensorsConfig(dequantize=True)).eval()
    with torch.no_grad():
        logits = m(input_ids=torch.load(ids_path), use_cache=False).logits
    assert not any(k.startswith("moepress") for k in sys.modules), "moepress was imported"
    torch.save({"logits": logits, "state": m.state_dict()}, out_path)
""")


# Checkpoints loaded by transformers ``from_pretrained`` (no quantization override) in a process that
# never imports moepress: argv[1] = JSON [[dir, ids .pt, out .pt], ...]; out = {"logits", "dtypes"}.
TF_LOADER = textwrap.dedent("""
    import json, sys, torch
    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM
    for d, ids_path, out_path in json.loads(sys.argv[1]):
        m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        with torch.no_grad():
            logits = m(input_ids=torch.load(ids_path), use_cache=False).logits
        torch.save({"logits": logits, "dtypes": sorted({str(p.dtype) for p in m.parameters()})}, out_path)
    assert not any(k.startswith("moepress") for k in sys.modules), "moepress was imported"
""")


def checkpoint_tensors(d: Path, pattern: str = "*.safetensors") -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint directory ``d``'s safetensors files (``pattern``), by name."""
    from safetensors import safe_open

    out = {}
    for f in sorted(Path(d).glob(pattern)):
        with safe_open(f, "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def transformers_logits(jobs: list[tuple[Path, torch.Tensor]], work: Path) -> list[dict]:
    """Each (checkpoint, ids) run by transformers in ONE subprocess without moepress (a consumer's
    process: no moepress attention function or module registered in transformers' globals)."""
    work.mkdir(parents=True, exist_ok=True)
    spec = []
    for k, (d, ids) in enumerate(jobs):
        torch.save(ids, work / f"ids{k}.pt")
        spec.append([str(d), str(work / f"ids{k}.pt"), str(work / f"out{k}.pt")])
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    p = forkserver.run([sys.executable, "-c", TF_LOADER, json.dumps(spec)], cwd=work, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return [torch.load(o) for _, _, o in spec]


# Small synthetic configs the prune tests build checkpoints from (compress/synthetic.write_synthetic).
QWEN_SMALL = dict(model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], vocab_size=256, hidden_size=64,
                  intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, num_experts=16, num_experts_per_tok=4, norm_topk_prob=True)
DSV3_SMALL = dict(model_type="deepseek_v3", architectures=["DeepseekV3ForCausalLM"], vocab_size=256, hidden_size=64,
                  intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=4, n_routed_experts=32, n_shared_experts=1, n_group=4, topk_group=2,
                  num_experts_per_tok=4, first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=16,
                  qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, routed_scaling_factor=2.5,
                  norm_topk_prob=True, num_nextn_predict_layers=0)


def trtllm_ckpt(d, source, quant_algo="FP8", world=2, ep=2, kv=None):
    """A TensorRT-LLM checkpoint (docs/source/architecture/checkpoint.md): config.json + rank{N}."""
    d.mkdir()
    cfg = {"architecture": "MixtralForCausalLM", "dtype": "bfloat16",
           "mapping": {"world_size": world, "tp_size": world, "pp_size": 1, "moe_tp_size": world // ep,
                       "moe_ep_size": ep},
           "quantization": {"quant_algo": quant_algo, "kv_cache_quant_algo": kv},
           "moe": {"num_experts": 8, "top_k": 2, "normalization_mode": 1}}
    (d / "config.json").write_text(json.dumps(cfg))
    for r in range(world):
        save_file({"transformer.ln_f.weight": torch.ones(4)}, str(d / f"rank{r}.safetensors"))
    (d / "export.json").write_text(json.dumps({"format": "trtllm-ckpt", "source": str(source)}))
    return d


def cli_quantized(out: Path, model: str, *args: str) -> Path:
    """``moepress quantize MODEL ARGS -o OUT --quiet`` in-process (a module fixture's quantize output); OUT."""
    from click.testing import CliRunner

    from moepress.cli import cli

    r = CliRunner().invoke(cli, ["quantize", model, *args, "-o", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    return out


def assert_one_line_error(r, *needles) -> str:
    """The bad-input contract of a CLI run (click's result): exit 2, no traceback, one line on stderr starting
    ``moepress: error:`` and naming each of ``needles``; returns that line."""
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moepress: error:"), r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def write_with_mtp(cfg: dict, out: Path, block_fp8: bool = True) -> Path:
    """A DeepSeek-V3 checkpoint of config ``cfg`` (num_nextn_predict_layers 1) with its MTP layer stored as
    model.layers.{num_hidden_layers} (a decoder layer, block FP8 with weight_scale_inv when the trunk is, and
    enorm, hnorm, eh_proj, embed_tokens, shared_head bf16), as DeepSeek ships layer 61. The final norm and
    enorm / hnorm are not 1 (the synthetic's), so a norm left out or swapped shows."""
    from moepress.compress.arch import get_adapter
    from moepress.compress.checkpoint import CheckpointReader, CheckpointWriter
    from moepress.compress.quant.fp8 import quantize_block
    from moepress.compress.synthetic import random_tensor, write_synthetic

    reader = CheckpointReader(write_synthetic(cfg, out.with_name(out.name + "-trunk"), block_fp8=block_fp8))
    a = get_adapter(cfg)
    n, h, v, p = a.num_layers, a.hidden_size, a.vocab_size, a.layer_prefix(a.num_layers)
    g = torch.Generator().manual_seed(7)

    def uneven(shape):
        return (0.5 + torch.rand(shape, generator=g)).bfloat16()

    with CheckpointWriter(out) as w:
        for name in reader.names():
            w.add(name, uneven(reader.get(name).shape) if name == "model.norm.weight" else reader.get(name))
        with torch.device("meta"):
            layer = a.build_layer(n)
        for key, t in layer.state_dict().items():
            x = random_tensor(p + key, tuple(t.shape), seed=7)
            if block_fp8 and key.endswith(".weight") and x.ndim == 2 and "gate.weight" not in key:
                q, s = quantize_block(x)
                w.add(p + key, q)
                w.add(p + key[: -len(".weight")] + ".weight_scale_inv", s)
            else:
                w.add(p + key, x if "e_score_correction_bias" in key else x.bfloat16())
        for key, shape in {"enorm.weight": (h,), "hnorm.weight": (h,), "eh_proj.weight": (h, 2 * h),
                           "embed_tokens.weight": (v, h), "shared_head.norm.weight": (h,),
                           "shared_head.head.weight": (v, h)}.items():
            w.add(p + key, uneven(shape) if key in ("enorm.weight", "hnorm.weight") else
                  random_tensor(p + key, shape, seed=7).bfloat16())
        w.write_json("config.json", reader.config)
    return out


def declared_for_installed_transformers(info: dict) -> bool:
    """export.json ``misloaded_by`` transformers (the newest version checked) covers the transformers installed
    here: where a test shows this transformers misloading an export, the export must say so for this version
    (a newer release, unchecked, fails such a test until its behaviour is read and the version raised)."""
    import transformers

    def minor(v: str) -> tuple[int, int]:
        major, minor_ = (v.split(".") + ["0"])[:2]
        return int(major), int("".join(c for c in minor_ if c.isdigit()) or 0)

    return minor(transformers.__version__) <= minor(info.get("misloaded_by", {}).get("transformers", "0.0"))


# A moepress command killed mid-run (killed_runs): argv[1] = "after-progress" | "after-shard" | "", then its args.
KILLED_RUN = textwrap.dedent("""
    import os, sys
    from moepress.cli import main
    from moepress.compress.checkpoint import CheckpointWriter
    from moepress.compress.quantize import report

    if sys.argv[1] == "after-progress":  # quantize: layer 1's totals saved, its shard not yet written
        save = report.QuantTotals.save
        def killing_save(self, partial):
            save(self, partial)
            if 1 in self.layers:
                os._exit(9)
        report.QuantTotals.save = killing_save
    elif sys.argv[1] == "after-shard":  # layer 1's shard written and journaled, nothing after it
        end = CheckpointWriter.end_shard
        def killing_end(self, unit=True):
            end(self, unit)
            self.wait()
            if any(".layers.1." in n for _, names, _ in self._shards for n in names):
                os._exit(9)
        CheckpointWriter.end_shard = killing_end
    sys.argv = ["moepress", *sys.argv[2:]]
    main()
""")


def killed_runs(jobs: list[dict]) -> list[int]:
    """moepress commands killed mid-run, in turn, each in a process of its own (forked from tests/forkserver.py's
    moepress server: the kill, the files and the lock it leaves are the child's alone, as for ``python -m
    moepress``). Each job: ``args`` (the command line after ``moepress``), ``log`` (the file that gets the child's
    stdout and stderr) and ``kill``: "STAGE:N" (``MOEPRESS_KILL_AT``: SIGKILL right after STAGE's step N),
    "after-progress" (quantize: os._exit(9) once layer 1's totals are saved, its shard not yet written) or
    "after-shard" (os._exit(9) once layer 1's shard is written and journaled, nothing after it). The children get
    OMP_NUM_THREADS=1. Returns their exit codes, as ``subprocess`` gives them (-9: killed by SIGKILL)."""
    codes = []
    for job in jobs:
        kill = job.get("kill", "")
        env = {**os.environ, "OMP_NUM_THREADS": "1", **({"MOEPRESS_KILL_AT": kill} if ":" in kill else {})}
        p = forkserver.run([sys.executable, "-c", KILLED_RUN, "" if ":" in kill else kill, *map(str, job["args"])],
                           env=env, text=True, timeout=600, moepress=True)
        Path(job["log"]).write_text(p.stdout + p.stderr)
        codes.append(p.returncode)
    return codes


def to_block_fp8(src, dst):
    """Write src as a DeepSeek block-FP8 checkpoint: every decoder-layer linear weight but the router."""
    from moepress.compress.checkpoint import CheckpointReader, CheckpointWriter
    from moepress.compress.quant.fp8 import quantize_block

    reader = CheckpointReader(src)
    with CheckpointWriter(dst, max_shard_bytes=200_000) as w:
        for name in reader.names():
            t = reader.get(name)
            if ".layers." in name and name.endswith(".weight") and t.ndim == 2 and ".gate.weight" not in name:
                q, s = quantize_block(t.float())
                w.add(name, q)
                w.add(name[: -len(".weight")] + ".weight_scale_inv", s)
            else:
                w.add(name, t)
        cfg = dict(reader.config)
        cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                      "weight_block_size": [128, 128]}
        w.write_json("config.json", cfg)
        w.copy_aux_files(src)


def heldout_scores(src, work: Path, method: str, folds: list[list[torch.Tensor]], **prune) -> tuple[float, float]:
    """A plan's held-out KL and NLL per token computed apart from the race: ``method`` run alone with --merge on
    each of two folds, its checkpoint's next-token distribution against the original's on the other fold
    (the two ways round pooled). ``prune``: the other PruneConfig fields (keep=, ratio=)."""
    from moepress.calib.metrics import nll_sum, token_kl
    from moepress.compress.prune import PruneConfig, prune_checkpoint
    from moepress.compress.stream import StreamedModel

    kls, nll, n = [], 0.0, 0
    for f in range(2):
        alone = work / f"{method}-{f}"
        prune_checkpoint(src, alone, PruneConfig(method=method, merge=True, **prune), batches=folds[f])
        held = folds[1 - f]
        ref, got = StreamedModel(str(src)).forward(held), StreamedModel(str(alone)).forward(held)
        kls += [token_kl(r, g) for r, g in zip(ref, got, strict=True)]
        nll += sum(nll_sum(g, b)[0] for g, b in zip(got, held, strict=True))
        n += sum(b[:, 1:].numel() for b in held)
    return float(torch.cat(kls).mean()), nll / n


class FakeAdapter:
    """The facts ``plan_budget`` reads, for a softmax top-1 router over E experts."""

    def __init__(self, E):
        self.num_experts = E

    def routing(self):
        return {"scoring": "softmax", "top_k": 1, "renormalize": True}

    def moe_layers(self):
        return [0]


def count_evidence(per: torch.Tensor, keep: int, empty: int = 0, **fields):
    """(evidence, budget, chunks) of one softmax top-1 layer from per-group routing counts ``per`` [G, E] and
    any other LayerRouting ``fields`` per group ([G][E] values; the layer's are their sums), ``empty`` more groups
    without samples after them, keeping ``keep`` experts."""
    from moepress.calib.observers import LayerRouting
    from moepress.compress.prune import PruneConfig, plan_budget
    from moepress.compress.prune.evidence import LayerEvidence

    E = per.shape[1]
    chunks = []
    for g in range(per.shape[0]):
        c = LayerRouting(E, 1, int(per[g].sum()))
        c.counts = per[g].clone()
        for k, v in fields.items():
            setattr(c, k, torch.tensor(v[g], dtype=getattr(c, k).dtype))
        chunks.append(c)
    chunks += [LayerRouting(E, 1, 0) for _ in range(empty)]
    total = LayerRouting(E, 1, int(per.sum()))
    total.counts = per.sum(0)
    for k in fields:
        setattr(total, k, sum(getattr(c, k) for c in chunks[:per.shape[0]]))
    budget = plan_budget(FakeAdapter(E), PruneConfig(keep=keep))
    return LayerEvidence(0, None, total, {"scoring": "softmax"}, None, chunks), budget, chunks


HOST_READS = ("__float__", "__int__", "__bool__", "item", "tolist", "nonzero")  # each waits for a GPU's queue


def count_host_reads(monkeypatch) -> collections.Counter:
    """Calls that read a tensor on the host (the Tensor methods above and ``torch.equal``), counted by name until
    ``monkeypatch`` undoes them: on a GPU each waits for the device's queue to drain."""
    reads = collections.Counter()
    for name in HOST_READS:
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name,
                            lambda t, *a, _n=name, _f=real, **k: reads.update([_n]) or _f(t, *a, **k))
    monkeypatch.setattr(torch, "equal", lambda *a, _f=torch.equal: reads.update(["equal"]) or _f(*a))
    return reads
