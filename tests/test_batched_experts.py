"""Per-expert work batched across a layer's experts (compress/quant/batched.py, compress/quantize/
experts.py) gives the bytes of the one-by-one path, and GPTQ's in-place / row-chunked memory savings
(compress/quant/gptq.py) change no value (issue 22, items 2 and 4)."""

import hashlib
import os

import pytest
import torch

from helpers import count_host_reads
from moepress import models
from moepress.compress import formats
from moepress.compress.quant import awq, batched, gptq
from moepress.compress.quantize import experts
from moepress.compress.quantize.config import QuantConfig
from moepress.compress.quantize.group import LayerResult
from moepress.compress.quantize.stats import LinearStats, amax_only

# shapes not multiples of the GPTQ block; one item with an all-zero weight column, one rank-deficient
# (2 rows), one with a zero Hessian that is not positive definite after damping's zero mean
B, OUT, IN, GROUP = 9, 6, 96, 32


def _items(seed=0, width=IN):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(B, 2, OUT, width, generator=g)
    W[3, :, :, 5] = 0
    rows = [int(n) for n in torch.randint(1, 300, (B,), generator=g)]
    rows[4] = 2
    xs = [torch.randn(n, width, generator=g) * torch.rand(width, generator=g) * 3 for n in rows]
    Hs = []
    for x in xs:
        xd = x.double()
        Hs.append(2.0 * (xd.T @ xd) / x.shape[0])
    Hs[6] = torch.zeros(width, width, dtype=torch.float64)
    Hs[6][0, 1] = Hs[6][1, 0] = 1.0  # indefinite: the one-by-one path falls back to round to nearest
    return W, xs, Hs


def _batched_equals_one_by_one(seed: int, act_order: bool):
    """Batched GPTQ of _items(seed) against gptq_quantize item by item, bit for bit: (W, Q, S, U)."""
    W, _, Hs = _items(seed)
    dead = torch.stack([(W[b, 0] == 0).all(0) for b in range(B)])
    perm, U = batched.factor(torch.stack(Hs), dead, 0.01, act_order)
    Q, S = batched.gptq(W, perm, U, GROUP, block_size=40)
    for b in range(B):
        for k in range(2):
            q, s = gptq.gptq_quantize(W[b, k], Hs[b], GROUP, 0.01, act_order, block_size=40)
            assert torch.equal(Q[b, k], q), (b, k)
            assert torch.equal(S[b, k], s)
    return W, Q, S, U


@pytest.mark.parametrize("act_order", [False, True])
def test_batched_gptq_is_bit_identical_to_one_by_one(act_order):
    W, Q, S, U = _batched_equals_one_by_one(0, act_order)
    assert U.dtype == torch.float64
    # GPTQ really rounded (not RTN everywhere): the rank-full items differ from round to nearest
    assert not torch.equal(Q[0, 0], (W[0, 0] / S[0, 0].repeat_interleave(GROUP, 1)).round().clamp(-8, 7).to(torch.int8))


# 72 wide: not a multiple of the CPU pow kernel's vector step (16 or 32 floats), so a batched pow
# would put an item's tail elements on another code path than its own call does
@pytest.mark.parametrize("width, group", [(IN, GROUP), (72, 24)])
def test_batched_awq_search_is_bit_identical_to_one_by_one(width, group):
    W, xs, _ = _items(1, width)
    act = torch.stack([x.abs().mean(0) for x in xs])
    found = batched.awq_search(W, xs, act, group)
    alphas = set()
    for b in range(B):
        pqs, alpha, err = awq.search([W[b, 0], W[b, 1]], xs[b], act[b], group)
        assert torch.equal(found[b][0], pqs) and found[b][1] == alpha and found[b][2] == err, b
        alphas.add(alpha)
    assert len(alphas) > 1  # the items really chose different scales


def _groups(fmt: str, cfg: QuantConfig):
    """A layer's worth of expert groups (gate+up, down) with statistics of different token counts,
    one expert with amax-only statistics (calibrated.py's round-to-nearest rule)."""
    W, xs, _ = _items(2)
    f = formats.FORMATS[fmt]
    out = []
    for b in range(B):
        st = LinearStats(hessian=cfg.needs_hessian(fmt))
        st.add(xs[b])
        if b == 7:
            st = amax_only(xs[b])
        out.append((fmt, [f"e{b}.gate", f"e{b}.up"], [W[b, 0], W[b, 1]], st))
        std = LinearStats(hessian=cfg.needs_hessian(fmt))
        std.add(torch.nn.functional.silu(xs[(b + 1) % B]))
        out.append((fmt, [f"e{b}.down"], [W[b, 1] * 0.5], std))
    assert f.quantize is not None
    return out


