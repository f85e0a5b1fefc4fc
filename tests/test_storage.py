import json
import pickle

import numpy as np
import pytest

from graspGPT.data.grammar import Block, Sample, serialize
from graspGPT.data.storage import DataChangedError, DatasetWriter, StorageError, TokenStore, split_indices
from graspGPT.data.vocab import Vocab, Workspace

WS = Workspace()
VOCAB = Vocab.for_workspace(WS)


def make_sequence(vocab: Vocab, rng: np.random.Generator, n_cells: int = 20) -> np.ndarray:
    """A grammar-valid grasp-layout sequence with two objects."""
    blocks = []
    for obj in rng.choice(88, 2, replace=False):
        cells = np.unique(rng.integers(0, vocab.dims, size=(n_cells, 3)), axis=0)  # sorted by (x, y, z)
        blocks.append(Block(vocab.object_tag(int(obj)), vocab.cell_ids(cells)))
    grasps = [Block(b.tag, b.cells[:3]) for b in blocks]
    return serialize(Sample(scene=blocks, grasps=grasps), vocab)


def make_samples(n: int, seed: int = 0, vocab: Vocab = VOCAB) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [make_sequence(vocab, rng, int(rng.integers(1, 40))) for _ in range(n)]


def write(path, samples, vocab=VOCAB, **kw):
    with DatasetWriter(path, vocab, WS, source="test", **kw) as w:
        for ids in samples:
            w.add(ids)
    return path


def test_round_trip_memory_mapped(tmp_path):
    samples = make_samples(7)
    write(tmp_path / "d", samples)
    store = TokenStore.open(tmp_path / "d")
    assert len(store) == 7
    assert store.num_tokens == sum(len(s) for s in samples)
    np.testing.assert_array_equal(store.lengths, [len(s) for s in samples])
    assert store.lengths.dtype == np.int64
    for i, s in enumerate(samples):
        np.testing.assert_array_equal(store[i], s)
        assert store[i].dtype == np.uint32
    np.testing.assert_array_equal(store[-1], samples[-1])
    # A sample is a view into the mapped file, not a copy of it.
    assert isinstance(store.tokens, np.memmap)
    assert isinstance(store[3], np.memmap) and np.shares_memory(store[3], store.tokens)
    assert store.vocab == VOCAB and store.workspace.dims == WS.dims
    meta = json.loads((tmp_path / "d" / "meta.json").read_text())
    assert meta["format"] == "graspgpt-tokens" and meta["format_version"] == 1
    assert meta["dims"] == [80, 54, 34] and meta["vocab_size"] == 147219 and meta["token_dtype"] == "uint32"
    assert meta["num_samples"] == 7 and meta["num_tokens"] == store.num_tokens and "split" not in meta
    raw = np.fromfile(tmp_path / "d" / "tokens.u32", dtype="<u4")
    np.testing.assert_array_equal(raw, np.concatenate(samples))
    offsets = np.fromfile(tmp_path / "d" / "offsets.i64", dtype="<i8")
    assert offsets[0] == 0 and offsets[-1] == len(raw) and len(offsets) == 8
    with pytest.raises(IndexError):
        store[7]
    # Sent to another process, a store travels as its path, not as a copy of the tokens.
    blob = pickle.dumps(store)
    assert len(blob) < 1000 and isinstance(pickle.loads(blob)[6], np.memmap)


def test_dynamic_tags_round_trip(tmp_path):
    vocab = Vocab(WS.dims, ["mug", "cup"])
    samples = make_samples(3, vocab=vocab)
    store = TokenStore.open(write(tmp_path / "d", samples, vocab=vocab))
    assert store.vocab == vocab and store.vocab.size == VOCAB.size + 2
    np.testing.assert_array_equal(store[2], samples[2])


def test_writer_streams_to_disk_and_close_is_atomic(tmp_path):
    out = tmp_path / "d"
    w = DatasetWriter(out, VOCAB, WS, source="test")
    w.add(np.full(100_000, VOCAB.voxel_base, dtype=np.int64))
    # The ids are on disk already (up to the file buffer), not held in memory.
    assert (out / "tokens.u32.tmp").stat().st_size >= 4 * 100_000 - 65536
    assert not (out / "meta.json").exists()
    with pytest.raises(StorageError, match="meta.json is missing"):
        TokenStore.open(out)
    w.close()
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "offsets.i64", "tokens.u32"]
    assert len(TokenStore.open(out)) == 1


def test_failed_write_leaves_no_data_set(tmp_path):
    out = tmp_path / "d"
    with pytest.raises(RuntimeError):
        with DatasetWriter(out, VOCAB, WS, source="test") as w:
            w.add(make_samples(1)[0])
            raise RuntimeError("generator crashed")
    assert list(out.iterdir()) == []
    with pytest.raises(StorageError, match="no samples were added"):
        write(tmp_path / "e", [])
    assert not (tmp_path / "e" / "meta.json").exists()


