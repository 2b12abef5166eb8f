"""`torchrun --nproc_per_node 2 moepress quantize` (gloo on CPU) writes the same bytes as one process (issue #10)."""

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import forkserver
from moepress import models


def _digests(d):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())
            if p.suffix == ".safetensors" or p.name in ("moepress_quant.json", "hf_quant_config.json", "config.json")}


@pytest.fixture
def one_thread():
    """torchrun gives each worker OMP_NUM_THREADS=1: a reference computed in this process uses one thread too,
    so every per-batch number is computed by the same kernels."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.slow
def test_two_rank_gloo_quantize_is_byte_identical_to_one_process(tmp_path, cli_run, monkeypatch, one_thread):
    # DeepSeek family (sigmoid routing, shared experts) and GPTQ: Hessians, expert routing, AWQ-free INT4 and
    # the FP8 KV-cache scales (a max over every rank's keys and values) all depend on every rank's calibration
    # tokens (12 samples: a batch of 8 on rank 0, 4 on rank 1)
    args = ["quantize", str(models.path("tiny-deepseek-v3")), "--format", "int4-gptq", "--kv-cache", "fp8",
            "--num-samples", "12", "--seq-len", "64", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path), "MOEPRESS_CACHE": str(tmp_path / "cache")}
    monkeypatch.setenv("MOEPRESS_CACHE", env["MOEPRESS_CACHE"])
    one = cli_run(*args, "-o", tmp_path / "one")  # the one-process reference, in this process
    assert one.exit_code == 0, one.output[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "moepress", *args, "-o", str(tmp_path / "two")], env=env, capture_output=True,
                         text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("quantized") == 1  # rank 0 alone reports and writes
    a, b = _digests(tmp_path / "one"), _digests(tmp_path / "two")
    assert len([n for n in a if n.endswith(".safetensors")]) >= 5
    assert a == b
    from safetensors import safe_open

    kv = {}
    for f in sorted((tmp_path / "one").glob("*.safetensors")):
        with safe_open(f, "pt") as h:
            kv.update({k: h.get_tensor(k) for k in h.keys() if k.endswith((".k_scale", ".v_scale"))})
    assert len(kv) == 8, sorted(kv)  # 4 layers' K and V scales, within the digests compared above
    _lost_rank_keeps_finished_layers(args, env, tmp_path, a, cli_run)


def _lost_rank_keeps_finished_layers(args, env, tmp_path, reference, cli_run):
    """Rank 1 dies (kill -9) after its layer 2: rank 0's collective fails; it exits 2 with one line and
    keeps its finished layers in OUT.partial (it removed them), and --resume in one process finishes
    the same bytes as the uninterrupted run."""
    out = tmp_path / "lost"
    (code0, err0), (code1, _) = _ranks(lambda r: [*args, "-o", str(out)], env, timeout=300,
                                       env_of=lambda r: {"MOEPRESS_KILL_AT": "quantize:2"} if r else {})
    assert code1 == -9 and code0 == 2, err0[-2000:]
    lines = err0.strip().splitlines()
    assert len(lines) == 1 and "another rank exited" in lines[0] and "--resume" in lines[0], err0[-2000:]
    partial = tmp_path / "lost.partial"
    assert not out.exists() and len(list(partial.glob("*.safetensors"))) >= 2
    resumed = cli_run(*args, "-o", out, "--resume")  # in one process: this one
    assert resumed.exit_code == 0, resumed.output[-2000:]
    assert _digests(out) == reference


def _expert_groups(fmt):
    """A layer's routed-expert groups (gate+up, down) with statistics of different token counts."""
    import torch

    from moepress.compress.quantize.config import QuantConfig
    from moepress.compress.quantize.stats import LinearStats

    cfg = QuantConfig(format=fmt, group_size=32)
    g = torch.Generator().manual_seed(5)
    groups = []
    for e in range(7):
        x = torch.randn(int(torch.randint(10, 200, (1,), generator=g)), 96, generator=g)
        for names in ([f"e{e}.gate", f"e{e}.up"], [f"e{e}.down"]):
            st = LinearStats(hessian=cfg.needs_hessian(fmt))
            st.add(x if len(names) == 2 else torch.relu(x))
            groups.append((fmt, names, [torch.randn(6, 96, generator=g) for _ in names], st))
    return cfg, groups


def _quantize_experts(cfg, groups, env, counts):
    from moepress.compress.quantize import experts
    from moepress.compress.quantize.group import LayerResult

    inner = experts.quantize_groups

    def counted(gs, *a):
        counts.append(len(gs))
        return inner(gs, *a)

    experts.quantize_groups = counted
    res = LayerResult()
    eb = experts.ExpertBatch(res, cfg, env, budget=1_200_000)  # several flushes, each split across the ranks
    for fmt, names, ws, st in groups:
        eb.add(fmt, names, ws, st)
    eb.flush()
    experts.quantize_groups = inner
    return res


