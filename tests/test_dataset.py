import threading
import time
import types
from itertools import islice

import numpy as np
import pytest
import torch

from graspGPT.data.dataset import (IGNORE_INDEX, AugmentConfig, BatchLoader, BatchSchedule, DatasetError,
                                   TrainingSamples, collate, val_batches)
from graspGPT.data.grammar import Block, Sample, parse, serialize, validate
from graspGPT.data.vocab import Vocab

V = Vocab((10, 8, 6))
NOAUG = AugmentConfig.none()


def aug(**kw) -> AugmentConfig:
    base = dict(shuffle_blocks=True, drop_cell_prob=0.05, max_grasps_per_object=100, grasp_order="sorted",
                amodal_prob=0.0, unseg_prob=0.0)
    return AugmentConfig(**{**base, **kw})


class Store:
    """In-memory stand-in for storage.TokenStore."""

    def __init__(self, seqs, vocab=V):
        self.seqs = [np.asarray(s, dtype=np.uint32) for s in seqs]
        self.lengths = np.array([len(s) for s in self.seqs], dtype=np.int64)
        self.vocab = vocab

    def __len__(self):
        return len(self.seqs)

    def __getitem__(self, i):
        return self.seqs[i]


def make_sample(rng, n_obj=4, cells=(5, 40), grasps=(1, 8), amodal=False) -> Sample:
    """A fully labelled scene: disjoint objects, sorted cells, grasps sorted by first cell."""
    sizes = rng.integers(cells[0], cells[1] + 1, n_obj)
    pool = rng.permutation(V.num_cells)[: sizes.sum()] + V.voxel_base
    tags = rng.choice(88, n_obj, replace=False) + V.object_base
    scene = [Block(int(t), np.sort(c)) for t, c in zip(tags, np.split(pool, np.cumsum(sizes)[:-1]))]
    gs = [Block(int(t), rng.integers(V.voxel_base, V.size, 3)) for t in tags for _ in range(rng.integers(*grasps))]
    gs.sort(key=lambda g: g.cells[0])
    return Sample(scene=scene, amodal=np.sort(pool) if amodal else None, grasps=gs)


def make_store(n, seed=0, **kw):
    rng = np.random.default_rng(seed)
    return Store([serialize(make_sample(rng, **kw), V) for _ in range(n)])


def blockset(blocks):
    return sorted((b.tag, tuple(b.cells.tolist())) for b in blocks)


# -- augmentation -------------------------------------------------------------------------

def test_augmentation_is_deterministic_per_seed_epoch_index():
    store = make_store(20)
    a = TrainingSamples(store, np.arange(20), 10_000, aug(), seed=7)
    b = TrainingSamples(store, np.arange(20)[::-1], 10_000, aug(), seed=7)  # other order, other instance
    changed = 0
    for k in range(20):
        x = a.get(k, 3)
        assert validate(x, V) is None and x[-1] == V.end
        np.testing.assert_array_equal(x, a.get(k, 3))
        np.testing.assert_array_equal(x, b.get(19 - k, 3))
        changed += not np.array_equal(x, a.get(k, 4))
    assert changed >= 18
    c = TrainingSamples(store, np.arange(20), 10_000, aug(), seed=8)
    assert any(not np.array_equal(a.get(k, 3), c.get(k, 3)) for k in range(20))


def test_no_augmentation_returns_the_sample_unchanged():
    store = make_store(5)
    s = TrainingSamples(store, np.arange(5), 10_000, NOAUG, seed=0)
    for k in range(5):
        np.testing.assert_array_equal(s.get(k, 0), store.seqs[k].astype(np.int64))


def test_block_order_is_shuffled_and_blocks_kept():
    rng = np.random.default_rng(1)
    orig = make_sample(rng, n_obj=6)
    s = TrainingSamples(Store([serialize(orig, V)]), [0], 10_000, aug(drop_cell_prob=0.0), seed=0)
    orders = set()
    for epoch in range(20):
        out = parse(s.get(0, epoch), V)
        assert blockset(out.scene) == blockset(orig.scene)
        orders.add(tuple(b.tag for b in out.scene))
    assert len(orders) >= 10


