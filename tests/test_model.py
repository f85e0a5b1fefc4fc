import pytest
import torch
import torch.nn.functional as F

from graspGPT.model import (AXIS_KEYS, axis_waves, IGNORE_INDEX, MODEL_PRESETS, GraspGPT, LinearCrossEntropy, GraspGPTConfig,
                            ModelConfigError, ModelInputError, SharedPrefixCache, chunked_cross_entropy, default_kv_heads, fold_axes)

V = 500


def tiny(**kw) -> GraspGPT:
    torch.manual_seed(0)
    args = dict(vocab_size=V, block_size=64, n_layer=2, n_head=4, n_embd=32)
    args.update(kw)
    return GraspGPT(GraspGPTConfig(**args))


def batch(B=2, T=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T), generator=g)
    targets = torch.randint(0, V, (B, T), generator=g)
    return ids, targets


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_grads_close(a, b, atol=1e-5):
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(a[n], b[n], atol=atol, rtol=0, msg=n)


def reference_loss(model, ids, targets):
    logits = model(ids).float()
    return F.cross_entropy(logits.view(-1, V), targets.view(-1), ignore_index=IGNORE_INDEX)


# ---- presets and config ----------------------------------------------------------------------------

def test_default_kv_heads():
    assert [default_kv_heads(h) for h in (12, 3, 25, 20, 8, 16, 1, 6, 15)] == [4, 3, 5, 4, 4, 4, 1, 3, 5]


@pytest.mark.parametrize("model_type", sorted(MODEL_PRESETS))
def test_every_preset_builds(model_type):
    cfg = GraspGPTConfig.from_shape(model_type, vocab_size=147219, block_size=16384)
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd) == MODEL_PRESETS[model_type]
    with torch.device("meta"):
        model = GraspGPT(cfg)
    assert model.num_params() > 0


def test_gpt2_param_count_and_flops():
    with torch.device("meta"):
        model = GraspGPT(GraspGPTConfig.from_shape("gpt2", vocab_size=147219, block_size=16384))
    n = model.num_params()
    assert round(n / 1e6, 1) == 216.9
    assert model.model.embed_tokens.weight.numel() == 147219 * 768
    assert model.flops_per_token(1024) == 6 * n + 12 * 12 * 768 * 1024


def test_from_shape_errors():
    with pytest.raises(ModelConfigError, match="give either model_type or all of n_layer, n_head, n_embd"):
        GraspGPTConfig.from_shape("gpt2", n_layer=3, vocab_size=V, block_size=8)
    with pytest.raises(ModelConfigError, match="give either model_type or all"):
        GraspGPTConfig.from_shape(n_layer=3, n_head=2, vocab_size=V, block_size=8)
    with pytest.raises(ModelConfigError, match="gpt-nano"):
        GraspGPTConfig.from_shape("gpt5", vocab_size=V, block_size=8)
    cfg = GraspGPTConfig.from_shape(n_layer=2, n_head=6, n_embd=48, vocab_size=V, block_size=8)
    assert cfg.n_kv_head == 3


@pytest.mark.parametrize("kw, match", [
    (dict(n_embd=30, n_head=4), "not divisible by n_head"),
    (dict(n_head=4, n_kv_head=3), "not divisible by n_kv_head"),
    (dict(n_embd=12, n_head=4), "odd"),
    (dict(n_layer=0), "n_layer must be a positive integer"),
    (dict(vocab_size=-1), "vocab_size"),
    (dict(loss_chunk_size=0), "loss_chunk_size"),
    (dict(dropout=1.0), "dropout"),
])
def test_shape_errors(kw, match):
    args = dict(vocab_size=V, block_size=64, n_layer=2, n_head=4, n_embd=32)
    args.update(kw)
    with pytest.raises(ModelConfigError, match=match):
        GraspGPTConfig(**args)


def test_input_errors():
    model = tiny()
    ids, targets = batch()
    with pytest.raises(ModelInputError, match="block_size"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ModelInputError, match="targets shape"):
        model(ids, targets[:, :-1])
    bad = targets.clone()
    bad[0, 3] = V
    with pytest.raises(ModelInputError, match="IGNORE_INDEX"):
        model(ids, bad)


# ---- Hugging Face parity ---------------------------------------------------------------------------

