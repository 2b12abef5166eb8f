"""``trtllm-pytorch``: a deployment bundle for TensorRT-LLM's PyTorch backend (its only path for
DeepSeek-V3 / Kimi K2) from an ``hf-modelopt`` or ``hf-fp8-block`` export (referenced, not copied); a
released DeepSeek-V3 / Kimi K2 block-FP8 checkpoint is one of the latter.

The bundle: ``extra_llm_api_options.yaml`` (LLM API arguments, tensorrt_llm/llmapi/llm_args.py:
``kv_cache_config{dtype, free_gpu_memory_fraction}``, ``enable_attention_dp``); ``serve.sh`` with
``trtllm-serve MODEL --backend pytorch --tp_size --ep_size --max_batch_size --max_num_tokens
--max_seq_len --kv_cache_free_gpu_memory_fraction --extra_llm_api_options``
(tensorrt_llm/commands/serve.py at NVIDIA/TensorRT-LLM 00209af1: ``--tp_size`` =
tensor_parallel_size, ``--ep_size`` = moe_expert_parallel_size, ``--extra_llm_api_options`` alias
``--config``); ``smoke.py``, a generation through ``tensorrt_llm.LLM`` with the planned
parallelism, which build.sh runs. serve.sh starts a server and does not return, so a real build
runs the smoke generation only: it shows the checkpoint loads and generates.

Remote code: serve.sh carries ``--trust_remote_code`` and smoke.py ``trust_remote_code=True``
only when the build was given ``--trust-remote-code`` (recipes: ``build.trust_remote_code``).
Without it, :func:`remote_code` decides whether TensorRT-LLM can load the export natively:

- the config: TensorRT-LLM's ``load_pretrained_config`` (tensorrt_llm/_torch/pyexecutor/
  config_utils.py, NVIDIA/TensorRT-LLM 00679c66) reads ``kimi_k2`` / ``deepseek_v32`` with its own
  ``DeepseekV3Config`` (``_CONFIG_REGISTRY``) and every other model type with
  ``transformers.AutoConfig.from_pretrained(trust_remote_code=...)``, which uses transformers' own
  class for a model type it knows (``deepseek_v3``, ``qwen3_moe``, ``mixtral``) even when
  ``auto_map`` names remote code (transformers/dynamic_module_utils.py ``resolve_trust_remote_code``:
  local code is used unless remote code is trusted);
- the model: the class registered for ``architectures[0]`` (``register_auto_model`` in
  tensorrt_llm/_torch/models/modeling_deepseekv3.py, modeling_qwen3_moe.py, modeling_mixtral.py);
- the tokenizer: ``AutoTokenizer`` (trust_remote_code as given) uses transformers' class named by
  tokenizer_config.json ``tokenizer_class`` when transformers has it; one it lacks behind an
  ``auto_map`` (Kimi K2's ``TikTokenTokenizer``) is the checkpoint's own code.

So an ``auto_map`` in config.json of a Kimi K2, DeepSeek-V3, Qwen3-MoE or Mixtral export builds
without remote code; any other model type or architecture behind an ``auto_map`` (and a tokenizer
only its own code provides) is refused without ``--trust-remote-code``.
"""

from __future__ import annotations

import json
from pathlib import Path

from moepress.calib.tokenizer import native_tokenizer
from moepress.exporters import kv_cache
from moepress.exporters.builders.base import Builder, Context, script

# config.json model types TensorRT-LLM's PyTorch backend reads with a config class of its own or of
# transformers, and the architectures it has a model class for (see the module docstring)
NATIVE_MODEL_TYPES = ("deepseek_v3", "kimi_k2", "deepseek_v32", "qwen3_moe", "mixtral")
NATIVE_ARCHITECTURES = ("DeepseekV3ForCausalLM", "DeepseekV32ForCausalLM", "Qwen3MoeForCausalLM",
                        "MixtralForCausalLM")