def test_grasps_capped_per_object_and_sorted():
    rng = np.random.default_rng(2)
    orig = make_sample(rng, n_obj=3, grasps=(30, 31))
    s = TrainingSamples(Store([serialize(orig, V)]), [0], 10_000, aug(max_grasps_per_object=5), seed=0)
    originals = {(g.tag, tuple(g.cells.tolist())) for g in orig.grasps}
    picks = set()
    for epoch in range(5):
        out = parse(s.get(0, epoch), V)
        tags, counts = np.unique([g.tag for g in out.grasps], return_counts=True)
        assert sorted(tags.tolist()) == sorted(b.tag for b in orig.scene) and (counts == 5).all()
        firsts = [g.cells[0] for g in out.grasps]
        assert firsts == sorted(firsts)
        got = {(g.tag, tuple(g.cells.tolist())) for g in out.grasps}
        assert got <= originals
        picks.add(frozenset(got))
    assert len(picks) == 5  # a different random subset each epoch


def test_validation_keeps_the_training_cap_as_a_fixed_random_pick():
    # dataset.train_grasps_per_object: validation scores sequences like the training samples (a capped pick,
    # the same every time), not the data's longer ones
    assert AugmentConfig.validation(0) == AugmentConfig.none()
    assert AugmentConfig.validation(5) == AugmentConfig(False, 0.0, 5, "sorted", 0.0, 0.0)
    rng = np.random.default_rng(4)
    origs = [make_sample(rng, n_obj=3, grasps=(30, 31)) for _ in range(4)]
    s = TrainingSamples(Store([serialize(o, V) for o in origs]), np.arange(4), 10_000, AugmentConfig.validation(5),
                        seed=0)
    assert s.lengths.tolist() == [len(s.get(k, 0)) for k in range(4)]
    first_five = 0
    for k, orig in enumerate(origs):
        np.testing.assert_array_equal(s.get(k, 0), s.get(k, 0))
        out = parse(s.get(k, 0), V)
        assert [b.tag for b in out.scene] == [b.tag for b in orig.scene]  # no other augmentation
        for tag in {b.tag for b in orig.scene}:
            kept = [tuple(g.cells.tolist()) for g in out.grasps if g.tag == tag]
            stored = [tuple(g.cells.tolist()) for g in orig.grasps if g.tag == tag]
            assert len(kept) == 5 and set(kept) <= set(stored) and kept == sorted(kept, key=lambda c: c[0])
            first_five += kept == stored[:5]
    assert first_five < 3  # a random pick, not the first grasps of the stored order


@pytest.mark.parametrize("cap", [1, 5, 30, 100])
def test_length_estimate_counts_the_grasp_cap(cap):
    # Packed rows are planned from `lengths`: with the cap they must be the capped samples' lengths, not the stored
    rng = np.random.default_rng(3)
    stored = [serialize(make_sample(rng, n_obj=3, grasps=(10, 40)), V) for _ in range(4)]
    s = TrainingSamples(Store(stored), np.arange(4), 10_000, aug(max_grasps_per_object=cap, drop_cell_prob=0.0),
                        seed=0)
    assert s.lengths.tolist() == [len(s.get(k, 0)) for k in range(4)]
    if cap < 10:
        assert (s.lengths < [len(x) for x in stored]).all()


@pytest.mark.parametrize("shuffle,cap", [(True, 5), (False, None)])
def test_random_grasp_order_is_a_fresh_permutation_per_epoch(shuffle, cap):
    rng = np.random.default_rng(3)
    orig = make_sample(rng, n_obj=3, grasps=(12, 13))
    s = TrainingSamples(Store([serialize(orig, V)]), [0], 10_000,
                        aug(shuffle_blocks=shuffle, max_grasps_per_object=cap, grasp_order="random"), seed=0)
    originals = [(g.tag, tuple(g.cells.tolist())) for g in orig.grasps]
    orders = set()
    for epoch in range(6):
        x = s.get(0, epoch)
        np.testing.assert_array_equal(x, s.get(0, epoch))
        got = [(g.tag, tuple(g.cells.tolist())) for g in parse(x, V).grasps]
        counts = np.unique([t for t, _ in got], return_counts=True)[1]
        assert set(got) <= set(originals) and len(set(got)) == len(got)
        assert (counts == (cap or 12)).all()
        assert [c[0] for _, c in got] != sorted(c[0] for _, c in got)
        orders.add(tuple(got))
    assert len(orders) == 6