SPLIT_FORMATS = ["w4a8-awq", "fp8", "nvfp4"]  # fp8 / nvfp4: float8 tensors cross ranks


def _rank_main(rank, world, init_file, out):
    import torch
    import torch.distributed as tdist

    from moepress.calib import distributed as dist

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    tdist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    for fmt in SPLIT_FORMATS:  # one pair of processes for every format (each start imports torch and moepress)
        counts: list = []
        cfg, groups = _expert_groups(fmt)
        res = _quantize_experts(cfg, groups, dist.current(), counts)
        torch.save({"tensors": res.tensors, "alpha": res.awq_alpha, "counts": counts}, f"{out}/{fmt}-rank{rank}.pt")
    tdist.destroy_process_group()


@pytest.fixture(scope="module")
def split_ranks(tmp_path_factory):
    """Two gloo ranks, each quantizing its share of every format's expert groups: the directory of their results."""

    d = tmp_path_factory.mktemp("split")
    forkserver.spawn(_rank_main, (2, str(d / "init"), str(d)), nprocs=2)
    return d


@pytest.mark.slow
@pytest.mark.parametrize("fmt", SPLIT_FORMATS)
def test_two_rank_expert_split_is_identical_to_one_process(split_ranks, fmt):
    """Each gloo rank quantizes its share of a layer's expert groups (AWQ search + GPTQ batched);
    every rank ends with the one-process result, bit for bit."""
    import torch

    from moepress.calib.distributed import DistEnv

    cfg, groups = _expert_groups(fmt)
    one = _quantize_experts(cfg, groups, DistEnv(), [])
    counts = []
    for r in range(2):
        got = torch.load(split_ranks / f"{fmt}-rank{r}.pt")
        assert list(got["tensors"]) == list(one.tensors) and len(one.tensors) >= 3 * 7
        assert all(torch.equal(v, got["tensors"][k]) for k, v in one.tensors.items())
        assert got["alpha"] == one.awq_alpha
        counts.append(got["counts"])
    # the split: every group quantized once, by one rank, over several batches each split in halves (one
    # process quantizes a group no batched quantizer takes when it is added, experts.py: no batches to count)
    assert len(counts[0]) == len(counts[1]) >= 2 and sum(map(sum, counts)) == len(groups)
    assert max(map(max, counts)) >= 2 and all(abs(a - b) <= 1 for a, b in zip(*counts, strict=True))


@pytest.mark.parametrize("width", [96, 8200])
def test_deferred_statistics_fold_like_one_process(width):
    """What gather() does with every rank's calls (ranks hold contiguous shares of the batches),
    without the process group: folded in order, the statistics equal one process's bit for bit. Above
    gptq.WIDE_INPUT (8192) one process adds each later batch's x^T x in place (addmm_), which rounds
    unlike a product then a sum: ranks that kept x^T x per call gave another Hessian, other INT4 codes
    and, through sequential calibration, other routing in every later layer."""
    import torch

    from moepress.compress.quantize.stats import LinearStats

    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(n, width, generator=g) for n in (256, 128, 256)]
    one = LinearStats(hessian=True)
    for b in batches:
        one.add(b)
    ranks = [LinearStats(hessian=True, defer=True) for _ in range(2)]
    for b in batches[:2]:
        ranks[0].add(b)
    ranks[1].add(batches[2])
    folded = LinearStats(hessian=True)
    for r in ranks:
        for call in r.calls:
            folded._fold(call)
    assert torch.equal(folded.S, one.S) and torch.equal(folded.abs_sum, one.abs_sum)
    assert torch.equal(folded.sample(), one.sample()) and folded.n == one.n


def test_only_a_lost_peer_becomes_peer_lost():
    """A rank's own out-of-memory or shape error under torchrun is not "another rank exited" (it would keep
    the partial and send the user to a --resume that fails the same way): it passes through as it was."""
    import torch

    from moepress.calib.distributed import DistEnv, peer_errors
    from moepress.errors import PeerLost

    env = DistEnv(0, 2, 0, "gloo")
    with pytest.raises(PeerLost, match="Connection closed by peer"):
        with peer_errors(env):
            raise RuntimeError("[/__w/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed "
                               "by peer [127.0.0.1]:7083")
    for own in (torch.OutOfMemoryError("CUDA out of memory"), RuntimeError("mat1 and mat2 shapes cannot be mul")):
        with pytest.raises(type(own)) as got:
            with peer_errors(env):
                raise own
        assert got.value is own