def test_refuses_non_empty_directory_unless_overwrite(tmp_path):
    out = write(tmp_path / "d", make_samples(5))
    with pytest.raises(StorageError, match=r"not empty; pass --overwrite"):
        write(out, make_samples(2))
    assert len(TokenStore.open(out)) == 5  # untouched
    write(out, make_samples(2, seed=1), overwrite=True)
    store = TokenStore.open(out)
    assert len(store) == 2
    np.testing.assert_array_equal(store[1], make_samples(2, seed=1)[1])


def test_add_rejects_bad_ids(tmp_path):
    with DatasetWriter(tmp_path / "d", VOCAB, WS, source="test") as w:
        w.add(make_samples(1)[0])
        bad = make_samples(1)[0].copy()
        bad[4] = VOCAB.size
        with pytest.raises(StorageError, match=r"sample 1: token 4 has id 147219, outside the vocabulary"):
            w.add(bad)
        with pytest.raises(StorageError, match="sample 1: token 0 has id -1"):
            w.add(np.array([-1, VOCAB.end]))
        with pytest.raises(StorageError, match="integer ids"):
            w.add(np.array([91.0, 98.0]))
        with pytest.raises(StorageError, match="non-empty"):
            w.add([])
    assert len(TokenStore.open(tmp_path / "d")) == 1


def _meta(path):
    return json.loads((path / "meta.json").read_text())


def _set_meta(path, **changes):
    meta = _meta(path)
    meta.update(changes)
    (path / "meta.json").write_text(json.dumps(meta))


@pytest.fixture
def dataset(tmp_path):
    return write(tmp_path / "d", make_samples(4))


def test_missing_files(dataset, tmp_path):
    with pytest.raises(StorageError, match="no such data set directory"):
        TokenStore.open(tmp_path / "nope")
    (dataset / "offsets.i64").unlink()
    with pytest.raises(StorageError, match=r"offsets.i64 is missing"):
        TokenStore.open(dataset)
    (dataset / "meta.json").unlink()
    with pytest.raises(StorageError, match=r"meta.json is missing"):
        TokenStore.open(dataset)


def test_truncated_tokens(dataset):
    data = (dataset / "tokens.u32").read_bytes()
    (dataset / "tokens.u32").write_bytes(data[:-4])
    with pytest.raises(StorageError, match=r"tokens.u32: .*truncated"):
        TokenStore.open(dataset)


def test_tokens_truncated_under_an_open_store_are_named_not_a_crash(dataset):
    """Truncating the mapped file in place would make the next read of a lost page kill the process
    (SIGBUS); every read checks the size first. A data set replaced by a rename is no concern: the open
    store keeps reading the file it mapped."""
    store = TokenStore.open(dataset)
    first = store[0].copy()
    (dataset / "tokens.u32").rename(dataset / "old.u32")
    (dataset / "tokens.u32").write_bytes(b"")
    assert (store[0] == first).all()
    (dataset / "old.u32").replace(dataset / "tokens.u32")
    store = TokenStore.open(dataset)
    with open(dataset / "tokens.u32", "r+b") as f:
        f.truncate(8)
    with pytest.raises(DataChangedError, match=r"tokens.u32 shrank from \d+ to 8 bytes while this run was reading it"):
        store[len(store) - 1]


def test_bad_offsets(dataset):
    offsets = np.fromfile(dataset / "offsets.i64", dtype="<i8")
    offsets[[1, 2]] = offsets[[2, 1]]
    offsets.tofile(dataset / "offsets.i64")
    with pytest.raises(StorageError, match=r"offsets.i64: offsets must start at 0 and strictly increase"):
        TokenStore.open(dataset)
    offsets[:-1].tofile(dataset / "offsets.i64")
    with pytest.raises(StorageError, match=r"offsets.i64: .*expected 40"):
        TokenStore.open(dataset)


def test_wrong_version_and_vocab(dataset):
    _set_meta(dataset, format_version=2)
    with pytest.raises(StorageError, match="format_version 2 is not supported"):
        TokenStore.open(dataset)
    _set_meta(dataset, format_version=1, vocab_size=1000)
    with pytest.raises(StorageError, match="vocab_size 1000 does not match dims"):
        TokenStore.open(dataset)
    _set_meta(dataset, vocab_size=VOCAB.size, num_samples=0)
    with pytest.raises(StorageError, match="empty"):
        TokenStore.open(dataset)
    (dataset / "meta.json").write_text("{not json")
    with pytest.raises(StorageError, match="meta.json: unreadable"):
        TokenStore.open(dataset)


