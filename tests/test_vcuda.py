"""The `--device cuda` code path of every computing stage, run here on an emulated CUDA device (tests/vcuda.py).

What a CPU-only CI cannot otherwise see and a GPU would: a CPU tensor beside a device tensor in one op, a
device tensor converted to numpy, a device index into a host tensor, an op the code assumes runs on the host.
The emulation computes on the CPU, so calibration-free outputs must equal `--device cpu`'s byte for byte; the
calibrated ones take the device's own batching (compress/quant/batched.py) and are only required to finish.
The GPU tests of tests/test_device.py hold them to the CPU's perplexity on a real GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

DRIVER = r"""
import collections, json, sys
sys.path.insert(0, sys.argv[1])
import vcuda
vcuda.install()
import torch
from moepress.cli import cli

res = {}
def run(key, *args):
    try:
        rc = cli.main([str(a) for a in args], standalone_mode=False, prog_name="moepress") or 0
    except SystemExit as e:
        rc = e.code
    except Exception as e:  # what a GPU would raise: named in the failing test's message
        rc = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    res[key] = rc

C = ["--num-samples", "4", "--seq-len", "32", "--quiet"]
# the first stage on the device starts CUDA itself, as `moepress ... --device cuda` does in a fresh process
for d in ("cpu", "cuda"):
    run(f"mxfp4-{d}", "quantize", "tiny-qwen3-moe", "--format", "mxfp4", "--device", d, "-o", f"mx-{d}", "--quiet")
    run(f"fp8-block-{d}", "quantize", "tiny-deepseek-v3", "--format", "fp8-block", "--device", d, "-o", f"fb-{d}",
        "--quiet")
try:
    torch.ones(3, device="cuda") + torch.ones(3)
except RuntimeError as e:
    res["mixing"] = "device mismatch" in str(e)

x = torch.rand(4096) * 1000  # CUDA divides by a CPU scalar as a product with its reciprocal
q = (x.to("cuda") / 448.0).cpu()
res["div"] = [torch.equal(q, x * (torch.tensor(1.0) / 448.0)), bool((q != x / 448.0).any())]

run("int4-gptq", "quantize", "tiny-deepseek-v3", "--format", "int4-gptq", "--device", "cuda", "-o", "gptq", *C)
run("w4a8-awq", "quantize", "tiny-qwen3-moe", "--format", "w4a8-awq", "--device", "cuda", "-o", "w4a8", *C)
run("prune", "prune", "tiny-mixtral", "--ratio", "0.5", "--device", "cuda", "-o", "pruned", *C)
run("stats", "calib", "stats", "tiny-qwen3-moe", "--device", "cuda", "-o", "stats", *C)
run("check", "check", "gptq", "--reference", "tiny-deepseek-v3", "--device", "cuda", "--max-samples", "2",
    "--seq-len", "32", "--report", "report", "--quiet", "--max-ppl-increase", "none", "--min-top1", "none",
    "--max-kl", "none")

def syncs(key, *args):  # host syncs on device tensors by kind and call site, for one run
    before = collections.Counter(vcuda.SYNCS)
    run(key, *args)
    res["syncs-" + key] = {f"{k} {site}": n for (k, site), n in (vcuda.SYNCS - before).items()}

for name, src in (("full", "tiny-mixtral"), ("half", "pruned")):  # 8 experts; the prune above keeps 4
    syncs(f"fp8-{name}", "quantize", src, "--format", "fp8", "--device", "cuda", "-o", f"fp8-{name}", *C)
    syncs(f"merge-{name}", "prune", src, "--ratio", "0.5", "--method", "merge", "--device", "cuda", "-o",
          f"merge-{name}", *C)
# Kimi K2 Thinking's layout: packed INT4 experts decoded at each call, their weight_shape read as numbers
syncs("kimi-stats", "calib", "stats", "tiny-kimi-k2-int4", "--device", "cuda", "-o", "kimi-stats", *C)
# ... and a merge refit re-encodes kept experts' down projections: their weight_shape stays on the host as well
syncs("kimi-merge", "prune", "tiny-kimi-k2-int4", "--ratio", "0.5", "--method", "merge", "--sequential", "--device",
      "cuda", "-o", "kimi-merge", *C)
