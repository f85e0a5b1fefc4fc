"""Packed rows (data/packing.py, model.SampleMask): the same loss and gradients as one sample per row,
positions restarting per sample, no attention across samples, and a schedule that is a pure function of
the step (exact resume). CPU tests run the SDPA path (and flex's forward); the GPU kernels have their
own test, run where a GPU is."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import graspGPT.model as gm
from graspGPT.config import ConfigError, config_from_dict
from graspGPT.data.dataset import IGNORE_INDEX, BatchLoader, DatasetError, TrainingSamples, collate
from graspGPT.data.packing import PackedSchedule, collate_packed, pack, packed_batch
from graspGPT.model import GraspGPT, GraspGPTConfig, ModelInputError, sample_positions
from test_dataset import NOAUG, V, aug, make_store

ROW = 512  # positions of a packed row in these tests; the samples of make_store have ~100-250 tokens


def tiny_model(**kw) -> GraspGPT:
    torch.manual_seed(0)
    args = dict(vocab_size=V.size, block_size=ROW, n_layer=2, n_head=4, n_embd=32, n_kv_head=2,
                voxel_grid=tuple(V.dims), loss_chunk_size=64)
    return GraspGPT(GraspGPTConfig(**{**args, **kw}))


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.fixture
def packed_attention(monkeypatch):
    """Set model.PACKED_ATTENTION for one test."""
    return lambda kind: monkeypatch.setattr(gm, "PACKED_ATTENTION", kind)


# -- packing rows -------------------------------------------------------------------------------

def test_pack_places_every_item_once_within_capacity_and_the_row_count_ignores_order():
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 100, 300)
    counts = set()
    for seed in range(3):
        order = np.random.default_rng(seed).permutation(300)
        rows = pack(sizes, order, 128)
        assert sorted(np.concatenate(rows).tolist()) == list(range(300))
        assert all(sizes[r].sum() <= 128 for r in rows)
        counts.add(len(rows))
    assert len(counts) == 1
    assert counts.pop() <= -(-sizes.sum() // 128) + 3  # within a few rows of perfect packing
    with pytest.raises(DatasetError, match="does not fit a row of 128"):
        pack(np.array([129]), np.arange(1), 128)


def test_pack_fills_rows_of_real_grid_lengths():
    """Lengths like the built-in real-grid data (1.2k-9.7k tokens) into rows of 13056: ~98% full."""
    sizes = np.random.default_rng(1).integers(1200, 9700, 600) - 1
    rows = pack(sizes, np.arange(600), 13056)
    assert sizes.sum() / (len(rows) * 13056) > 0.96


# -- the packed batch ---------------------------------------------------------------------------

def test_packed_rows_hold_each_sample_as_one_per_row_would_and_labels_stay_inside_it():
    seqs = [s.astype(np.int64) for s in make_store(5, seed=3).seqs]
    rows = [[(seqs[0], 1), (seqs[1], 1)], [(seqs[2], 1), (seqs[3], 40), (seqs[4], 1)]]
    row_len = max(sum(len(s) - 1 for s, _ in r) for r in rows) + 7
    b = collate_packed(rows, row_len, V.end)
    ref = collate([s for r in rows for s, _ in r], V.end, first_targets=[f for r in rows for _, f in r])
    assert b.input_ids.shape == b.targets.shape == (2, row_len) and b.num_tokens == 2 * row_len
    assert b.num_targets == ref.num_targets
    starts = b.cu_seqlens.tolist()
    assert b.cu_seqlens.dtype == torch.int32 and starts[0] == 0 and starts[-1] == 2 * row_len
    flat_ids, flat_targets = b.input_ids.flatten(), b.targets.flatten()
    spans = list(zip(starts[:-1], starts[1:]))
    k = 0
    for r, row in enumerate(rows):
        for s, _ in row:
            lo, hi = spans.pop(0)
            n = len(s) - 1
            assert hi - lo == n and lo // row_len == r  # one span per sample, never across rows
            assert torch.equal(flat_ids[lo:hi], ref.input_ids[k, :n])
            assert torch.equal(flat_targets[lo:hi], ref.targets[k, :n])  # its own next tokens, `end` last
            assert flat_targets[hi - 1] == V.end
            k += 1
        lo, hi = spans.pop(0)  # the row's padding: a span of its own, no targets
        assert hi == (r + 1) * row_len and (flat_targets[lo:hi] == IGNORE_INDEX).all()
    assert not spans


def test_positions_restart_at_zero_in_every_sample():
    cu = torch.tensor([0, 3, 8, 10, 14, 20], dtype=torch.int32)  # two rows of 10
    positions, samples = sample_positions(cu, 2, 10)
    expected = [[0, 1, 2, 0, 1, 2, 3, 4, 0, 1], [0, 1, 2, 3, 0, 1, 2, 3, 4, 5]]
    assert positions.tolist() == expected
    assert samples.tolist() == [[0] * 3 + [1] * 5 + [2] * 2, [3] * 4 + [4] * 6]
    # the rotary tables the blocks get are those of these positions (RoPE being relative, the logits
    # alone could not tell)
    model, seen = tiny_model(), []
    model.model.layers[0].register_forward_pre_hook(lambda module, args: seen.append(args[1]))
    model(torch.zeros(2, 10, dtype=torch.long), cu_seqlens=cu)
    cos, _ = gm.rope_cos_sin(torch.tensor(expected), model.cfg.head_dim, model.cfg.rope_theta)
    assert torch.equal(seen[0], cos)


@pytest.mark.parametrize("loss_on,ckpt", [("all", False), ("answer", True)])
def test_packed_gives_the_same_loss_and_gradients_as_one_sample_per_row(loss_on, ckpt):
    """fp32, augmentation on: the loss sum, the target count and every gradient match."""
    samples = TrainingSamples(make_store(12, seed=5), np.arange(12), ROW, aug(grasp_order="random"), seed=3,
                              loss_on=loss_on)
    schedule = PackedSchedule(samples.lengths, ROW, micro_batch=4, grad_accum=1, world_size=1, seed=0)
    (rows,) = schedule.micro_batches(0, 0)
    assert sum(len(r) for r in rows) > len(rows)  # several samples in a row
    epoch = 2
    packed = packed_batch(samples, rows, epoch, ROW)
    unpacked = samples.batch(np.concatenate(rows), epoch)
    results = []
    # The packed batch also as the trainer passes it: with the targets counted on the host (no GPU wait)
    for b, counted in ((packed, None), (packed, packed.num_targets), (unpacked, None)):
        model = tiny_model(activation_checkpointing=ckpt).train()
        loss, count = model(b.input_ids, b.targets, cu_seqlens=b.cu_seqlens, num_targets=counted)
        loss.backward()
        results.append((loss.item(), count.item(), grads(model)))
    (loss_p, n_p, g_p), (loss_c, n_c, g_c), (loss_u, n_u, g_u) = results
    assert n_p == n_c == n_u == packed.num_targets == unpacked.num_targets
    assert loss_c == loss_p and loss_p == pytest.approx(loss_u, rel=1e-6)
    for name in g_u:
        torch.testing.assert_close(g_c[name], g_p[name], atol=0, rtol=0, msg=name)
        # fp32 sums in another order: errors of a few ulps of the gradient's largest entries (~100 here)
        scale = max(1.0, g_u[name].abs().max().item())
        torch.testing.assert_close(g_p[name], g_u[name], atol=2e-6 * scale, rtol=1e-5, msg=name)


@pytest.mark.parametrize("kind", ["sdpa", "flex"])
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")  # on the CPU: its reference code
def test_no_sample_sees_another(kind, packed_attention):
    """Changing one sample's tokens changes its own logits only; each sample's logits are those it has alone."""
    packed_attention(kind)
    seqs = [s.astype(np.int64) for s in make_store(3, seed=7, n_obj=2).seqs]
    model = tiny_model().eval()

    def logits(rows):
        b = collate_packed([[(s, 1) for s in rows]], ROW, V.end)
        with torch.no_grad():
            return model(b.input_ids, cu_seqlens=b.cu_seqlens)[0], b.cu_seqlens.tolist()

    before, cu = logits(seqs)
    changed = [seqs[0], seqs[1].copy(), seqs[2]]
    changed[1][1:-1] = np.random.default_rng(0).integers(V.voxel_base, V.size, len(seqs[1]) - 2)
    after, _ = logits(changed)
    for i, s in enumerate(seqs):
        lo, hi = cu[i], cu[i + 1]
        same = torch.equal(before[lo:hi], after[lo:hi])
        assert same == (i != 1), f"sample {i}"
        with torch.no_grad():
            alone = model(torch.from_numpy(s[None, :-1]))[0]
        torch.testing.assert_close(before[lo:hi], alone, atol=2e-5, rtol=1e-5)


def test_packed_input_errors():
    model = tiny_model()
    b = collate_packed([[(make_store(1).seqs[0].astype(np.int64), 1)]], ROW, V.end)
    with pytest.raises(ModelInputError, match="1-D int32"):
        model(b.input_ids, b.targets, cu_seqlens=b.cu_seqlens.long())
    with pytest.raises(ModelInputError, match="decode with a KV cache"):
        model(b.input_ids[:, :4], cache=model.new_kv_cache(1, 8), cu_seqlens=torch.tensor([0, 4], dtype=torch.int32))
    with pytest.raises(ModelInputError, match="no attention dropout"):
        tiny_model(dropout=0.1).train()(b.input_ids, b.targets, cu_seqlens=b.cu_seqlens)


# -- the schedule -------------------------------------------------------------------------------

def _schedule(n=40, world=1, **kw):
    samples = TrainingSamples(make_store(n, seed=1), np.arange(n), ROW, NOAUG, seed=0)
    args = dict(row_len=ROW, micro_batch=1, grad_accum=2, world_size=world, seed=4)
    return samples, PackedSchedule(samples.lengths, **{**args, **kw})


def test_schedule_is_a_pure_function_of_the_step_and_every_epoch_a_repacking():
    samples, a = _schedule()
    _, b = _schedule()
    assert a.steps_per_epoch >= 2
    epochs = []
    for epoch in range(2):
        seen = []
        for step in range(epoch * a.steps_per_epoch, (epoch + 1) * a.steps_per_epoch):
            micro = a.micro_batches(step, 0)
            assert [[r.tolist() for r in m] for m in micro] == [[r.tolist() for r in m] for m in b.micro_batches(step, 0)]
            rows = [r for m in micro for r in m]
            assert len(rows) == a.global_batch_size and all(samples.lengths[r].sum() - len(r) <= ROW for r in rows)
            seen += [int(k) for r in rows for k in r]
        assert len(seen) == len(set(seen))  # each sample at most once an epoch
        assert len(seen) >= 0.85 * len(samples)  # only the rows past the last full step wait
        epochs.append(seen)
    assert epochs[0] != epochs[1]


def test_ranks_split_a_step_into_balanced_shares():
    samples, s = _schedule(n=60, world=2)
    step_rows = {tuple(r.tolist()) for r in s.global_batch(1)}
    shares = [[r for m in s.micro_batches(1, rank) for r in m] for rank in (0, 1)]
    assert {tuple(r.tolist()) for share in shares for r in share} == step_rows and len(step_rows) == 4
    fills = [sum(int(samples.lengths[r].sum()) for r in share) for share in shares]
    assert abs(fills[0] - fills[1]) <= ROW


def test_loader_resumes_packed_steps_exactly():
    """A loader started at step k (the resumed run) yields what the uninterrupted one does, across an epoch."""
    samples, s = _schedule()
    k, n = s.steps_per_epoch - 1, 3
    with BatchLoader(samples, s, rank=0, start_step=0, prefetch=2) as full, \
            BatchLoader(samples, s, rank=0, start_step=k, prefetch=2) as resumed:
        steps = [next(full) for _ in range(k + n)][k:]
        for a in steps:
            b = next(resumed)
            assert (a.step, a.epoch) == (b.step, b.epoch)
            for x, y in zip(a.micro, b.micro):
                assert torch.equal(x.input_ids, y.input_ids) and torch.equal(x.targets, y.targets)
                assert torch.equal(x.cu_seqlens, y.cu_seqlens) and x.input_ids.shape == (1, ROW)
    assert {st.epoch for st in steps} == {0, 1}


def test_a_sample_that_grows_past_its_room_is_cut_to_fit():
    """Amodal conversion can make a sample longer than the length it was packed by: cut, never overflowing."""
    store = make_store(30, seed=2, n_obj=3)
    samples = TrainingSamples(store, np.arange(30), ROW, aug(amodal_prob=1.0, drop_cell_prob=0.0), seed=0)
    row_len = int(samples.lengths.max())
    s = PackedSchedule(samples.lengths, row_len, micro_batch=4, grad_accum=1, world_size=1, seed=0)
    for step in range(s.steps_per_epoch):
        (rows,) = s.micro_batches(step, 0)
        b = s.batch_of(samples, rows, 0)
        assert b.input_ids.shape == (4, row_len)
    assert samples.stats["cut"] + samples.stats["dropped"] > 0


def test_schedule_and_config_refuse_what_cannot_work():
    samples, _ = _schedule()
    with pytest.raises(DatasetError, match="more than a packed row of 64; raise dataset.pack_length"):
        PackedSchedule(samples.lengths, 64, 1, 1, 1, 0)
    with pytest.raises(DatasetError, match="fewer than one global batch"):
        PackedSchedule(samples.lengths, ROW, 8, 8, 1, 0)
    base = {"dataset": {"max_sequence_length": 4096}}
    assert config_from_dict({"dataset": {"max_sequence_length": 4096, "pack_length": 4096}}).dataset.pack_length == 4096
    for dataset, model, match in [({"pack_length": 4000}, {}, "set it to at least 4095"),
                                  ({"pack_length": -1}, {}, "must be >= 0"),
                                  ({"pack_length": 4096}, {"dropout": 0.1}, "needs model.dropout 0")]:
        with pytest.raises(ConfigError, match=match):
            config_from_dict({"dataset": {**base["dataset"], **dataset}, "model": model})


# -- the GPU kernels ----------------------------------------------------------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("kind", ["varlen", "flex"])
def test_gpu_kernels_match_the_sdpa_path(kind, packed_attention):
    """bf16, compiled blocks: loss and gradients within bf16 noise of the block-mask SDPA path."""
    if kind == "varlen" and gm.varlen_causal is None:
        pytest.skip("this torch has no torch.nn.attention.varlen")
    samples = TrainingSamples(make_store(12, seed=5), np.arange(12), ROW, NOAUG, seed=3)
    (rows,) = PackedSchedule(samples.lengths, ROW, 4, 1, 1, 0).micro_batches(0, 0)
    b = packed_batch(samples, rows, 0, ROW).to("cuda")
    results = []
    for k in ("sdpa", kind):
        packed_attention(k)
        results.append(bf16_loss_and_grads(b, b.cu_seqlens))
    assert_within_bf16_noise(*results)


def bf16_loss_and_grads(b, cu_seqlens) -> tuple[float, dict[str, torch.Tensor]]:
    """The loss and gradients of a bf16 tiny model (head_dim 16: flex's smallest) on the GPU, compiled blocks."""
    model = tiny_model(n_embd=64).cuda().to(torch.bfloat16).train()
    loss, _ = model(b.input_ids, b.targets, cu_seqlens=cu_seqlens)
    loss.backward()
    return loss.float().item(), grads(model)


def assert_within_bf16_noise(reference, result) -> None:
    (ref_loss, ref), (loss, got) = reference, result
    assert loss == pytest.approx(ref_loss, rel=1e-2)
    for name in ref:
        scale = ref[name].float().abs().max().item() + 1e-6
        assert (got[name].float() - ref[name].float()).abs().max().item() <= 0.05 * scale, name


# -- flash-attn-4 (GRASPGPT_ATTENTION=fa4) ------------------------------------------------------

def sdpa_causal(q, k, v):
    """Causal attention of one sequence, (T, H, hd) queries over (T, Hkv, hd) keys: query head h reads
    key head h // (H / Hkv), flash attention's grouping."""
    rep = q.size(1) // k.size(1)
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    y = torch.nn.functional.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                                         is_causal=True)
    return y.transpose(0, 1)