@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_matches_hf_qwen2(n_kv_head):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    model = tiny(n_kv_head=n_kv_head).eval()
    with torch.no_grad():  # non-trivial norms and biases so every parameter matters
        for n, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    hf_cfg = Qwen2Config.from_dict(model.to_hf_config(dtype="float32"))
    assert hf_cfg.rope_parameters["rope_theta"] == model.cfg.rope_theta == 1e6  # Qwen2's own default
    assert hf_cfg.num_key_value_heads == n_kv_head and hf_cfg.tie_word_embeddings
    hf = Qwen2ForCausalLM(hf_cfg).float().eval()
    assert set(hf.state_dict()) == set(model.state_dict())
    hf.load_state_dict(model.state_dict(), strict=True)
    ids, _ = batch()
    with torch.no_grad():
        ours, theirs = model(ids), hf(input_ids=ids).logits
    assert (ours - theirs).abs().max().item() < 1e-5


def test_state_dict_keys_and_tying():
    model = tiny(n_layer=1)
    keys = set(model.state_dict())
    expected = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
                "model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight",
                "model.layers.0.self_attn.o_proj.weight"}
    expected |= {f"model.layers.0.self_attn.{x}_proj.{w}" for x in "qkv" for w in ("weight", "bias")}
    expected |= {f"model.layers.0.mlp.{x}_proj.weight" for x in ("gate", "up", "down")}
    assert keys == expected
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.model.layers[0].self_attn.q_proj.bias.abs().sum() == 0
    assert torch.all(model.model.norm.weight == 1)
    assert abs(model.model.embed_tokens.weight.std().item() - 0.02) < 0.002


# ---- coordinate embedding -------------------------------------------------------------------------

GRID = (5, 4, 3)  # 60 voxel ids at the end of the V = 500 vocabulary


def test_coordinate_embedding_rows_are_own_vector_plus_axis_terms():
    model = tiny(voxel_grid=GRID)
    emb = model.model.embed_tokens
    table = emb.table()
    first = V - 60
    for x, y, z in [(0, 0, 0), (4, 3, 2), (2, 1, 0)]:
        i = first + (x * GRID[1] + y) * GRID[2] + z  # the vocabulary's x-major voxel id
        torch.testing.assert_close(table[i], emb.weight[i] + emb.x_axis[x] + emb.y_axis[y] + emb.z_axis[z])
    assert torch.equal(table[:first], emb.weight[:first])  # non-voxel tokens are untouched
    assert {k for k in model.state_dict() if "axis" in k} == set(AXIS_KEYS)
    assert emb.x_axis.std() > 0.01
    with pytest.raises(ModelConfigError, match="voxel_grid"):
        tiny(voxel_grid=(10, 10, 10))  # 1000 cells > V