def test_cell_drop_rate_sorted_and_never_empties_a_block():
    rng = np.random.default_rng(3)
    orig = make_sample(rng, n_obj=3, cells=(100, 100))
    s = TrainingSamples(Store([serialize(orig, V)]), [0], 10_000, aug(), seed=0)
    total = kept = 0
    for epoch in range(40):
        out = parse(s.get(0, epoch), V)  # strict: cells still sorted
        for b in out.scene:
            src = next(o for o in orig.scene if o.tag == b.tag)
            assert np.isin(b.cells, src.cells).all()
            total, kept = total + len(src.cells), kept + len(b.cells)
    assert 0.04 < 1 - kept / total < 0.06  # 12,000 cells: sd of the rate is 0.002

    tiny = Sample(scene=[Block(V.object_base, [V.voxel_base + 1]), Block(V.object_base + 1, [V.voxel_base + 2, V.voxel_base + 5])])
    s = TrainingSamples(Store([serialize(tiny, V)]), [0], 100, aug(drop_cell_prob=1.0), seed=0)
    for epoch in range(10):
        out = parse(s.get(0, epoch), V)
        sizes = {b.tag: len(b.cells) for b in out.scene}
        assert sizes == {V.object_base: 1, V.object_base + 1: 1}


def test_amodal_conversion():
    store = make_store(10, seed=4, cells=(20, 60))
    s = TrainingSamples(store, np.arange(10), 10_000, aug(amodal_prob=1.0), seed=0)
    for k in range(10):
        orig = parse(store.seqs[k].astype(np.int64), V)
        out = parse(s.get(k, 0), V)
        everything = np.unique(np.concatenate([b.cells for b in orig.scene]))
        np.testing.assert_array_equal(out.amodal, everything)  # complete, unaffected by the cell drop
        assert len(out.scene) == 1 and out.scene[0].tag == V.incomplete
        assert 0 < len(out.scene[0].cells) < len(everything) and np.isin(out.scene[0].cells, everything).all()
        assert out.unseg is None and {g.tag for g in out.grasps} == {V.incomplete}
    assert s.stats["amodal"] == 10


def test_unseg_conversion():
    store = make_store(10, seed=5)
    s = TrainingSamples(store, np.arange(10), 10_000, aug(unseg_prob=1.0, drop_cell_prob=0.0), seed=0)
    for k in range(10):
        orig = parse(store.seqs[k].astype(np.int64), V)
        out = parse(s.get(k, 0), V)
        assert len(out.scene) == 1 and out.scene[0].tag == V.unlabel
        np.testing.assert_array_equal(out.scene[0].cells, np.unique(np.concatenate([b.cells for b in orig.scene])))
        assert blockset(out.unseg) == blockset(orig.scene)
        assert out.amodal is None and {g.tag for g in out.grasps} == {V.unlabel}
    # With cell drop, the segmentation target matches the (dropped) scene it segments.
    s = TrainingSamples(store, np.arange(10), 10_000, aug(unseg_prob=1.0, drop_cell_prob=0.3), seed=0)
    out = parse(s.get(0, 0), V)
    np.testing.assert_array_equal(out.scene[0].cells, np.unique(np.concatenate([b.cells for b in out.unseg])))


def test_conversions_never_both_and_only_for_labelled_scenes():
    store = make_store(200, seed=6)
    s = TrainingSamples(store, np.arange(200), 10_000, aug(amodal_prob=0.4, unseg_prob=0.4), seed=0)
    kinds = []
    for k in range(200):
        out = parse(s.get(k, 0), V)
        assert not (out.amodal is not None and out.unseg is not None)
        kinds.append("amodal" if out.amodal is not None else "unseg" if out.unseg is not None else "none")
    counts = {kind: kinds.count(kind) for kind in ("amodal", "unseg", "none")}
    assert all(c >= 20 for c in counts.values()), counts
    assert s.stats["amodal"] == counts["amodal"] and s.stats["unseg"] == counts["unseg"]
    # Already amodal: not convertible.
    rng = np.random.default_rng(0)
    done = Store([serialize(make_sample(rng, amodal=True), V)])
    s = TrainingSamples(done, [0], 10_000, aug(unseg_prob=1.0), seed=0)
    out = parse(s.get(0, 0), V)
    assert out.unseg is None and all(V.is_object_tag(b.tag) for b in out.scene)


