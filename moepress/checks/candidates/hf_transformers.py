"""``transformers``: any directory AutoModelForCausalLM loads (e.g. compressed-tensors)."""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import torch

from moepress.checks.candidates.base import Candidate, CandidateKind, Outputs, config_json, first_line
from moepress.checks.config import CheckConfig
from moepress.compress.arch import transformers_config
from moepress.compress.formats import fp8_block
from moepress.errors import MoepressError
from moepress.exporters.artifacts import consumer_misload, read_json
from moepress.manifest import installed_versions


class TransformersCandidate(Candidate):
    kind = "transformers"
    has_hidden = True

    def __init__(self, path: Path, cfg: CheckConfig, device: torch.device | None = None):
        from transformers import AutoModelForCausalLM

        super().__init__(path)
        self.device = str(device or "cpu")  # the check's --device, as the streamed reference beside it
        # kimi_k2 (remote code) built as DeepSeek-V3, as moepress and vLLM run it, unless its own code may run
        conf = config_json(path) or {}
        own = None if cfg.trust_remote_code else transformers_config(conf, str(path))
        kw = {"config": own} if own is not None else {}
        if _fp4_weights(conf):  # compressed-tensors 0.20 leaves FP4-decompressed weights bf16: float32 inputs fail
            from transformers import CompressedTensorsConfig

            kw["quantization_config"] = CompressedTensorsConfig(dequantize=True)
        try:
            with warnings.catch_warnings():  # "You passed `quantization_config` ...": dequantize is the point
                warnings.filterwarnings("ignore", message="You passed `quantization_config`")
                model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32,
                                                             trust_remote_code=cfg.trust_remote_code, **kw)
        except (OSError, ValueError, RuntimeError, KeyError, TypeError, ImportError) as e:
            raise MoepressError(f"{path}: transformers cannot load it as a causal LM ({first_line(e)})") from None
        except pickle.UnpicklingError:  # torch.load(weights_only=True) on a pickle holding more than tensors
            raise MoepressError(f"{path}: a pickled checkpoint holding more than tensors, which is not loaded (it "
                                "could run code); expected safetensors") from None
        self.model = model.to(self.device).eval()
        text = self.model.config.get_text_config()
        self.vocab_size = int(text.vocab_size)
        self.num_layers = int(text.num_hidden_layers)
        q = getattr(self.model.config, "quantization_config", None)
        method = q.get("quant_method") if isinstance(q, dict) else getattr(q, "quant_method", None)
        self.quantization = getattr(method, "value", method)  # transformers' QuantizationMethod is a str enum
        self.notes = consumer_notes(path) + dequantized_note(conf, self.quantization)

    def describe(self) -> dict:
        return {**super().describe(), "class": type(self.model).__name__, "device": self.device,
                "quantization": str(self.quantization) if self.quantization else None}

    def _forward(self, ids: torch.Tensor, **kw):
        try:
            return self.model(input_ids=ids.to(self.device), use_cache=False, **kw)
        except (RuntimeError, ValueError, TypeError, NotImplementedError) as e:  # the library's, on our input
            raise MoepressError(f"{self.path}: transformers cannot run it ({first_line(e)})") from None

    @torch.no_grad()
    def run(self, ids: torch.Tensor) -> Outputs:
        out = self._forward(ids, output_hidden_states=True)
        # hidden_states: the embeddings, then every decoder layer's output, the last one after
        # the final norm (transformers/models/qwen3_moe/modeling_qwen3_moe.py, Qwen3MoeModel.forward)
        hs = [h.float().cpu() for h in out.hidden_states]
        return Outputs(out.logits.float().cpu(), hs[1:], last_normed=True, embed=hs[0])

    @torch.no_grad()
    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        return self._forward(ids).logits.float().cpu()


def _fp4_weights(conf: dict) -> bool:
    """``conf`` (config.json) is a compressed-tensors checkpoint of FP4 weights (mxfp4- / nvfp4-pack-quantized):
    transformers 5.24 runs its decompressed bf16 weights against float32 activations and fails ("expected m1
    and m2 to have the same dtype"), unless loaded with ``CompressedTensorsConfig(dequantize=True)``, which the
    README tells users too.
    An activation-quantizing NVFP4 export does not get here (``refuse_misloaded``)."""
    q = conf.get("quantization_config") or {}
    return isinstance(q, dict) and q.get("quant_method") == "compressed-tensors" and "fp4" in str(q.get("format"))


def dequantized_note(conf: dict, loaded_method) -> list[str]:
    """A note where config.json declares a quantization that the loaded model no longer holds: transformers
    decoded the weights on load and runs every activation unquantized. Its finegrained-FP8 quantizer does so
    without a GPU or XPU, warning once and dropping ``quantization_config`` from the loaded config
    (quantizers/quantizer_finegrained_fp8.py ``validate_environment``, 5.25); FP4 compressed-tensors checkpoints are
    loaded so here (``_fp4_weights``). A runtime that quantizes the activations (vLLM, SGLang, transformers on a
    GPU) errs more than the figures say."""
    q = conf.get("quantization_config")
    declared = q.get("quant_method") if isinstance(q, dict) else None
    if not declared or (loaded_method and not _fp4_weights(conf)) or not _quantizes_activations(q):
        return []
    return [f"transformers dequantized its {declared} weights on load (without a GPU for FP8; FP4 compressed-tensors "
            "always): activations ran unquantized, so the error reads lower than in a runtime that quantizes them"]