def commands(ctx: Context) -> list[list[str]]:
    p = ctx.plan
    cmd = ["trtllm-serve", str(ctx.artifact), "--backend", "pytorch", "--tp_size", str(p.tp),
           "--ep_size", str(p.ep), "--max_batch_size", str(p.max_batch), "--max_num_tokens", str(p.max_num_tokens),
           "--max_seq_len", str(p.max_seq_len), "--kv_cache_free_gpu_memory_fraction", "0.9",
           "--extra_llm_api_options", str(ctx.out / "extra_llm_api_options.yaml"), "--host", "0.0.0.0",
           "--port", "8000"]
    if ctx.cfg.trust_remote_code:
        cmd.append("--trust_remote_code")
    if p.nodes > 1:
        # multi-node: one MPI rank per GPU, TensorRT-LLM's launcher (docs: trtllm-serve multi-node)
        cmd = ["mpirun", "-np", str(p.gpus), "--npernode", str(p.gpus // p.nodes), "trtllm-llmapi-launch"] + cmd
    return [cmd]


def _kv_dtype(kv: str) -> str:
    """KvCacheConfig.dtype: auto (the model's) | fp8 | nvfp4."""
    return "auto" if kv == kv_cache.DEFAULT else kv


def llm_api_options(ctx: Context) -> str:
    """extra_llm_api_options YAML (tensorrt_llm/llmapi/llm_args.py field names)."""
    p = ctx.plan
    lines = [
        "# TensorRT-LLM LLM API arguments (tensorrt_llm/llmapi/llm_args.py), written by moepress build",
        f"# plan: {p.gpus} x {ctx.target.gpu}, tp {p.tp}, ep {p.ep}, format {p.format}",
        f"tensor_parallel_size: {p.tp}",
        f"moe_expert_parallel_size: {p.ep}",
        "kv_cache_config:",
        f"  dtype: {_kv_dtype(p.kv_cache_dtype)}",
        "  free_gpu_memory_fraction: 0.9",
        "enable_attention_dp: false",
    ]
    return "\n".join(lines) + "\n"


SMOKE = """\
import json, sys
from tensorrt_llm import LLM, SamplingParams
from tensorrt_llm.llmapi import KvCacheConfig
llm = LLM(model=sys.argv[1], tensor_parallel_size={tp}, moe_expert_parallel_size={ep},
          max_batch_size={b}, max_seq_len={s}, kv_cache_config=KvCacheConfig(dtype="{kv}"){trc})
out = llm.generate(["The capital of France is"], SamplingParams(max_tokens=16, temperature=0.0))
print(json.dumps({{"prompt": "The capital of France is", "text": out[0].outputs[0].text}}))
"""


def smoke_script(ctx: Context) -> str:
    p = ctx.plan
    return SMOKE.format(tp=p.tp, ep=p.ep, b=p.max_batch, s=p.max_seq_len, kv=_kv_dtype(p.kv_cache_dtype),
                        trc=", trust_remote_code=True" if ctx.cfg.trust_remote_code else "")


def files(ctx: Context, cmds: list[list[str]]) -> tuple[dict[str, str], list[list[str]]]:
    """The bundle; build.sh (and a real build) runs the smoke generation, serve.sh the server."""
    smoke = ["python", str(ctx.out.resolve() / "smoke.py"), str(ctx.artifact)]
    if ctx.plan.nodes > 1:
        smoke = cmds[0][:cmds[0].index("trtllm-llmapi-launch") + 1] + smoke
    return {"extra_llm_api_options.yaml": llm_api_options(ctx), "smoke.py": smoke_script(ctx),
            "serve.sh": script(cmds), "build.sh": script([smoke])}, cmds + [smoke]


def remote_code(directory: Path, config: dict) -> str | None:
    """Why TensorRT-LLM cannot load the export in ``directory`` without its own Python code (None: it can)."""
    arch = (config.get("architectures") or [None])[0]
    if config.get("auto_map") and (config.get("model_type") not in NATIVE_MODEL_TYPES
                                   or arch not in NATIVE_ARCHITECTURES):
        return (f"{directory / 'config.json'}: auto_map names the checkpoint's own code and TensorRT-LLM has no "
                f"native support for model_type {config.get('model_type')!r} ({arch})")
    tok_path = directory / "tokenizer_config.json"
    try:
        tok = json.loads(tok_path.read_text()) if tok_path.is_file() else {}
    except (OSError, ValueError):
        tok = {}  # not this check's to report: the tokenizer load says what is wrong with it
    auto = tok.get("auto_map") if isinstance(tok, dict) else None
    if isinstance(auto, dict) and auto.get("AutoTokenizer") and not native_tokenizer(tok.get("tokenizer_class")):
        return (f"{tok_path}: auto_map names the checkpoint's own tokenizer code ({tok.get('tokenizer_class')}, "
                f"which transformers does not provide)")
    return None


def finish(logs: list[dict]) -> dict:
    """The smoke generation's output (its last stdout line, JSON) as the build's record."""
    last = (logs[-1]["stdout_tail"].strip().splitlines() or ["{}"])[-1] if logs else "{}"
    return {"smoke": json.loads(last) if last.startswith("{") else {"output": last},
            "accuracy": {"skipped": "no check candidate kind runs the TensorRT-LLM PyTorch runtime yet; "
                                    "the smoke generation shows it loads and generates"}}


BUILDER = Builder(
    "trtllm-pytorch", "hf-modelopt", commands, requires=("tensorrt_llm",), also=("hf-fp8-block",),
    install="tensorrt_llm is not installed: pip install moepress[trtllm] on a GPU machine",
    description="TensorRT-LLM PyTorch-backend bundle for an hf-modelopt or hf-fp8-block export (trtllm-serve)",
    files=files, written=("serve.sh", "extra_llm_api_options.yaml", "smoke.py"), server="trtllm-serve",
    finish=finish, remote_code=remote_code, consumer="tensorrt_llm",
)