def test_augment_config_checks():
    with pytest.raises(DatasetError, match="amodal_prob \\+ unseg_prob"):
        aug(amodal_prob=0.7, unseg_prob=0.5)
    with pytest.raises(DatasetError, match="max_grasps_per_object"):
        aug(max_grasps_per_object=0)
    with pytest.raises(DatasetError, match="grasp_order must be 'sorted' or 'random', got 'shuffled'"):
        aug(grasp_order="shuffled")
    section = types.SimpleNamespace(shuffle_blocks=False, drop_cell_prob=0.1, max_grasps_per_object=3,
                                    grasp_order="random", amodal_prob=0.2, unseg_prob=0.1, overlong="cut")
    assert AugmentConfig.of(section) == AugmentConfig(False, 0.1, 3, "random", 0.2, 0.1)
    # train_grasps_per_object caps a training sample's grasps below what the data keeps, never above it
    for per_sample, cap in ((0, 3), (2, 2), (5, 3)):
        section.train_grasps_per_object = per_sample
        assert AugmentConfig.of(section).max_grasps_per_object == cap


def test_unparsable_sample_returned_unaugmented_and_counted():
    bad = V.encode(["scene", "object01", (1, 1, 1), "end", "end"])
    s = TrainingSamples(Store([bad]), [0], 100, aug(), seed=0)
    np.testing.assert_array_equal(s.get(0, 0), bad)
    assert s.stats["unparsable"] == 1
    s = TrainingSamples(Store([bad]), [0], 4, aug(), seed=0)
    assert s.get(0, 0) is None and s.stats == {**s.stats, "unparsable": 1, "dropped": 1}


# -- overlong -----------------------------------------------------------------------------

def test_overlong_cut_keeps_whole_sections_and_grasps():
    rng = np.random.default_rng(7)
    orig = make_sample(rng, n_obj=3, cells=(10, 20), grasps=(10, 20), amodal=True)
    ids = serialize(orig, V)
    scene_len = 2 + sum(len(b) for b in orig.scene)
    originals = [(g.tag, tuple(g.cells.tolist())) for g in orig.grasps]
    for max_len in range(scene_len, len(ids) + 1):
        s = TrainingSamples(Store([ids]), [0], max_len, NOAUG, seed=0, overlong="cut")
        out = s.get(0, 0)
        assert len(out) <= max_len and out[-1] == V.end
        p = parse(out, V)
        assert blockset(p.scene) == blockset(orig.scene)
        assert p.amodal is None or np.array_equal(p.amodal, orig.amodal)
        kept = [(g.tag, tuple(g.cells.tolist())) for g in p.grasps or []]
        assert set(kept) <= set(originals)
        assert kept == [g for g in originals if g in set(kept)]  # original (sorted) order
        if p.grasps is not None:
            assert p.grasps  # never an emptied grasp section
            # Tight: one more grasp would not have fitted.
            assert len(out) + 5 > max_len or len(p.grasps) == len(orig.grasps)
        assert s.stats["cut"] == (max_len < len(ids)) and s.stats["dropped"] == 0
    s = TrainingSamples(Store([ids]), [0], scene_len - 1, NOAUG, seed=0, overlong="cut")
    assert s.get(0, 0) is None and s.stats["dropped"] == 1 and s.stats["cut"] == 0


def test_overlong_cut_skips_a_section_that_does_not_fit():
    rng = np.random.default_rng(8)
    orig = make_sample(rng, n_obj=3, cells=(30, 30), grasps=(2, 3), amodal=True)
    ids = serialize(orig, V)
    # Room for the scene and the grasps, not the (larger) amodal section: grasps kept, amodal left out.
    max_len = len(ids) - (3 + len(orig.amodal))
    assert 3 + len(orig.amodal) > 1 + 5 * len(orig.grasps)
    out = parse(TrainingSamples(Store([ids]), [0], max_len, NOAUG, seed=0).get(0, 0), V)
    assert out.amodal is None and len(out.grasps) == len(orig.grasps)