def fake_flash_attn_4(calls: list):
    """flash-attn-4's two functions with its interface (layouts, keyword names, (out, lse) returned),
    computed by SDPA on the CPU; each call is logged with its shapes: what the model passed."""
    def dense(q, k, v, causal=False):
        assert causal and q.dim() == 4
        calls.append(("dense", tuple(q.shape), tuple(k.shape)))
        return torch.stack([sdpa_causal(q[b], k[b], v[b]) for b in range(q.size(0))]), None

    def varlen(q, k, v, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None, causal=False):
        assert causal and q.dim() == 3 and cu_seqlens_q is cu_seqlens_k and cu_seqlens_q.dtype == torch.int32
        assert cu_seqlens_q[-1] == q.size(0) and max_seqlen_q == max_seqlen_k >= int(cu_seqlens_q.diff().max())
        calls.append(("varlen", tuple(q.shape), tuple(k.shape)))
        cu = cu_seqlens_q.tolist()
        return torch.cat([sdpa_causal(q[a:b], k[a:b], v[a:b]) for a, b in zip(cu[:-1], cu[1:])]), None

    return dense, varlen


def test_fa4_attention_is_what_the_sdpa_path_computes(monkeypatch):
    """With GRASPGPT_ATTENTION=fa4, whole rows and packed rows go to flash-attn-4's functions in their
    layouts (grouped key heads unexpanded, a packed batch as one cut sequence), and the loss and every
    gradient are the SDPA path's (fp32, CPU; the real kernels' own test is below, on a GPU)."""
    calls = []
    monkeypatch.setattr(gm, "flash_attn_4", lambda: fake_flash_attn_4(calls))
    monkeypatch.setattr(gm, "fa4_asked", lambda *a: gm.ATTENTION == "fa4")  # its device check wants a GPU
    samples = TrainingSamples(make_store(12, seed=5), np.arange(12), ROW, NOAUG, seed=3)
    (rows,) = PackedSchedule(samples.lengths, ROW, 4, 1, 1, 0).micro_batches(0, 0)
    packed = packed_batch(samples, rows, 0, ROW)
    whole = samples.batch(np.arange(3), 0)
    for kind, b, kwargs in [("varlen", packed, {"cu_seqlens": packed.cu_seqlens}), ("dense", whole, {})]:
        results = []
        for attention in ("auto", "fa4"):
            monkeypatch.setattr(gm, "ATTENTION", attention)
            model = tiny_model().train()
            loss, _ = model(b.input_ids, b.targets, **kwargs)
            loss.backward()
            results.append((loss.item(), grads(model)))
        (ref_loss, ref), (loss, got) = results
        assert loss == pytest.approx(ref_loss, rel=1e-5), kind
        for name in ref:
            torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-6, msg=name)
        B, T = b.input_ids.shape
        q_shape = (B * T, 4, 8) if kind == "varlen" else (B, T, 4, 8)
        assert len(calls) == 2 and set(calls) == {(kind, q_shape, q_shape[:-2] + (2, 8))}, calls  # 2 layers
        calls.clear()