def _ranks(args_of, env, timeout=120, env_of=lambda r: {}, stdout=False, cwd_of=lambda r: None):
    """Two ranks started by hand (RANK, WORLD_SIZE, MASTER_*), rank r running ``moepress *args_of(r)`` with
    ``env_of(r)`` added to ``env``: their (exit code, stderr) pairs (with ``stdout``: (exit code, stderr, stdout))."""
    import socket

    for _ in range(3):  # a free port can be taken by the other test worker's torchrun before rank 0 binds it
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        ranks = [forkserver.Popen([sys.executable, "-m", "moepress", *args_of(r)], text=True, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE,
                                  env={**env, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
                                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), **env_of(r)},
                                  cwd=cwd_of(r))
                 for r in range(2)]
        try:
            out = [p.communicate(timeout=timeout) for p in ranks]
        finally:  # a rank left waiting for the other (the failure these tests look for) must not outlive the test
            for p in ranks:
                p.kill()
        if not any("address already in use" in err.lower() for _, err in out):
            return [(p.returncode, err, *([o] if stdout else [])) for p, (o, err) in zip(ranks, out, strict=True)]
    raise AssertionError("no free port")


@pytest.mark.parametrize("cmd,differs,needles", [
    # one pair of ranks for two refusals (the line names up to three differing options):
    # another seed: rank 1's calibration statistics went into rank 0's output without a word (exit 0);
    # a rule refused on one rank only (it names no linear): that rank exited, the other waited in the group's start
    (["quantize", "tiny-qwen3-moe", "--format", "fp8", "--num-samples", "4", "--seq-len", "32"],
     ["--seed", "1", "--rule", "nothing.*=none"],
     ["rules () on rank 0, (('nothing.*', 'none'),) on rank 1", "seed 0 on rank 0, 1 on rank 1"]),
    # --resume on one rank only: its output check passed there alone, the other rank refused (compared before
    # the quantization settings are: a case of its own)
    (["quantize", "tiny-qwen3-moe", "--format", "fp8", "--num-samples", "4", "--seq-len", "32"], ["--resume"],
     ["resume False on rank 0, True on rank 1"]),
    (["calib", "stats", "tiny-qwen3-moe", "--num-samples", "4", "--seq-len", "32"], ["--seed", "1"],
     ["seed 0 on rank 0, 1 on rank 1"]),
])
def test_ranks_started_with_different_options_refuse_in_one_line(tmp_path, cmd, differs, needles):
    """(Another --kv-cache on one rank hung: the same check, before any collective, refuses it.)"""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path), "MOEPRESS_CACHE": str(tmp_path / "cache")}
    res = _ranks(lambda r: [*cmd, "-o", str(tmp_path / "out"), "--quiet", *(differs if r else [])], env)
    for code, err in res:
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1, err[-2000:]
        assert "torchrun ranks were started with different options" in lines[0], lines[0]
        assert all(n in lines[0] for n in needles), lines[0]
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out.partial*"))


@pytest.mark.parametrize("cmd,edited,needle", [
    (["quantize", "m", "--format", "fp8"], "m/config.json", "different input checkpoints"),
    (["calib", "stats", "m", "--calib", "c.txt"], "c.txt", "different calibration samples"),
])
def test_ranks_reading_other_inputs_by_the_same_names_refuse_in_one_line(tmp_path, cmd, edited, needle):
    """The same command in two working directories (or on two nodes) whose MODEL or --calib are other files: each
    rank's statistics went into rank 0's output, exit 0 (quantize compared the calibration sources' bytes, not
    the model; calib stats neither)."""
    import json

    for d in ("a", "b"):
        shutil.copytree(models.path("tiny-qwen3-moe"), tmp_path / d / "m")
        (tmp_path / d / "c.txt").write_text((Path(__file__).parents[1] / "calib/data/calib.txt").read_text())
    f = tmp_path / "b" / edited
    if f.suffix == ".json":
        f.write_text(json.dumps({**json.loads(f.read_text()), "rms_norm_eps": 1e-5}))
    else:
        f.write_text(f.read_text()[::-1])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MOEPRESS_CACHE": "off"}
    res = _ranks(lambda r: [*cmd, "--num-samples", "4", "--seq-len", "32", "-o", str(tmp_path / "out"), "--quiet"],
                 env, cwd_of=lambda r: tmp_path / "ab"[r])
    for code, err in res:
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1, err[-2000:]
        assert f"torchrun ranks read {needle}" in lines[0] and "under the same names" in lines[0], lines[0]
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out.partial*"))