def test_coordinate_embedding_folds_into_a_plain_model_with_the_same_logits():
    model = tiny(voxel_grid=GRID).eval()
    ids, targets = batch()
    ids[0, :5] = torch.tensor([V - 1, V - 60, V - 7, 3, V - 30])
    plain = tiny().eval()
    plain.load_state_dict(fold_axes(model.state_dict()), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(plain(ids), model(ids), atol=1e-6, rtol=0)
        torch.testing.assert_close(plain(ids, targets)[0], model(ids, targets)[0])
    sd = plain.state_dict()
    assert fold_axes(sd) is sd and AXIS_KEYS[0] not in fold_axes(model.state_dict())  # plain dicts pass through


def test_coordinate_embedding_axis_terms_learn_from_every_voxel():
    """A voxel target trains the axis rows of its coordinates (through input and output), not others."""
    model = tiny(voxel_grid=GRID)
    ids = torch.full((1, 6), 3)
    targets = torch.full((1, 6), IGNORE_INDEX)
    targets[0, 2] = V - 60 + (2 * GRID[1] + 1) * GRID[2] + 0  # voxel (2, 1, 0)
    loss, _ = model(ids, targets)
    loss.backward()
    emb = model.model.embed_tokens
    for axis in (emb.x_axis, emb.y_axis, emb.z_axis):
        assert axis.grad is not None and axis.grad.abs().sum() > 0
    # the softmax pushes every voxel's logit, but the target's coordinates get the extra pull
    assert emb.x_axis.grad[2].norm() > emb.x_axis.grad[0].norm()
    decay = model.configure_param_groups(0.1)[0]["params"]
    assert not any(p is emb.x_axis for p in decay)  # embeddings are never decayed


def test_sinusoidal_start_makes_voxel_rows_their_position():
    """axis_init="sinusoidal" (the default): a voxel's row starts as its position alone, waves of x, y and
    z in the axis terms' own channels, so two cells' rows are more alike the closer the cells; other
    tokens start as noise; the table keeps the normal start's scale and still folds into a plain model."""
    grid, V2 = (20, 12, 9), 20 * 12 * 9 + 40
    model = tiny(voxel_grid=grid, vocab_size=V2, n_embd=48)
    emb = model.model.embed_tokens
    assert torch.count_nonzero(emb.weight[40:]) == 0 and emb.weight[:40].std() > 0.01
    for a, axis in enumerate((emb.x_axis, emb.y_axis, emb.z_axis)):
        torch.testing.assert_close(axis.data, axis_waves(a, axis.size(0), 48, 0.02))
    table = emb.table().detach()
    cell = lambda x, y, z: 40 + (x * grid[1] + y) * grid[2] + z  # noqa: E731 (x-major ids)
    for step in [(1, 0, 0), (0, 1, 0), (0, 0, 1)]:
        alike = [table[cell(2, 2, 2)] @ table[cell(*(2 + k * d for d in step))] for k in (0, 1, 2, 4)]
        assert alike[0] > alike[1] > alike[2] > alike[3]  # falls with the distance along every axis
    assert torch.count_nonzero(emb.x_axis[:, 16:]) == 0 and torch.count_nonzero(emb.y_axis[:, :16]) == 0
    assert 0.01 < table[40:].pow(2).mean().sqrt() < 0.03
    plain = tiny(vocab_size=V2, n_embd=48).eval()
    plain.load_state_dict(fold_axes(model.state_dict()), strict=True)
    ids = torch.arange(200, 224)[None]
    with torch.no_grad():
        torch.testing.assert_close(plain(ids), model.eval()(ids), atol=1e-6, rtol=0)
    noisy = tiny(voxel_grid=grid, vocab_size=V2, n_embd=48, axis_init="normal").model.embed_tokens
    assert noisy.weight[40:].std() > 0.01 and noisy.x_axis[:, 16:].std() > 0.01
    with pytest.raises(ModelConfigError, match="axis_init"):
        tiny(axis_init="fourier")


# ---- chunked loss ----------------------------------------------------------------------------------

@pytest.mark.parametrize("chunk", [4096, 7, 1])
def test_chunked_loss_equals_full_ce(chunk):
    model = tiny(loss_chunk_size=chunk)
    ids, targets = batch()
    targets[0, :5] = IGNORE_INDEX
    targets[1, -9:] = IGNORE_INDEX

    loss_sum, n = model(ids, targets)
    assert loss_sum.dtype == torch.float32 and loss_sum.dim() == 0
    assert n.dtype == torch.long and n.item() == 2 * 24 - 14
    (loss_sum / n).backward()
    g_chunked = grads(model)
    model.zero_grad()
    ref = reference_loss(model, ids, targets)
    ref.backward()
    assert abs((loss_sum / n).item() - ref.item()) < 1e-5
    assert_grads_close(g_chunked, grads(model))


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_fused_linear_cross_entropy_matches_plain_ce_in_fp64(chunk):
    g = torch.Generator().manual_seed(3)
    h = torch.randn(23, 16, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(40, 16, dtype=torch.float64, generator=g, requires_grad=True)
    t = torch.randint(0, 40, (23,), generator=g)
    loss = LinearCrossEntropy.apply(h, w, t, chunk)
    (loss * 3.5).backward()  # a scaled loss, as the trainer's backward of loss_sum * scale
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ref = F.cross_entropy(h @ w.T, t, reduction="sum")
    (ref * 3.5).backward()
    assert loss.dtype == torch.float64 and abs(loss.item() - ref.item()) < 1e-10
    torch.testing.assert_close(gh, h.grad, atol=1e-12, rtol=0)
    torch.testing.assert_close(gw, w.grad, atol=1e-12, rtol=0)


def test_fused_linear_cross_entropy_gradcheck():
    g = torch.Generator().manual_seed(4)
    h = torch.randn(6, 5, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(9, 5, dtype=torch.float64, generator=g, requires_grad=True)
    t = torch.randint(0, 9, (6,), generator=g)
    assert torch.autograd.gradcheck(lambda a, b: LinearCrossEntropy.apply(a, b, t, 4), (h, w))


def test_fused_linear_cross_entropy_bf16_within_bf16_tolerance():
    g = torch.Generator().manual_seed(5)
    h32 = torch.randn(50, 32, generator=g)
    w32 = torch.randn(300, 32, generator=g) * 0.3
    t = torch.randint(0, 300, (50,), generator=g)
    h, w = h32.bfloat16().requires_grad_(), w32.bfloat16().requires_grad_()
    loss = LinearCrossEntropy.apply(h, w, t, 16)
    loss.backward()
    assert loss.dtype == torch.float32 and h.grad.dtype == w.grad.dtype == torch.bfloat16
    hr, wr = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = F.cross_entropy(hr @ wr.T, t, reduction="sum")
    ref.backward()
    assert abs(loss.item() - ref.item()) / ref.item() < 1e-2
    for ours, theirs in ((h.grad, hr.grad), (w.grad, wr.grad)):
        assert ((ours.double() - theirs).norm() / theirs.norm()).item() < 2e-2


def test_fused_loss_only_what_is_needed():
    g = torch.Generator().manual_seed(6)
    h = torch.randn(10, 8, generator=g, requires_grad=True)
    w = torch.randn(20, 8, generator=g)  # frozen weight: no gradient computed or returned for it
    t = torch.randint(0, 20, (10,), generator=g)
    loss, n = chunked_cross_entropy(h, w, t, 3)
    loss.backward()
    assert w.grad is None and h.grad is not None and n.item() == 10
    with torch.no_grad():  # evaluation: the loss alone, the same value
        loss_eval, _ = chunked_cross_entropy(h, w, t, 4)
    assert abs(loss_eval.item() - loss.item()) < 1e-5
    ref = F.cross_entropy(h @ w.T, t, reduction="sum")
    assert abs(loss.item() - ref.item()) < 1e-4


def test_padding_does_not_affect_loss_or_grads():
    model = tiny(loss_chunk_size=5)
    ids, targets = batch(B=1, T=16)
    loss_a, n_a = model(ids, targets)
    loss_a.backward()
    g_a = grads(model)
    model.zero_grad()
    # right-pad with arbitrary ids whose targets are ignored: causal attention keeps earlier positions exact
    pad_ids = torch.cat([ids, torch.randint(0, V, (1, 10))], 1)
    pad_targets = torch.cat([targets, torch.full((1, 10), IGNORE_INDEX)], 1)
    loss_b, n_b = model(pad_ids, pad_targets)
    loss_b.backward()
    assert n_a.item() == n_b.item() == 16
    assert abs(loss_a.item() - loss_b.item()) < 1e-5
    assert_grads_close(g_a, grads(model))


def test_loss_never_keeps_full_logits_for_backward():
    model = tiny(loss_chunk_size=8)
    ids, targets = batch()
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss_sum, _ = model(ids, targets)
    assert saved and not any(shape[-1] == V for shape in saved)  # no (rows, V) logits stored
    loss_sum.backward()


def test_no_targets_gives_zero_loss_with_zero_grads():
    model = tiny()
    ids, targets = batch()
    loss_sum, n = model(ids, torch.full_like(targets, IGNORE_INDEX))
    assert n.item() == 0 and loss_sum.item() == 0.0
    loss_sum.backward()  # still connected to the graph, so every rank runs backward
    assert all(p.grad is not None and p.grad.abs().sum() == 0 for p in model.parameters())


def test_activation_checkpointing_same_loss_and_grads():
    ids, targets = batch()
    results = []
    for ckpt in (False, True):
        model = tiny(activation_checkpointing=ckpt, dropout=0.1, loss_chunk_size=16).train()
        torch.manual_seed(123)
        loss_sum, n = model(ids, targets)
        loss_sum.backward()
        results.append((loss_sum.item(), grads(model)))
    assert abs(results[0][0] - results[1][0]) < 1e-5
    assert_grads_close(results[0][1], results[1][1])


def test_dropout_only_in_training():
    model = tiny(dropout=0.5)
    ids, _ = batch()
    model.eval()
    assert torch.equal(model(ids), model(ids))
    model.train()
    assert not torch.equal(model(ids), model(ids))


# ---- KV cache --------------------------------------------------------------------------------------

@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_kv_cache_decoding_matches_full_forward(n_kv_head):
    model = tiny(n_kv_head=n_kv_head).eval()
    ids, _ = batch(B=2, T=20)
    with torch.no_grad():
        full = model(ids)
    cache = model.new_kv_cache(batch_size=2, max_len=32)
    prompt = 7
    steps = [model.forward_cached(ids[:, :prompt], cache, 0)]
    steps.append(model.forward_cached(ids[:, prompt:prompt + 5], cache, prompt))  # multi-token chunk
    for t in range(prompt + 5, 20):
        steps.append(model.forward_cached(ids[:, t:t + 1], cache, t))
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=0)
    cache = model.new_kv_cache(batch_size=2, max_len=32)
    last = model.forward_cached(ids, cache, 0, last_only=True)
    torch.testing.assert_close(last, full[:, -1:], atol=1e-5, rtol=0)
    with pytest.raises(ModelInputError, match="larger cache"):
        model.forward_cached(ids[:, :13], cache, 20)


def test_left_padded_prompts_decode_as_each_would_alone():
    """Prompts of lengths 9, 4 and 12, left-padded into one batch with a key mask: the last-position logits
    of the prompt and of every later step equal what each prompt gives on its own (RoPE is relative)."""
    model = tiny(voxel_grid=GRID, n_kv_head=2).eval()
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, V, (n,), generator=g) for n in (9, 4, 12)]
    follow = torch.randint(0, V, (3, 6), generator=g)  # the tokens fed after the prompt, per row
    T, L = 12, 20
    ids = torch.zeros(3, T, dtype=torch.long)
    key_mask = torch.ones(3, L, dtype=torch.bool)
    for r, p in enumerate(prompts):
        ids[r, T - len(p):] = p
        key_mask[r, :T - len(p)] = False
    cache = model.new_kv_cache(3, L)
    got = [model.forward_cached(ids, cache, 0, last_only=True, key_mask=key_mask)]
    for t in range(follow.size(1)):
        got.append(model.forward_cached(follow[:, t:t + 1], cache, T + t, key_mask=key_mask))
    got = torch.cat(got, 1)
    assert torch.isfinite(got).all()
    for r, p in enumerate(prompts):
        with torch.no_grad():
            alone = model(torch.cat([p, follow[r]])[None])[0, len(p) - 1:]
        torch.testing.assert_close(got[r], alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("n_kv_head, lengths", [(4, (9, 4, 12)), (2, (9, 4, 12)), (1, (9, 4, 12)), (2, (7,))])
def test_samples_of_left_padded_prompts_share_the_prompts_cache(n_kv_head, lengths):
    """SharedPrefixCache: 3 samples of each prompt (left-padded with a key mask where lengths differ) read
    the prompt's keys once; every sample's logits, for a chunk of 2 tokens and then token by token, equal what
    its own sequence gives alone."""
    model = tiny(voxel_grid=GRID, n_kv_head=n_kv_head).eval()
    g = torch.Generator().manual_seed(6)
    prompts = [torch.randint(0, V, (n,), generator=g) for n in lengths]
    P, K, T, new = len(prompts), 3, max(lengths), 6
    follow = torch.randint(0, V, (P * K, new), generator=g)  # each sample's own tokens
    ids = torch.zeros(P, T, dtype=torch.long)
    key_mask = torch.ones(P, T, dtype=torch.bool)
    for r, p in enumerate(prompts):
        ids[r, T - len(p):] = p
        key_mask[r, :T - len(p)] = False
    key_mask = None if key_mask.all() else key_mask
    prefix = model.new_kv_cache(P, T)
    model.forward_cached(ids, prefix, 0, last_only=True, key_mask=key_mask)
    cache = SharedPrefixCache(prefix, T, K, new, key_mask)
    got = [model.forward_cached(follow[:, :2], cache, T)]
    for t in range(2, new):
        got.append(model.forward_cached(follow[:, t:t + 1], cache, T + t))
    got = torch.cat(got, 1)
    for b in range(P * K):
        p = prompts[b // K]
        with torch.no_grad():
            alone = model(torch.cat([p, follow[b]])[None])[0, len(p):]
        torch.testing.assert_close(got[b], alone, atol=1e-5, rtol=0)
    with pytest.raises(ModelInputError, match="after its prompts"):
        model.forward_cached(follow[:, :1], cache, T - 1)
    # the prompts' keys once, not once per sample; each sample's own (P, key heads, K, positions, head dim)
    assert cache.prefix_k.shape[1] == P and cache.k.shape[1:4] == (P, n_kv_head, K)


# ---- optimizer groups ------------------------------------------------------------------------------

def test_param_groups():
    model = tiny()
    groups = model.configure_param_groups(0.1)
    decay, no_decay = groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decay_names = {names[id(p)] for p in decay["params"]}
    assert all(n.endswith("_proj.weight") for n in decay_names)
    assert not any("norm" in n or "bias" in n or "embed" in n for n in decay_names)
    assert len(decay_names) == 2 * 7
    all_ids = [id(p) for g in groups for p in g["params"]]
    assert len(all_ids) == len(set(all_ids)) == len(list(model.parameters()))
    assert sum(p.numel() for g in groups for p in g["params"]) == model.num_params()