print(json.dumps(res))
"""


def _digests(out: Path) -> dict:
    return {f: v["sha256"] for f, v in json.loads((out / "moepress-manifest.json").read_text())["files"].items()}


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    d = tmp_path_factory.mktemp("vcuda")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-c", DRIVER, str(Path(__file__).parent)], cwd=d, env=env,
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    return d, json.loads(p.stdout.strip().splitlines()[-1])


def test_the_emulation_refuses_what_cuda_refuses(stages):
    assert stages[1]["mixing"] is True


def test_the_emulation_divides_by_a_cpu_scalar_as_cuda_does(stages):
    """a / 448.0 on the device is a x (1 / 448) (last bits differ from the CPU's division): a scale computed
    so instead of with compress/quant/exact.py's div breaks the byte-identity tests below."""
    assert stages[1]["div"] == [True, True]


@pytest.mark.parametrize("key", ["mxfp4", "fp8-block"])
def test_calibration_free_formats_on_the_device_equal_the_cpus_bytes(stages, key):
    d, res = stages
    assert res[f"{key}-cpu"] == 0 and res[f"{key}-cuda"] == 0, res
    short = {"mxfp4": "mx", "fp8-block": "fb"}[key]
    assert _digests(d / f"{short}-cuda") == _digests(d / f"{short}-cpu")


@pytest.mark.parametrize("key", ["int4-gptq", "w4a8-awq", "prune", "stats"])
def test_calibrated_stages_run_on_the_device(stages, key):
    assert stages[1][key] == 0, stages[1]


@pytest.mark.parametrize("stage", ["fp8", "merge"])
def test_host_syncs_do_not_grow_with_the_expert_count(stages, stage):
    """A host sync (``.item()``, ``.tolist()``, ``float(t)``, ``int(t)``, ``nonzero``) stalls a GPU until its
    queue drains; per expert, that is thousands per Kimi K2 layer. The same stage on the same tokens with 8 and
    with 4 experts per layer syncs at the same call sites, as often (per forward or per layer, never per expert)."""
    res = stages[1]
    assert res[f"{stage}-full"] == 0 and res[f"{stage}-half"] == 0, res
    # the experts' exact Hessian evidence (an eigh each) is taken up to 512 input channels only (stats.py
    # hessian_pending): wider experts, Kimi K2's (2048, 7168) among them, read a diagonal, with no sync
    narrow = "eigh compress/quantize/stats.py"
    full, half = ({k: n for k, n in res[f"syncs-{stage}-{h}"].items() if not k.startswith(narrow)}
                  for h in ("full", "half"))
    assert full and full == half, {k: (full.get(k), half.get(k)) for k in {*full, *half} if full.get(k) != half.get(k)}


def test_check_runs_on_the_device_and_reports_it(stages):
    d, res = stages
    assert res["check"] == 0, res
    report = json.loads((d / "report" / "report.json").read_text())
    assert report["metrics"]["max_expert_error"] < 0.5 and report["metrics"]["min_routing_overlap"] == 1.0


RACE = r"""
import contextlib, json, sys, threading, time
sys.path.insert(0, sys.argv[1])
import vcuda
vcuda.install()
import torch
from moepress.device import Uploader

made, seen = [], {}

class SlowStream:  # its first construction starts CUDA (slow), as torch.cuda.Stream's does
    def __init__(self, device=None, **kw):
        time.sleep(0.2 if not made else 0.002)
        made.append(self)

    def synchronize(self):
        seen.setdefault(threading.current_thread().name, {}).setdefault("synced", set()).add(made.index(self))

@contextlib.contextmanager
def on(s):
    seen.setdefault(threading.current_thread().name, {})["copies"] = made.index(s)
    yield

torch.cuda.Stream, torch.cuda.stream = SlowStream, on
pin = torch.Tensor.pin_memory
torch.Tensor.pin_memory = lambda self, *a, **k: (time.sleep(0.02), pin(self, *a, **k))[1]  # a host copy: 0.4 s a call
up = Uploader(torch.device("cuda"))
ts = [threading.Thread(target=lambda: up.upload({f"w{j}": torch.randn(8, 8) for j in range(20)}), name=f"t{i}")
      for i in range(2)]
[t.start() for t in ts]
[t.join() for t in ts]
print(json.dumps({"streams": len(made), "awaited": [v["copies"] in v["synced"] for v in seen.values()]}))
"""


def test_two_threads_first_uploads_wait_on_the_stream_their_copies_are_on():
    """Two workers' first uploads at once (the calibration-free GPU path's two upload threads): one side stream
    is made, and each thread waits on the stream its copies were queued on (the thread whose stream was made
    second queued its copies on its own, then, its upload outlasting the other's slow first construction, waited
    on the other's)."""
    p = subprocess.run([sys.executable, "-c", RACE, str(Path(__file__).parent)], capture_output=True, text=True,
                       timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert res == {"streams": 1, "awaited": [True, True]}, res


DECODE = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import vcuda
vcuda.install()
import torch
from moepress.compress.formats import ct_inputs

res = {}
for bits in (8, 3, 4):  # compressed-tensors pack-quantized int32 words, decoded where the layer was uploaded
    words = torch.randint(-2**31, 2**31 - 1, (5, 3), generator=torch.Generator().manual_seed(bits), dtype=torch.int64)
    words = words.to(torch.int32)
    n = 3 * 32 // bits
    try:
        got = ct_inputs.unpack_int32(words.to("cuda"), bits, n).cpu()
        res[str(bits)] = torch.equal(got, ct_inputs.unpack_int32(words, bits, n))
    except RuntimeError as e:
        res[str(bits)] = str(e).splitlines()[0]
class R:
    path = "x"
    def __contains__(self, n):
        return True
    def get(self, n):
        return (torch.arange(64) // 32).to("cuda")
try:
    ct_inputs._check_g_idx(R(), "m", 64, 32)
    res["g_idx"] = True
except RuntimeError as e:
    res["g_idx"] = str(e).splitlines()[0]
print(json.dumps(res))
"""


def test_compressed_tensors_words_decode_on_the_device():
    """A pack-quantized module of 8 or 3 bits (4 takes another path) decoded from its uploaded words, and a
    plain-order weight_g_idx checked on the device: a CPU index tensor beside the device's (a GPU refuses)."""
    p = subprocess.run([sys.executable, "-c", DECODE, str(Path(__file__).parent)], capture_output=True, text=True,
                       timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads(p.stdout.strip().splitlines()[-1]) == {"8": True, "3": True, "4": True, "g_idx": True}


def test_a_packed_int4_stream_reads_its_weight_shapes_on_the_host(stages):
    """A compressed-tensors pack-quantized weight is decoded at every forward; its weight_shape stays on the host
    (stream.py HOST_SUFFIXES), so reading it waits for nothing: as uploaded, two syncs per expert linear and batch."""
    for key in ("kimi-stats", "kimi-merge"):  # a stream; a merge's refit re-encoding kept experts
        got = stages[1][f"syncs-{key}"]
        assert stages[1][key] == 0 and not [s for s in got if "ct_inputs.py" in s], (key, got)