def _run(groups, cfg, batched_int4: bool, budget: int) -> LayerResult:
    res = LayerResult()
    eb = experts.ExpertBatch(res, cfg, budget=budget, batched_int4=batched_int4)
    for fmt, names, ws, st in groups:
        eb.add(fmt, names, ws, st)
    eb.flush()
    return res


@pytest.mark.parametrize("fmt", ["int4-gptq", "int4-awq", "w4a8-awq", "fp8"])
def test_expert_batch_gives_the_one_by_one_layer_result(fmt):
    cfg = QuantConfig(format=fmt, group_size=32)
    groups = _groups(fmt, cfg)
    one = _run(groups, cfg, batched_int4=False, budget=1 << 40)
    # a small budget: several flushes, each batching what is pending
    many = _run(groups, cfg, batched_int4=True, budget=200_000)
    assert list(one.tensors) == list(many.tensors) and len(one.tensors) >= 3 * B
    for k, v in one.tensors.items():
        assert torch.equal(v, many.tensors[k]), k
    assert one.awq_alpha == many.awq_alpha and one.shared == many.shared
    assert list(one.modules.items()) == list(many.modules.items())


def test_a_batchs_host_reads_do_not_grow_with_its_experts(monkeypatch):
    """On a GPU a host read (a bool, ``torch.equal``, ``.tolist()``) waits for the device's queue to drain: the
    batch's decisions (whose weights share their all-zero columns) are read at once, not per expert. INT4 GPTQ
    (no AWQ: its CPU path's exact per-item sums read floats that the GPU's do not) on 9 and on 4 experts."""
    cfg = QuantConfig(format="int4-gptq", group_size=32)
    groups = _groups("int4-gptq", cfg)
    reads = count_host_reads(monkeypatch)
    counts = []
    for n in (len(groups), 8):
        reads.clear()
        _run(groups[:n], cfg, batched_int4=True, budget=1 << 40)
        counts.append(dict(reads))
    assert counts[0] == counts[1], counts


def test_a_group_nothing_batches_is_quantized_when_added_and_its_weights_let_go():
    """FP8 (no batched quantizer): each group is quantized when added, so its float32 weights are not held
    until the flush (which pended a whole budget of them, ~7 experts: 33 MB of test_quant_memory's fp8 peak);
    recorded in ``res`` at the flush, in order, as the one-by-one calls record them."""
    import weakref

    from moepress.compress.quantize.group import quantize_group

    cfg = QuantConfig(format="fp8", group_size=32)
    groups = _groups("fp8", cfg)
    res, alive = LayerResult(), []
    eb = experts.ExpertBatch(res, cfg, budget=1 << 40)
    for fmt, names, ws, st in groups:
        copies = [w.clone() for w in ws]  # what calibrated.py hands over: float32 copies only the batch holds
        alive += [weakref.ref(w) for w in copies]
        eb.add(fmt, names, copies, st)
        del copies
    assert not any(r() is not None for r in alive) and not res.tensors
    eb.flush()
    ref = LayerResult()
    for fmt, names, ws, st in groups:
        quantize_group(ref, cfg, fmt, names, ws, st)
    assert list(ref.tensors) == list(res.tensors) and len(res.tensors) >= 3 * B
    assert all(torch.equal(v, res.tensors[k]) for k, v in ref.tensors.items())
    assert list(ref.modules.items()) == list(res.modules.items()) and ref.shared == res.shared


def test_gptq_in_place_and_row_chunks_change_nothing(monkeypatch):
    W, _, Hs = _items(3)
    w, H = W[0].reshape(2 * OUT, IN), Hs[0]
    ref = [gptq.gptq_quantize(w, H, GROUP, 0.01, True)]
    H2 = H.clone()
    got = gptq.gptq_quantize_shared([w], H2, GROUP, 0.01, True, overwrite=True)
    assert not torch.equal(H2, H)  # factorised in the caller's memory
    monkeypatch.setattr(gptq, "ROW_CHUNK_BYTES", IN * 8 * 5)  # 5 rows a chunk
    chunked = gptq.gptq_quantize(w, H, GROUP, 0.01, True)
    for q, s in (got[0], chunked):
        assert torch.equal(q, ref[0][0]) and torch.equal(s, ref[0][1])


