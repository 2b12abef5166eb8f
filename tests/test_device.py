"""--device: one code path on every device (moepress/device.py, compress/stream.py Uploader).

On the CPU (CI): ``--device cpu`` writes the bytes the default path writes, for every format the
quantize stage produces; an unavailable or malformed device is a one-line error (exit 2); every
computing stage's ``--json`` result reports the host RSS and GPU memory peaks; the upload pipeline
(read ahead, copy, hand over) keeps order and stops cleanly on a device that is not the CPU.

Marked ``gpu`` (skipped without CUDA): the GPU quantize of each bundled model against the CPU one
(calibration-free formats byte-identical, calibrated ones within 0.2% held-out perplexity), the GPU
memory bound of a streamed layer, and the overlap of I/O and compute (the GPU's idle fraction).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moepress import models
from moepress.compress import formats
from moepress.device import MemoryPeaks, Uploader, idle_fraction, resolve
from moepress.errors import MoepressError

CALIB = ("--num-samples", "2", "--seq-len", "24")
HAS_CUDA = torch.cuda.is_available()


def digests(out: Path) -> dict[str, str]:
    """sha256 of every file the stage wrote (its manifest's list)."""
    return {f: v["sha256"] for f, v in json.loads((out / "moepress-manifest.json").read_text())["files"].items()}


def quantize(cli_run, model: str, fmt: str, out: Path, *device: str) -> dict:
    calib = CALIB if formats.FORMATS[fmt].calibrated else ()  # a calibration-free format refuses them
    r = cli_run("quantize", model, "--format", fmt, "-o", out, "--force", "--json", "-q", *calib, *device)
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout.strip().splitlines()[-1])


# ---- CPU: the device path is the default path ----------------------------------------------------

@pytest.mark.parametrize("fmt", list(formats.produced()))
def test_device_cpu_writes_the_default_bytes(cli_run, tmp_path, fmt):
    """Every produced format: ``--device cpu`` and no --device option (auto = the CPU here) write
    identical files, and the Python API without a device (the path before --device existed) too."""
    from moepress.calib.config import CalibConfig
    from moepress.compress.quantize import QuantConfig, quantize_checkpoint

    model = "tiny-qwen3-moe"
    quantize(cli_run, model, fmt, tmp_path / "cpu", "--device", "cpu")
    cal = CalibConfig.from_flags((), 2, 24, 0, False)
    cfg = QuantConfig.from_flags(format=fmt, rules=(), group_size=None, kv_cache=None, sequential=None, calib=cal,
                                 gptq_act_order=None, awq_clip=True, awq_gptq=True)
    src = models.path(model)
    quantize_checkpoint(src, tmp_path / "api", cfg, batches=cal.loader(src))
    assert digests(tmp_path / "cpu") == digests(tmp_path / "api")


@pytest.mark.skipif(HAS_CUDA, reason="checks the message for a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_unavailable_cuda_is_one_line_exit_2(cli_run, tmp_path, device):
    r = cli_run("quantize", "tiny-qwen3-moe", "--format", "fp8-block", "-o", tmp_path / "o", "--device", device)
    assert r.exit_code == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"moepress: error: --device {device}: "), r.stderr
    assert "use --device cpu" in lines[0]
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("spec", ["gpu", "cpu:0", "cuda:x", ""])
def test_malformed_device_is_refused(spec):
    with pytest.raises(MoepressError, match=r"--device .*expected auto\|cpu\|cuda\|cuda:N"):
        resolve(spec)


def test_an_empty_device_is_refused_by_run_too(cli_run, tmp_path):
    """`run --device ''` fell back to the recipe's device (every other stage refuses it); the line quotes it."""
    r = cli_run("run", "--device", "", "-o", tmp_path / "o")
    assert r.exit_code == 2 and r.stderr.strip() == "moepress: error: --device '': expected auto|cpu|cuda|cuda:N"
    assert not (tmp_path / "o").exists()