def test_overlong_drop_mode():
    store = make_store(10, seed=9)
    max_len = int(np.median(store.lengths))
    s = TrainingSamples(store, np.arange(10), max_len, NOAUG, seed=0, overlong="drop")
    for k in range(10):
        out = s.get(k, 0)
        assert (out is None) == (store.lengths[k] > max_len)
    assert s.stats["dropped"] == int((store.lengths > max_len).sum()) > 0 and s.stats["cut"] == 0


def test_augmented_samples_respect_max_len():
    store = make_store(30, seed=10, cells=(20, 60), grasps=(5, 30))
    max_len = int(np.percentile(store.lengths, 30))
    s = TrainingSamples(store, np.arange(30), max_len, aug(amodal_prob=0.3, unseg_prob=0.3), seed=0)
    for k in range(30):
        out = s.get(k, 1)
        assert out is None or (len(out) <= max_len and validate(out, V) is None)
    assert s.stats["cut"] > 0


# -- collate ------------------------------------------------------------------------------

def test_collate_shifts_pads_and_keeps_end_as_target():
    rng = np.random.default_rng(0)
    seqs = [np.append(rng.integers(V.voxel_base, V.size, n - 1), V.end) for n in (5, 12, 3)]
    b = collate(seqs + [None], pad_id=V.end)
    assert b.input_ids.shape == b.targets.shape == (3, 16)  # longest input 11 -> 16
    assert b.input_ids.dtype == b.targets.dtype == torch.long
    assert b.input_ids.untyped_storage().data_ptr() != b.targets.untyped_storage().data_ptr()
    for row, s in enumerate(seqs):
        n = len(s) - 1
        assert b.input_ids[row, :n].tolist() == s[:-1].tolist()
        assert b.targets[row, :n].tolist() == s[1:].tolist()
        assert b.targets[row, n - 1] == V.end
        assert (b.targets[row, n:] == IGNORE_INDEX).all() and (b.input_ids[row, n:] == V.end).all()
    assert b.num_targets == 4 + 11 + 2 == int((b.targets != IGNORE_INDEX).sum())
    assert b.num_tokens == 48
    b.input_ids.fill_(0)
    assert b.num_targets == int((b.targets != IGNORE_INDEX).sum())  # writing inputs never touches targets


def test_collate_caps_at_max_len_and_handles_all_dropped():
    s = np.append(np.full(13, V.voxel_base), V.end)
    assert collate([s], V.end, max_len=14).input_ids.shape == (1, 13)
    with pytest.raises(DatasetError, match="longer than max_len"):
        collate([s], V.end, max_len=10)
    empty = collate([None, None], V.end)
    assert empty.input_ids.shape == (1, 8) and empty.num_targets == 0 and (empty.targets == IGNORE_INDEX).all()


def test_loss_on_answer_makes_the_scene_context_only():
    rng = np.random.default_rng(3)
    store = Store([serialize(make_sample(rng, amodal=k == 1), V) for k in range(3)])
    everything = TrainingSamples(store, np.arange(3), 4096, NOAUG, seed=0)
    answer = TrainingSamples(store, np.arange(3), 4096, NOAUG, seed=0, loss_on="answer")
    full, part = everything.batch(np.arange(3), epoch=0), answer.batch(np.arange(3), epoch=0)
    assert torch.equal(full.input_ids, part.input_ids)
    for row in range(3):
        ids = np.asarray(store[row], dtype=np.int64)
        opener = V.amodal if row == 1 else V.detectgrasp
        first = int(np.flatnonzero(ids == opener)[0])  # the scene is ids[:first]
        kept = (part.targets[row] != IGNORE_INDEX).nonzero()[:, 0]
        assert kept.tolist() == list(range(first - 1, len(ids) - 1))  # position t predicts ids[t + 1]
        assert part.targets[row, first - 1] == opener and part.targets[row, len(ids) - 2] == V.end
        assert torch.equal(part.targets[row, kept], full.targets[row, kept])
    assert part.num_targets == int((part.targets != IGNORE_INDEX).sum()) < full.num_targets
    with pytest.raises(DatasetError, match="loss_on must be one of all, answer"):
        TrainingSamples(store, np.arange(3), 4096, NOAUG, seed=0, loss_on="grasps")