def test_verify(tmp_path):
    samples = make_samples(3)
    unsorted = samples[0].copy()
    unsorted[[2, 3]] = unsorted[[3, 2]]  # cells out of order: valid only when not strict
    broken = np.array([VOCAB.scene, VOCAB.object_tag(1), VOCAB.end])  # a tag without cells
    out = write(tmp_path / "d", samples + [unsorted, broken])
    report = TokenStore.open(out).verify(full=True)
    assert (report.num_samples, report.valid, report.valid_strict) == (5, 4, 3)
    assert report.max_id == max(int(s.max()) for s in samples)
    assert TokenStore.open(out).verify().valid is None
    # An id past the vocabulary (a corrupt file) is found and located.
    tokens = np.fromfile(out / "tokens.u32", dtype="<u4")
    tokens[len(samples[0]) + 5] = VOCAB.size + 7
    tokens.tofile(out / "tokens.u32")
    with pytest.raises(StorageError, match="sample 1 has id 147226 at token 5"):
        TokenStore.open(out).verify(chunk=16)


def test_split_is_seeded_and_sorted():
    train, val = split_indices(100, 0.1, seed=3)
    assert len(val) == 10 and len(train) == 90
    assert np.all(np.diff(val) > 0) and np.all(np.diff(train) > 0)
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(100))
    again = split_indices(100, 0.1, seed=3)
    np.testing.assert_array_equal(again[1], val)
    assert not np.array_equal(split_indices(100, 0.1, seed=4)[1], val)
    assert len(split_indices(2, 0.01, 0)[1]) == 1  # at least one validation sample
    assert len(split_indices(3, 0.9, 0)[0]) == 1  # never all of them
    assert len(split_indices(1, 0.5, 0)[1]) == 0
    assert len(split_indices(50, 0.0, 0)[1]) == 0
    with pytest.raises(StorageError, match=r"val_fraction must be in \[0, 1\)"):
        split_indices(10, 1.0, 0)


def test_store_split_random_and_explicit(tmp_path):
    store = TokenStore.open(write(tmp_path / "a", make_samples(10)))
    train, val = store.split(0.2, seed=5)
    np.testing.assert_array_equal(val, split_indices(10, 0.2, 5)[1])
    mask = np.zeros(10, dtype=bool)
    mask[[1, 7]] = True
    store = TokenStore.open(write(tmp_path / "b", make_samples(10), val_mask=mask))
    assert _meta(tmp_path / "b")["split"] == {"val": "val.u8", "num_val": 2}
    train, val = store.split(0.5, seed=123)  # the recorded split wins over the arguments
    assert val.tolist() == [1, 7] and train.tolist() == [0, 2, 3, 4, 5, 6, 8, 9]
    with pytest.raises(StorageError, match="val_mask has 3 entries for 10 samples"):
        write(tmp_path / "c", make_samples(10), val_mask=mask[:3])
    (tmp_path / "b" / "val.u8").write_bytes(b"\x00\x01")
    with pytest.raises(StorageError, match=r"val.u8: expected 10 bytes"):
        TokenStore.open(tmp_path / "b")


def test_grasp_cells_recorded_and_defaulted_for_older_sets(tmp_path):
    store = TokenStore.open(write(tmp_path / "synth", make_samples(2)))
    assert store.meta["grasp_cells"] == "scene_grid" == store.grasp_cells
    up = TokenStore.open(write(tmp_path / "up", make_samples(2), grasp_cells="upstream"))
    assert up.meta["grasp_cells"] == "upstream" == up.grasp_cells
    with pytest.raises(StorageError, match="grasp_cells 'corner' is not a known convention; use one of scene_grid, upstream"):
        write(tmp_path / "bad", make_samples(1), grasp_cells="corner")
    # Written before the field existed: an import said so in its source; everything else was synthetic.
    old = tmp_path / "synth"
    meta = json.loads((old / "meta.json").read_text())
    del meta["grasp_cells"]
    (old / "meta.json").write_text(json.dumps(meta))
    assert TokenStore.open(old).grasp_cells == "scene_grid"
    meta["source"] = "upstream import of /data/real (3 files, real_filter_mode=allow_all, drop_invalid=False): kept 9"
    (old / "meta.json").write_text(json.dumps(meta))
    assert TokenStore.open(old).grasp_cells == "upstream"
    meta["grasp_cells"] = "centre"
    (old / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(StorageError, match="bad geometry or vocabulary.*grasp_cells 'centre'"):
        TokenStore.open(old)


def test_data_identity_tells_a_rewritten_data_set(tmp_path):
    """What a checkpoint records of its data, so a resume can warn when the data set was rewritten."""
    from graspGPT.checkpoint import data_identity

    samples = make_samples(6)
    a = data_identity(TokenStore.open(write(tmp_path / "a", samples)))
    assert a == data_identity(TokenStore.open(write(tmp_path / "b", samples)))  # a copy is the same data
    shorter = samples[:3] + [samples[3][:-1]] + samples[4:]  # one sample one token shorter
    assert a != data_identity(TokenStore.open(write(tmp_path / "c", shorter)))
    assert a["num_samples"] == 6 and a["num_tokens"] == sum(len(s) for s in samples)