def test_a_numbered_gpu_under_torchrun_is_refused(monkeypatch):
    """Every rank computed on cuda:N while its NCCL group was on cuda:LOCAL_RANK."""
    import moepress.device as device

    monkeypatch.setattr(device, "cuda_count", lambda: 4)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(MoepressError, match=r"--device cuda:2: under torchrun each rank computes on its own GPU"):
        resolve("cuda:2")
    assert resolve("cuda") == torch.device("cuda", 1)


def test_auto_is_the_cpu_without_cuda():
    assert resolve("auto") == (torch.device("cuda", 0) if HAS_CUDA else torch.device("cpu"))
    assert resolve(None) == resolve("auto")
    assert resolve("CPU") == torch.device("cpu")


def test_bare_cuda_under_torchrun_is_the_ranks_own_gpu(monkeypatch):
    """As ``auto``: the NCCL group runs on cuda:LOCAL_RANK (every rank on cuda:0 would not match it)."""
    import moepress.device as device

    monkeypatch.setattr(device, "cuda_count", lambda: 4)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert resolve("cuda") == torch.device("cuda", 3) and resolve("cuda:1") == torch.device("cuda", 1)
    monkeypatch.delenv("LOCAL_RANK")
    assert resolve("cuda") == torch.device("cuda", 0)


def test_code_run_under_a_default_device_keeps_its_tables_and_reads_on_the_host():
    """What a stage computes under ``torch.device(cuda)`` (the meta device stands in here, where a CPU
    tensor beside a device tensor fails the same way): FP4 lookup tables follow their input, and the
    reader's buffers stay host memory (it turned them into numpy arrays: a CUDA buffer raised)."""
    from moepress.compress.checkpoint import CheckpointReader
    from moepress.compress.formats import gptoss_mxfp4
    from moepress.compress.quant import fp4

    x = torch.empty(4, 32, device="meta")
    assert fp4.cast_e2m1(x).device.type == "meta"
    assert fp4.e2m1_values(torch.empty(4, 32, dtype=torch.uint8, device="meta")).device.type == "meta"
    blocks = torch.empty(2, 3, 4, 16, dtype=torch.uint8, device="meta")
    assert gptoss_mxfp4.dequantize(blocks, torch.empty(2, 3, 4, dtype=torch.uint8, device="meta")).device.type == "meta"
    r = CheckpointReader(models.path("tiny-mixtral"))
    name = r.layer_names(0)[0]
    with torch.device("meta"):
        t = r.get(name)
    assert t.device.type == "cpu" and torch.equal(t, r.get(name))


def _memory(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])["memory"]


@pytest.mark.parametrize("stage", ["quantize", "prune", "calib", "check", "export", "build", "prepare"])
def test_every_stage_reports_memory(cli_run, tmp_path, stage):
    model = str(models.path("tiny-qwen3-moe"))
    out = tmp_path / "o"
    if stage in ("export", "build", "prepare"):  # no --device: export and prepare run on the CPU, build's
        onnx = tmp_path / "onnx"                 # check on the GPU where there is one
        if stage == "build":
            assert cli_run("export", model, "--format", "onnx", "-o", onnx, "--quiet").exit_code == 0
        args = {"export": ("export", model, "--format", "onnx", "-o", out),
                "build": ("build", onnx, "--target", "h100-sxm", "--dry-run", "-o", out),
                "prepare": ("calib", "prepare", model, "-o", tmp_path / "t.safetensors", *CALIB)}[stage]
        r = cli_run(*args, "--json")
        assert r.exit_code == 0, r.output
        assert 50 << 20 < _memory(r.stdout)["host_rss_peak_bytes"] < 16 << 30
        assert json.loads(r.stdout.strip().splitlines()[-1])["output"] == str(args[args.index("-o") + 1])
        return
    args = {
        "quantize": ("quantize", model, "--format", "fp8-block", "-o", out),
        "prune": ("prune", model, "--method", "frequency", "--ratio", "0.25", "-o", out, *CALIB),
        "calib": ("calib", "stats", model, "-o", out, *CALIB),
        "check": ("check", shutil.copytree(model, tmp_path / "same"), "--reference", model, "--max-samples", "2",
                  "--seq-len", "16"),
    }[stage]
    r = cli_run(*args, "--json", "--device", "cpu")
    assert r.exit_code == 0, r.output
    mem = _memory(r.stdout)
    assert mem["device"] == "cpu" and mem["gpu_peak_bytes"] is None
    assert 50 << 20 < mem["host_rss_peak_bytes"] < 16 << 30  # a Python process with torch, not absurd