def test_a_rank_lost_outside_a_stage_layer_loop_is_one_line(tmp_path):
    """calib stats reduces its statistics after its layer loop, outside any peer_errors: a rank killed during the
    loop gave the other a traceback through all_gather_object and exit 1, not the one line and exit 2."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path), "MOEPRESS_CACHE": str(tmp_path / "cache")}
    args = ["calib", "stats", "tiny-qwen3-moe", "--num-samples", "4", "--seq-len", "32", "-o", str(tmp_path / "s"),
            "--quiet"]
    (code0, err0), (code1, _) = _ranks(lambda r: args, env, env_of=lambda r: {"MOEPRESS_KILL_AT": "calib stats:1"}
                                       if r else {})
    lines = err0.strip().splitlines()
    assert code1 == -9 and code0 == 2, err0[-2000:]
    assert len(lines) == 1 and lines[0].startswith("moepress: error: distributed run (rank 0 of 2) stopped: ") \
        and "another rank exited" in lines[0], err0[-2000:]
    assert not (tmp_path / "s").exists()


def test_a_refusal_under_torchrun_with_json_is_one_document(tmp_path):
    """Every rank refusing the same bad input under --json printed its own result: two JSON documents on torchrun's
    stdout, which json.loads refuses ("Extra data"). Rank 0 prints the result, as it does a success's."""
    import json

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    missing = str(tmp_path / "nonexistent")
    res = _ranks(lambda r: ["quantize", missing, "--format", "fp8", "-o", str(tmp_path / "q"), "--json"], env,
                 stdout=True)
    assert [code for code, _, _ in res] == [2, 2], res
    assert all(len(err.strip().splitlines()) == 1 and missing in err for _, err, _ in res), res
    assert json.loads(res[0][2])["exit"] == 2 and res[1][2] == "", res


LOST = "distributed run (rank 0 of 2) stopped: Connection closed by peer (another rank exited)"
DIFFER = ("torchrun ranks were started with different options (seed 0 on rank 0, 1 on rank 1); expected every rank "
          "to run the same command")


@pytest.mark.parametrize("line", [LOST, DIFFER, "x.jsonl: file not found"])
def test_a_refusal_under_a_joined_group_exits_2_after_its_line_without_tearing_it_down(cli_run, monkeypatch,
                                                                                        tmp_path, line):
    """A lost peer (PeerLost), ranks started with different options, bad input, under a joined process group: the
    one line (and --json's result), then the process ends with exit 2 at once (os._exit): gloo's teardown at
    interpreter exit aborted with SIGABRT (exit -6, "terminate called without an active exception") after the
    line, so torchrun and CI saw -6 (a lost peer, and once in CI ranks started unlike each other). The group is
    simulated joined; the refusal is raised where the stage reads its calibration data."""
    import json

    import torch.distributed

    import moepress.calib.data
    from moepress.errors import MoepressError, PeerLost

    def refuse(*a, **k):
        raise (PeerLost if line == LOST else MoepressError)(line)

    exits = []

    def _exit(code):
        exits.append(code)
        raise SystemExit(code)

    monkeypatch.setattr(moepress.calib.data, "calibration_set", refuse)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(os, "_exit", _exit)
    r = cli_run("calib", "prepare", "tiny-qwen3-moe", "--num-samples", 4, "--seq-len", 16, "-o", tmp_path / "t.pt",
                "--json")
    assert exits == [2] and r.exit_code == 2, (exits, r.output)
    assert r.stderr.strip().splitlines() == [f"moepress: error: {line}"]
    assert json.loads(r.stdout) == {"error": line, "exit": 2}


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_rank_waiting_in_start_up_for_a_peer_ends_at_a_signal(tmp_path, sig):
    """Rank 0 of two, its peer never started: it waits in torch's rendezvous (C++, up to the group's 60-minute
    timeout), where the CLI's Python handler for SIGTERM / SIGINT never ran: it outlived both signals. It ends at the
    signal now, writing nothing."""
    import signal
    import socket
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "MOEPRESS_CACHE": str(tmp_path / "cache")}
    p = forkserver.Popen([sys.executable, "-m", "moepress", "quantize", "tiny-qwen3-moe", "--format", "fp8",
                          "-o", str(tmp_path / "q"), "--device", "cpu"], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # rank 0 hosts the rendezvous store: listening = in the start-up
            with socket.socket() as c:
                if c.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert p.poll() is None, p.communicate()
            time.sleep(0.2)
        else:
            raise AssertionError("rank 0 never listened")
        time.sleep(1)
        p.send_signal(getattr(signal, sig))
        p.communicate(timeout=30)  # was: still waiting after both signals
    finally:
        p.kill()
    assert p.returncode == -getattr(signal, sig), p.returncode
    assert not (tmp_path / "q").exists()