def test_collate_first_targets():
    s = np.append(np.arange(V.voxel_base, V.voxel_base + 9), V.end)
    b = collate([s, None, s], V.end, first_targets=[4, None, 1])
    assert b.targets[0].tolist()[:9] == [IGNORE_INDEX] * 3 + s[4:].tolist()
    assert b.targets[1].tolist()[:9] == s[1:].tolist()
    assert b.num_targets == 6 + 9


# -- schedule -----------------------------------------------------------------------------

def test_global_batch_independent_of_world_size():
    lengths = np.random.default_rng(0).integers(150, 5000, 500)
    layouts = [(4, 1), (2, 2), (1, 4)]  # (grad_accum, world) with micro 3: global 12
    scheds = [BatchSchedule(lengths, 3, a, w, seed=5) for a, w in layouts]
    assert {s.steps_per_epoch for s in scheds} == {500 // 12}
    for step in range(0, 3 * scheds[0].steps_per_epoch, 7):
        gb = scheds[0].global_batch(step)
        for s in scheds:
            np.testing.assert_array_equal(s.global_batch(step), gb)
            parts = np.concatenate([m for r in range(s.world_size) for m in s.micro_batches(step, r)])
            assert len(parts) == 12 and np.array_equal(np.sort(parts), np.sort(gb))
            assert all(len(m) == 3 for m in s.micro_batches(step, 0)) and len(s.micro_batches(step, 0)) == s.grad_accum


def test_schedule_epochs_are_permutations_and_deterministic():
    lengths = np.random.default_rng(1).integers(150, 5000, 1000)
    s = BatchSchedule(lengths, 4, 2, 3, seed=11)
    fresh = BatchSchedule(lengths, 4, 2, 3, seed=11)
    spe = s.steps_per_epoch
    epochs = []
    for e in range(3):
        seen = np.concatenate([s.global_batch(e * spe + i) for i in range(spe)])
        assert len(seen) == len(np.unique(seen)) == spe * 24
        epochs.append(seen)
    assert not np.array_equal(epochs[0], epochs[1])
    for step in (0, spe + 3, 2 * spe + 1):  # random access, out of order, as after a resume
        for r in range(3):
            for a, b in zip(s.micro_batches(step, r), fresh.micro_batches(step, r)):
                np.testing.assert_array_equal(a, b)
    other = BatchSchedule(lengths, 4, 2, 3, seed=12)
    assert not np.array_equal(other.global_batch(0), s.global_batch(0))


def test_schedule_too_small_names_sizes():
    with pytest.raises(DatasetError, match="10 training samples.*global batch of 12.*micro_batch 3 x grad_accum 2 x world_size 2"):
        BatchSchedule(np.ones(10), 3, 2, 2, seed=0)


def padding(schedule: BatchSchedule, steps: int) -> float:
    real = padded = 0
    for step in range(steps):
        for r in range(schedule.world_size):
            for m in schedule.micro_batches(step, r):
                n = schedule.lengths[m] - 1
                real += n.sum()
                padded += len(m) * (-(-n.max() // 8) * 8)
    return 1 - real / padded


def test_length_grouping_reduces_padding():
    lengths = np.random.default_rng(2).integers(150, 5001, 24 * 32 * 3)
    grouped = BatchSchedule(lengths, 6, 4, 1, seed=0)
    plain = BatchSchedule(lengths, 6, 4, 1, seed=0, group_by_length=False)
    g, p = padding(grouped, grouped.steps_per_epoch), padding(plain, plain.steps_per_epoch)
    print(f"padding: grouped {g:.4f}, random {p:.4f}")
    assert g < 0.10 and g < p / 3


def test_ranks_get_balanced_work():
    lengths = np.random.default_rng(3).integers(150, 5001, 2000)
    s = BatchSchedule(lengths, 2, 4, 4, seed=0)
    for step in range(5):
        work = [sum(int(lengths[m].max()) for m in s.micro_batches(step, r)) for r in range(4)]
        assert max(work) - min(work) <= 0.05 * max(work)


def test_val_batches_cover_everything_once_and_every_rank_steps_equally():
    lengths = np.random.default_rng(4).integers(150, 5000, 23)
    per_rank = [val_batches(lengths, 2, world_size=3, rank=r) for r in range(3)]
    assert len({len(b) for b in per_rank}) == 1
    allpos = np.concatenate([m for b in per_rank for m in b])
    assert np.array_equal(np.sort(allpos), np.arange(23))
    for b in per_rank:
        for m in b:
            assert list(lengths[m]) == sorted(lengths[m])
    few = np.concatenate(val_batches(lengths, 4, limit=5))
    assert len(few) == len(np.unique(few)) == 5


# -- loader -------------------------------------------------------------------------------

def loader_setup(prefetch=2, start=0, store=None, rank=1):
    store = store or make_store(48, seed=12)
    samples = TrainingSamples(store, np.arange(len(store)), 200, aug(), seed=3)
    sched = BatchSchedule(samples.lengths, 2, 2, 2, seed=3)
    return BatchLoader(samples, sched, rank=rank, start_step=start, prefetch=prefetch)


def same_steps(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        assert (x.step, x.epoch, x.num_targets, x.num_tokens) == (y.step, y.epoch, y.num_targets, y.num_tokens)
        for a, b in zip(x.micro, y.micro):
            assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.targets, b.targets)


def test_loader_resume_and_prefetch_are_exact():
    with loader_setup() as full:
        steps = list(islice(full, 30))  # 6 steps per epoch: five epochs
    assert [s.step for s in steps] == list(range(30)) and steps[-1].epoch == 4
    assert all(len(s.micro) == 2 and s.num_targets == sum(b.num_targets for b in s.micro) for s in steps)
    with loader_setup(start=13) as resumed:
        same_steps(list(islice(resumed, 17)), steps[13:])
    for prefetch in (0, 4):
        with loader_setup(prefetch=prefetch) as other:
            same_steps(list(islice(other, 30)), steps)


def test_loader_padding_fraction_and_wait():
    with loader_setup() as loader:
        steps = list(islice(loader, 10))
        expected = 1 - sum(s.num_targets for s in steps) / sum(s.num_tokens for s in steps)
        assert loader.padding_fraction() == pytest.approx(expected) and 0 < expected < 1
        assert all(s.wait_s >= 0 for s in steps)


def test_a_token_id_outside_the_vocabulary_is_a_one_line_error_naming_the_sample():
    """The loader checks every id on the host, so the model need not check its targets on the GPU."""
    seqs = make_store(6, seed=12).seqs
    seqs[4] = seqs[4].copy()
    seqs[4][3] = V.size + 7
    samples = TrainingSamples(Store(seqs), np.arange(6), 200, aug(), seed=3)
    assert samples.get(3, epoch=0) is not None
    with pytest.raises(DatasetError, match=f"^sample 4: token 3 has id {V.size + 7}, outside the vocabulary "
                                           f"[(]V = {V.size}[)]; the data set is corrupt: write it again"):
        samples.get(4, epoch=0)


class Exploding(Store):
    """Fails on the loader's 11th read (after one read of each sample for the length estimate): rank 1 reads
    4 samples a step, so step 2 fails."""

    reads = 0

    def __getitem__(self, i):
        self.reads += 1
        if self.reads == len(self) + 11:
            raise RuntimeError("disk on fire")
        return super().__getitem__(i)


@pytest.mark.parametrize("prefetch", [0, 3])
def test_loader_reraises_worker_errors(prefetch):
    loader = loader_setup(prefetch=prefetch, store=Exploding(make_store(48, seed=12).seqs))
    got = []
    with pytest.raises(RuntimeError, match="disk on fire"):
        for s in islice(loader, 10):
            got.append(s.step)
    assert got == [0, 1]
    loader.close()


def test_loader_close_is_prompt_with_a_full_queue():
    before = threading.active_count()
    loader = loader_setup(prefetch=1)
    next(loader)
    time.sleep(0.2)  # the worker is now blocked on the full queue
    t0 = time.perf_counter()
    loader.close()
    assert time.perf_counter() - t0 < 1.0
    assert threading.active_count() == before
    with pytest.raises(StopIteration):
        next(loader)