def test_recipe_device_is_a_runtime_choice():
    """A recipe's ``device`` is kept as written (resolved when run); a non-string is refused; without
    one, the effective recipe has no ``device`` key (its dump, run.yaml, is unchanged)."""
    from moepress.pipeline.recipe import normalise

    assert normalise({"model": "tiny-qwen3-moe", "device": "cpu"})["device"] == "cpu"
    assert "device" not in normalise({"model": "tiny-qwen3-moe"})
    with pytest.raises(MoepressError, match="recipe: device: expected auto, cpu, cuda or cuda:N"):
        normalise({"model": "tiny-qwen3-moe", "device": 0})


def test_host_peak_sees_a_brief_allocation():
    """The high-water mark catches 256 MB touched and freed between samples."""
    with MemoryPeaks(None) as m:
        x = torch.ones(64 << 20)  # 256 MB, touched
        del x
    with MemoryPeaks(None) as quiet:
        pass
    assert m.report()["host_rss_peak_bytes"] >= quiet.report()["host_rss_peak_bytes"] + (200 << 20)


def test_nested_peaks_each_see_their_whole_block():
    """A run's stages each reset the kernel's one high-water mark: the run's own peak must still include a
    stage's 256 MB (before, it saw only what came after the last stage started)."""
    with MemoryPeaks(None) as quiet:
        pass
    with MemoryPeaks(None) as run:
        with MemoryPeaks(None) as first:
            x = torch.ones(64 << 20)  # 256 MB, touched
            del x
        with MemoryPeaks(None):
            pass
    base = quiet.report()["host_rss_peak_bytes"]
    assert first.report()["host_rss_peak_bytes"] >= base + (200 << 20)
    assert run.report()["host_rss_peak_bytes"] >= first.report()["host_rss_peak_bytes"]


# ---- the upload pipeline on a device that is not the CPU -----------------------------------------

def _layers(n: int, log: list):
    for i in range(n):
        log.append(i)
        yield i, [{"w": torch.full((4,), float(i))}]


def test_uploader_keeps_order_and_reads_one_ahead():
    """On a non-CPU device (``meta`` here: same thread pipeline as CUDA, no copies) each item is
    uploaded in the background, in order, and at most one item ahead of the consumer."""
    up, log = Uploader(torch.device("meta")), []
    seen = []
    for i, box in up.ahead(_layers(4, log)):
        assert box[0]["w"].device.type == "meta"
        assert log[-1] <= i + 1  # read at most one layer ahead
        seen.append(i)
    assert seen == [0, 1, 2, 3]
    assert [w for w, *_ in up.timings].count("upload") == 4
    assert idle_fraction(up.timings, 1.0) is not None


def test_uploader_stops_with_its_consumer():
    up, log = Uploader(torch.device("meta")), []
    it = up.ahead(_layers(10, log))
    next(it)
    it.close()
    assert len(log) <= 3  # the item in use, the one read ahead, and nothing more


@pytest.mark.parametrize("name", models.BUNDLED)
def test_stream_keeps_every_tensor_on_its_device(name):
    """The device path on a device that is not the CPU (``meta``: shapes, no values): the embedding,
    each layer's stored bytes uploaded and decoded there, the attention, norms and router all run
    there, up to the experts' dispatch, the first op that needs values. A host tensor mixed in on
    the way raises 'Tensor on device cpu is not on the expected device meta' instead."""
    from moepress.compress.stream import StreamedModel

    sm = StreamedModel(str(models.path(name)), device="meta")
    with pytest.raises(NotImplementedError, match="bincount.*Meta"):  # compress/moe.py expert_rows
        sm.forward([torch.randint(0, 100, (1, 8))])
    assert [w for w, *_ in sm.uploader.timings].count("upload") >= 2  # the embedding, then layer 0 ahead