def test_fa4_refuses_clearly_where_it_cannot_run(monkeypatch):
    x = torch.zeros(1, 8, dtype=torch.long)
    monkeypatch.setattr(gm, "ATTENTION", "flash")
    with pytest.raises(gm.ModelConfigError, match="GRASPGPT_ATTENTION='flash'; use one of auto, fa4"):
        tiny_model()(x)
    monkeypatch.setattr(gm, "ATTENTION", "fa4")
    monkeypatch.setattr(gm, "flash_attn_4", lambda: ImportError("libcuda.so.1: cannot open shared object file"))
    with pytest.raises(gm.ModelConfigError, match=r"needs the flash-attn-4 package \(libcuda.so.1: cannot open "
                                                  r"shared object file\): pip install flash-attn-4"):
        tiny_model()(x)
    monkeypatch.setattr(gm, "flash_attn_4", lambda: fake_flash_attn_4([]))
    with pytest.raises(gm.ModelConfigError, match=r"Hopper or Blackwell GPUs in bf16/fp16 \(here: cpu, torch.float32\)"):
        tiny_model()(x, cu_seqlens=torch.tensor([0, 8], dtype=torch.int32))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert gm.fa4_asked(torch.device("cuda"), torch.bfloat16)
    with pytest.raises(gm.ModelConfigError, match="no attention dropout, but dropout=0.1"):
        gm.fa4_asked(torch.device("cuda"), torch.bfloat16, 0.1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(gm.ModelConfigError, match="Hopper or Blackwell"):
        gm.fa4_asked(torch.device("cuda"), torch.bfloat16)
    # decoding's cached steps never ask for it: a prompt and a step run on the CPU with the switch set
    model = tiny_model().eval()
    cache = gm.KVCache(model.cfg, 1, 16)
    with torch.no_grad():
        model(x[:, :4], cache=cache, start_pos=0)
        model(x[:, 4:5], cache=cache, start_pos=4)


@pytest.mark.skipif(not torch.cuda.is_available() or isinstance(gm.flash_attn_4(), Exception)
                    or torch.cuda.get_device_capability()[0] not in (9, 10),
                    reason="needs flash-attn-4 and a Hopper or Blackwell GPU")
@pytest.mark.parametrize("packed", [True, False])
def test_fa4_kernels_match_the_default_kernels(packed, monkeypatch):
    """bf16, compiled blocks, the real flash-attn-4: loss and gradients within bf16 noise of the default."""
    samples = TrainingSamples(make_store(12, seed=5), np.arange(12), ROW, NOAUG, seed=3)
    (rows,) = PackedSchedule(samples.lengths, ROW, 4, 1, 1, 0).micro_batches(0, 0)
    b = (packed_batch(samples, rows, 0, ROW) if packed else samples.batch(np.arange(3), 0)).to("cuda")
    results = []
    for attention in ("auto", "fa4"):
        monkeypatch.setattr(gm, "ATTENTION", attention)
        results.append(bf16_loss_and_grads(b, b.cu_seqlens if packed else None))
    assert_within_bf16_noise(*results)