def _quantizes_activations(q: dict) -> bool:
    """Does the declared scheme quantize activations: finegrained FP8 (always dynamic or static per its
    ``activation_scheme``), a compressed-tensors group with ``input_activations``; unknown methods: no."""
    if fp8_block.transformers_fp8(q):
        return True
    groups = q.get("config_groups") if q.get("quant_method") == "compressed-tensors" else None
    return isinstance(groups, dict) and any(isinstance(g, dict) and g.get("input_activations")
                                            for g in groups.values())


def _detect_transformers(path: Path) -> bool:
    cfg = config_json(path) if path.is_dir() else None
    return bool(cfg and (cfg.get("architectures") or cfg.get("model_type"))
                and (any(path.glob("*.safetensors")) or any(path.glob("*.bin"))))


def _open_transformers(path: Path, cfg: CheckConfig, device=None) -> Candidate:
    q = (config_json(path) or {}).get("quantization_config") or {}
    if isinstance(q, dict) and q.get("quant_method") == "modelopt":
        # transformers 5.24 has no "modelopt" quantizer (quantizers/auto.py): it warns and reads the
        # stored FP8 / INT4 codes as plain weights, so its logits would say nothing about the model
        raise MoepressError(f"{path}: a Model-Optimizer checkpoint (quant_method modelopt), which transformers "
                            "loads as unquantized codes; check it with --kind checkpoint")
    refuse_misloaded(path)
    refuse_ambiguous_fp8_grids(path, q)
    return TransformersCandidate(path, cfg, device)


def refuse_ambiguous_fp8_grids(path: Path, q) -> None:
    """One line for a DeepSeek-layout block-FP8 checkpoint (quant_method fp8, ``weight_scale_inv``) with a weight
    whose scale grid transformers reads with another block: it takes the block as rows // scale rows
    (integrations/finegrained_fp8.py ``Fp8Dequantize._dequantize_one``, 5.25), so a dimension over 128 that is not a
    multiple of 128 (kernel_widths.grid_ok; e.g. 160 rows, 2 scale rows, read as 80-row blocks) loads with wrong
    scales and no error. moepress's exports keep such linears bf16; a block-FP8 input or its pruned checkpoint
    (stored bytes kept) can have them."""
    import transformers

    from moepress.compress.checkpoint import CheckpointReader
    from moepress.compress.formats import fp8_block
    from moepress.exporters.ct_misloads import TRANSFORMERS_CHECKED
    from moepress.exporters.kernel_widths import grid_ok

    if not fp8_block.transformers_fp8(q) or \
            _version(transformers.__version__) > _version(TRANSFORMERS_CHECKED):
        return
    r = CheckpointReader(path)
    bad = sorted(n for n in r.names() if n + "_scale_inv" in r and not grid_ok(r.info(n).shape))
    if bad:
        raise MoepressError(f"{path}: {len(bad)} block-FP8 weights have a dimension over 128 that is not a multiple of "
                            f"128 (e.g. {bad[0]}: {list(r.info(bad[0]).shape)}), whose scale grid transformers "
                            f"{transformers.__version__} reads with the block rows // scale rows, not 128 (wrong "
                            "scales, no error); check it with --kind checkpoint")


def misloaded(path: Path) -> str | None:
    """Why the installed transformers, or the compressed-tensors it loads through, loads the export in ``path``
    wrongly or not at all (export.json ``misloaded_by``: the newest affected version; ``misloaded_why``: how), or
    None."""
    import transformers

    for key, name, version in (("transformers", "transformers", transformers.__version__),
                               ("compressed_tensors", "compressed-tensors",
                                installed_versions(["compressed-tensors"]).get("compressed-tensors"))):
        misload = consumer_misload(Path(path), key)
        if misload is not None and version is not None and _version(version) <= _version(misload[0]):
            return f"{name} {version} {misload[1]} (export.json misloaded_by: {name} <= {misload[0]})"
    return None


def consumer_notes(path: Path) -> list[str]:
    """The export's notes on how transformers runs it (export.json ``consumer_notes``), for the check's reader."""
    info = read_json(Path(path) / "export.json")
    notes = info.get("consumer_notes") if isinstance(info, dict) else None
    return [n for n in notes if isinstance(n, str) and n.startswith("transformers")] if isinstance(notes, list) else []


def refuse_misloaded(path: Path) -> None:
    """One line if this transformers loads ``path`` wrongly, instead of gating numbers of another model."""
    why = misloaded(path)
    if why:
        raise MoepressError(f"{path}: {why}; check the quantized checkpoint it was exported from, or serve it "
                            "with vLLM / SGLang")


def _version(v: str) -> tuple[int, int]:
    """(major, minor) of a version string: "5.24.0.dev0" -> (5, 24); "5.24" covers every 5.24.x."""
    major, minor = (v.split(".") + ["0", "0"])[:2]
    return int("0" + "".join(c for c in major if c.isdigit())), int("0" + "".join(c for c in minor if c.isdigit()))


KIND = CandidateKind("transformers", _open_transformers, priority=0, detect=_detect_transformers,
                     summary="a directory transformers' AutoModelForCausalLM loads (e.g. compressed-tensors)")