def test_uploader_on_cpu_is_the_identity():
    up = Uploader(torch.device("cpu"))
    t = {"w": torch.ones(3)}
    assert up.upload(t) is t
    assert up.timings == []


# ---- GPU (skipped without CUDA) ---------------------------------------------------------------------

gpu = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
FREE = [f for f, spec in formats.produced().items() if not spec.calibrated]
CALIBRATED = [f for f, spec in formats.produced().items() if spec.calibrated]


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("fmt", FREE)
def test_gpu_calibration_free_is_byte_identical(cli_run, tmp_path, bundled, fmt):
    quantize(cli_run, str(bundled), fmt, tmp_path / "cpu", "--device", "cpu")
    res = quantize(cli_run, str(bundled), fmt, tmp_path / "gpu", "--device", "cuda")
    assert res["memory"]["gpu_peak_bytes"] > 0
    assert digests(tmp_path / "gpu") == digests(tmp_path / "cpu")


def _held_out_ppl(path: Path) -> float:
    from moepress.calib.data import eval_batches
    from moepress.calib.metrics import perplexity
    from moepress.compress.stream import StreamedModel

    # 32 windows: on 8, attention's MATH kernel alone (what tests/test_vcuda.py's emulated device runs; its
    # last-bit differences move GPTQ roundings) moved w4a8-awq on tiny-qwen3-moe by 0.16% at the test's
    # calibration; on 32, by 0.01%
    ev = eval_batches(path, seq_len=64, max_windows=32)
    return perplexity(StreamedModel(str(path)).forward(ev), ev)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("fmt", CALIBRATED)
def test_gpu_calibrated_within_0_2_percent_perplexity(cli_run, tmp_path, bundled, fmt):
    """Same calibration, GPU vs CPU: held-out perplexity (evaluated on the CPU) within 0.2%."""
    quantize(cli_run, str(bundled), fmt, tmp_path / "cpu", "--device", "cpu")
    quantize(cli_run, str(bundled), fmt, tmp_path / "gpu", "--device", "cuda")
    p_cpu, p_gpu = _held_out_ppl(tmp_path / "cpu"), _held_out_ppl(tmp_path / "gpu")
    print(f"{bundled.name} {fmt}: held-out ppl cpu {p_cpu:.4f} gpu {p_gpu:.4f} ({100 * (p_gpu / p_cpu - 1):+.3f}%)")
    assert abs(p_gpu / p_cpu - 1) <= 0.002


def _synthetic(tmp_path: Path, layers: int = 6, experts: int = 16) -> Path:
    """Kimi K2's structure at a quarter of its widths, block FP8, with a tokenizer (bench/gpu.py's)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from gpu import synthetic

    return synthetic(tmp_path / "syn", 0.25, experts, 4096, top_k=4, layers=layers)


def _layer_bytes(path: Path) -> int:
    from moepress.compress.checkpoint import CheckpointReader

    r = CheckpointReader(path)
    return max(sum(r.info(n).nbytes for n in r.layer_names(i)) for i in r.layer_indices())


@pytest.mark.gpu
@gpu
def test_gpu_memory_bounded(cli_run, tmp_path):
    """int4-gptq on a streamed synthetic: the GPU peak stays within a few float32 layers plus the largest
    batch's statistics, whatever the layer count. On the GPU a layer's experts are solved in batches of up
    to DEVICE_BATCH_SHARE of its memory (here all 16 at once), so the statistics are the larger of the
    dense down projection's and all experts' float64 Hessians with their factors (4 matrices each), plus
    the batch's weights in float64 twice. An estimate from the code, not yet measured on a GPU."""
    src = _synthetic(tmp_path)
    res = quantize(cli_run, str(src), "int4-gptq", tmp_path / "q", "--device", "cuda")
    peak, layer = res["memory"]["gpu_peak_bytes"], _layer_bytes(src)
    c = json.loads((src / "config.json").read_text())
    dense, width, experts = c["intermediate_size"], c["hidden_size"], c["n_routed_experts"]
    stats = 4 * 8 * max(dense**2, experts * width**2)
    weights = 2 * 8 * experts * 3 * c["moe_intermediate_size"] * width
    bound = 2 * 4 * layer + stats + weights + (256 << 20)
    print(f"GPU peak {peak / 1e6:.0f} MB; stored layer {layer / 1e6:.0f} MB; bound {bound / 1e6:.0f} MB")
    assert 0 < peak <= bound