def test_wide_inputs_get_a_float32_hessian():
    assert gptq.hessian_dtype(gptq.WIDE_INPUT) == torch.float64
    assert gptq.hessian_dtype(18432) == torch.float32
    st = LinearStats(hessian=True)
    st.add(torch.randn(3, gptq.WIDE_INPUT + 128))
    assert st.S.dtype == torch.float32


@pytest.mark.parametrize("act_order", [False, True])
def test_batched_gptq_of_a_wide_input_is_float32_and_bit_identical_to_one_by_one(monkeypatch, act_order):
    """Past WIDE_INPUT (here lowered to the test's width) the batched factor and column loop work in float32,
    as the one-by-one path does: not float64 Hessians of a 14336-wide down projection on an accelerator."""
    monkeypatch.setattr(gptq, "WIDE_INPUT", IN - 1)
    assert _batched_equals_one_by_one(5, act_order)[3].dtype == torch.float32


def _shards(d):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())
            if p.suffix == ".safetensors" or p.name == "moepress_quant.json"}


def test_quantize_cli_batched_equals_one_by_one(cli_run, tmp_path, monkeypatch):
    """The stage end to end (int4-awq: AWQ search + GPTQ over every expert) writes the same bytes either way."""
    monkeypatch.setenv("MOEPRESS_CACHE", str(tmp_path / "cache"))
    args = ["quantize", str(models.path("tiny-qwen3-moe")), "--format", "w4a8-awq", "--num-samples", "4",
            "--seq-len", "64", "--quiet", "--force"]
    digests = []
    for flag in (False, True):
        monkeypatch.setattr(experts, "BATCHED", flag)
        r = cli_run(*args, "-o", str(tmp_path / f"q{int(flag)}"))
        assert r.exit_code == 0, r.output
        digests.append(_shards(tmp_path / f"q{int(flag)}"))
    assert digests[0] == digests[1] and len(digests[0]) >= 3
    assert os.path.getsize(tmp_path / "q1" / "moepress_quant.json") > 0


@pytest.mark.parametrize("act_order", [False, True])
def test_the_accelerators_batched_ops_agree_with_one_by_one_on_the_cpu(act_order):
    """exact=False (what a GPU runs: one batched kernel per op, sums in another order) run here on the
    CPU: GPTQ's codes equal one-by-one's but for float ties and AWQ chooses the same scales. Without
    this, GPTQ's cross-block update or the damping term of that path could change and only the GPU
    tests (0.2% perplexity) would see it."""
    W, xs, Hs = _items()
    dead = torch.stack([(W[b, 0] == 0).all(0) for b in range(B)])
    perm, U = batched.factor(torch.stack(Hs), dead, 0.01, act_order, exact=False)
    Q, S = batched.gptq(W, perm, U, GROUP, block_size=40, exact=False)
    same = total = 0
    for b in range(B):
        for k in range(2):
            q, s = gptq.gptq_quantize(W[b, k], Hs[b], GROUP, 0.01, act_order, block_size=40)
            assert torch.allclose(S[b, k], s, rtol=1e-6, atol=0), (b, k)
            same += int((Q[b, k] == q).sum())
            total += q.numel()
    assert same / total >= 0.999, same / total  # measured: every code equal
    W1, xs1, _ = _items(1)
    act = torch.stack([x.abs().mean(0) for x in xs1])
    fast, slow = batched.awq_search(W1, xs1, act, GROUP, exact=False), batched.awq_search(W1, xs1, act, GROUP)
    assert [f[1] for f in fast] == [s[1] for s in slow]
    assert all(f[2] == pytest.approx(s[2], rel=1e-5) for f, s in zip(fast, slow, strict=True))
    for f, s in zip(fast, slow, strict=True):  # the scale written (the loss does not see its normalisation)
        torch.testing.assert_close(f[0], s[0], rtol=1e-5, atol=0)