@pytest.mark.gpu
@gpu
def test_gpu_overlap_of_io_and_compute(tmp_path):
    """A streamed forward on the GPU: the compute thread's time waiting for uploads (the GPU's idle
    fraction) is reported, and stays well below what a serial read-then-compute loop would give."""
    import time

    from moepress.compress.stream import StreamedModel

    src = _synthetic(tmp_path, layers=8)
    sm = StreamedModel(str(src), device="cuda", keep_stored=True)
    ids = [torch.randint(0, sm.adapter.vocab_size, (4, 256))]
    t0 = time.perf_counter()
    sm.forward(ids)
    torch.cuda.synchronize()
    total = time.perf_counter() - t0
    idle = idle_fraction(sm.uploader.timings, total)
    uploads = sum(b - a for w, a, b in sm.uploader.timings if w == "upload")
    print(f"GPU idle fraction {idle:.3f} of {total:.2f} s; uploads took {uploads:.2f} s in the background")
    assert idle is not None and idle < 0.9


def test_bench_gpu_runs_small(tmp_path):
    """bench/gpu.py stays alive on CPU-only CI: the small shapes, one mode, its table and JSON."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "gpu.json"
    r = subprocess.run([sys.executable, str(root / "bench" / "gpu.py"), "--small", "--modes", "fp8-block",
                        "--devices", "cpu", "--work", str(tmp_path), "--json", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "| fp8-block | cpu | 8 |" in r.stdout
    row = json.loads(out.read_text())["rows"][0]
    assert row["status"] == "ok" and len(row["layer_s"]) == 2 and row["host_peak"] > 0 and row["gpu_peak"] is None


def test_bench_gpu_gives_prune_autos_race_back_to_its_layers():
    """prune auto's plan race is its own progress task, run inside the prune task before its first layer:
    bench/gpu.py counted the whole race as the first (dense) layer's time, and the Kimi K2 projection
    scaled only the write pass per MoE layer."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "bench" / "gpu.py"
    spec = importlib.util.spec_from_file_location("bench_gpu", path)
    gpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu)
    # prune: layers done at 10, 12, 15 s (the first holding the 9.5 s race); race: layers at 4, 9, 9.5 s
    layers = gpu.per_layer([10.0, 12.0, 15.0], [4.0, 9.0, 9.5])
    assert layers == pytest.approx([0.5 + 4.0, 2.0 + 5.0, 3.0 + 0.5]) and sum(layers) == pytest.approx(15.0)
    assert gpu.per_layer([1.0, 3.0], []) == [1.0, 2.0]  # other stages: unchanged


@pytest.mark.parametrize("given,expected", [({}, "10000 None"), ({"GOMP_SPINCOUNT": "5"}, "5 None"),
                                            ({"OMP_WAIT_POLICY": "ACTIVE"}, "None ACTIVE")])
def test_the_command_shortens_openmps_spin_unless_told_otherwise(given, expected):
    """The `moepress` entry point sets GOMP_SPINCOUNT=10000 (a spin count or wait policy the user set wins) before
    torch loads libgomp, which reads it once: threads spinning 300,000 rounds on a loaded machine made a
    384-expert prune 2.3x slower (bench/threads.py). It only works while importing the CLI does not import torch."""
    code = ("import os, sys, moepress.cli as c\n"
            "assert 'torch' not in sys.modules, 'the CLI imports torch before main() sets the spin count'\n"
            "c.cli = lambda **kw: print(os.environ.get('GOMP_SPINCOUNT'), os.environ.get('OMP_WAIT_POLICY'))\n"
            "c.main()\n")
    env = {**{k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}, **given}
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.strip() == expected, p.stderr
