import builtins
import json
import os
import zipfile

import numpy as np
import pytest
import torch

from graspGPT.data import upstream
from graspGPT.data.grammar import Block, Sample, serialize
from graspGPT.data.storage import TokenStore
from graspGPT.data.upstream import UpstreamError, ensure_toolkit_dataset, import_upstream
from graspGPT.data.vocab import Vocab

DIMS = (80, 54, 34)
VOCAB = Vocab(DIMS)


def make_sequence(vocab: Vocab, rng: np.random.Generator, layout: str = "grasp") -> np.ndarray:
    """A grammar-valid sequence of the given task layout (grasp, amodal, unseg or amodal+unseg)."""
    blocks = []
    for obj in rng.choice(88, 2, replace=False):
        cells = np.unique(rng.integers(0, vocab.dims, size=(int(rng.integers(3, 30)), 3)), axis=0)
        blocks.append(Block(vocab.object_tag(int(obj)), vocab.cell_ids(cells)))
    all_cells = np.unique(np.concatenate([b.cells for b in blocks]))
    sample = Sample(scene=blocks, grasps=[Block(b.tag, b.cells[:3]) for b in blocks])
    if "amodal" in layout:
        sample.scene, sample.amodal = [Block(vocab.incomplete, all_cells[::2])], all_cells
    if "unseg" in layout:
        sample.scene, sample.unseg = [Block(vocab.unlabel, all_cells)], blocks
    return serialize(sample, vocab)


def upstream_sample(ids, voxel_size=0.0075, dims=DIMS, bbox_min=(-0.3, -0.2, 0.0), bbox_max=(0.3, 0.2, 0.25),
                    tensor=False, float_dtype=np.float64) -> dict:
    """One sample exactly as upstream wrote it."""
    ids = np.asarray(ids, dtype=np.int64)
    return {
        "raw_tokens": torch.from_numpy(ids) if tensor else ids.tolist(),
        "ind": -1,
        "repeat": -1,
        "volume_dims": np.array(dims),
        "bbox_min": np.array(bbox_min, dtype=float_dtype),
        "bbox_max": np.array(bbox_max, dtype=float_dtype),
        "voxel_size": np.float64(voxel_size),
    }


def write_pth(path, seqs, **kw):
    torch.save([upstream_sample(s, **kw) for s in seqs], path)
    return path


def sequences(n, seed=0, layout="grasp", vocab=VOCAB):
    rng = np.random.default_rng(seed)
    return [make_sequence(vocab, rng, layout) for _ in range(n)]


def test_import_keeps_ids_identical(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    a, b = sequences(3, seed=1), sequences(2, seed=2, layout="amodal+unseg")
    write_pth(src / "b_file.pth", b, tensor=True)
    write_pth(src / "a_file.pth", a, float_dtype=np.float32)  # float32 bbox still gives dims 80x54x34
    (src / "notes.txt").write_text("ignored")
    report = import_upstream(src, tmp_path / "out")
    store = TokenStore.open(tmp_path / "out")
    assert len(store) == report.num_samples == 5 and report.num_invalid == 0
    for i, ids in enumerate(a + b):  # files in name order
        np.testing.assert_array_equal(store[i], ids)
    assert store.vocab == VOCAB and store.meta["bbox_max"] == [0.3, 0.2, 0.25] and store.meta["voxel_size"] == 0.0075
    assert store.meta["grasp_cells"] == "upstream"  # the research code's grasp encoder, not the scene grid
    assert [f.name for f in report.files] == ["a_file.pth", "b_file.pth"]
    assert "imported 5 of 5 samples from 2 files" in report.summary()
    # One file may be given as the source too.
    import_upstream(src / "b_file.pth", tmp_path / "one")
    assert len(TokenStore.open(tmp_path / "one")) == 2


def test_files_written_under_numpy1_load(tmp_path):
    """numpy 1.x pickles arrays as numpy.core.multiarray._reconstruct; those files must load too."""
    seqs = sequences(2)
    write_pth(tmp_path / "new.pth", seqs)
    with zipfile.ZipFile(tmp_path / "new.pth") as zin, zipfile.ZipFile(tmp_path / "old.pth", "w") as zout:
        for name in zin.namelist():
            data = zin.read(name)
            if name.endswith("data.pkl"):
                assert b"numpy._core.multiarray" in data
                data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
            zout.writestr(name, data)
    import_upstream(tmp_path / "old.pth", tmp_path / "out")
    np.testing.assert_array_equal(TokenStore.open(tmp_path / "out")[1], seqs[1])


@pytest.mark.parametrize("mode,kept", [("allow_all", 4), ("no_amodal_unseg", 1), ("amodal_only", 2),
                                       ("unseg_only", 2), ("skip", 0)])
def test_real_filter_mode(tmp_path, mode, kept):
    src = tmp_path / "src"
    src.mkdir()
    real = [sequences(1, seed=i, layout=layout)[0] for i, layout in enumerate(["grasp", "amodal", "unseg", "amodal+unseg"])]
    write_pth(src / "scenes_real.pth", real)
    write_pth(src / "scenes_synth.pth", sequences(3, layout="amodal+unseg"))  # not real: never filtered
    report = import_upstream(src, tmp_path / "out", real_filter_mode=mode)
    real_report = report.files[0]
    assert real_report.name == "scenes_real.pth" and real_report.skipped == (mode == "skip")
    assert real_report.kept == kept and real_report.filtered == (0 if mode == "skip" else 4 - kept)
    assert report.files[1].kept == 3 and report.num_samples == kept + 3
    store = TokenStore.open(tmp_path / "out")
    assert len(store) == kept + 3
    if mode == "amodal_only":
        np.testing.assert_array_equal(store[0], real[1])
        np.testing.assert_array_equal(store[1], real[3])


def test_unknown_real_filter_mode(tmp_path):
    write_pth(tmp_path / "x.pth", sequences(1))
    with pytest.raises(UpstreamError, match="real_filter_mode 'some' is not one of allow_all"):
        import_upstream(tmp_path / "x.pth", tmp_path / "out", real_filter_mode="some")


class RunsShell:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class RunsEval:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return builtins.eval, (f"open({str(self.marker)!r}, 'w')",)


@pytest.mark.parametrize("payload", [RunsShell, RunsEval])
def test_malicious_pickle_is_refused_without_running(tmp_path, payload):
    marker = tmp_path / "pwned"
    src = tmp_path / "src"
    src.mkdir()
    sample = upstream_sample(sequences(1)[0])
    sample["ind"] = payload(marker)
    torch.save([sample], src / "evil.pth")
    with pytest.raises(UpstreamError, match=r"evil.pth: not a plain data file.*trusted sources"):
        import_upstream(src, tmp_path / "out")
    assert not marker.exists()
    assert not (tmp_path / "out" / "meta.json").exists()


def test_mismatched_geometry_between_files(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    write_pth(src / "a.pth", sequences(2))
    write_pth(src / "b.pth", sequences(2, vocab=Vocab((60, 40, 25))), voxel_size=0.01, dims=(60, 40, 25))
    with pytest.raises(UpstreamError, match=r"b.pth: sample 0: dims \(60, 40, 25\).*disagrees with .*a.pth: sample 0"):
        import_upstream(src, tmp_path / "out")
    assert not (tmp_path / "out" / "meta.json").exists()


def test_voxel_size_disagreeing_with_bbox(tmp_path):
    write_pth(tmp_path / "x.pth", sequences(1), voxel_size=0.01)  # dims say 80x54x34, bbox/0.01 gives 60x40x25
    with pytest.raises(UpstreamError, match=r"x.pth: sample 0: volume_dims \(80, 54, 34\) disagree .* \(60, 40, 25\)"):
        import_upstream(tmp_path / "x.pth", tmp_path / "out")


def test_ids_outside_vocabulary_name_file_and_sample(tmp_path):
    seqs = sequences(3)
    seqs[1] = seqs[1].copy()
    seqs[1][3] = VOCAB.size
    write_pth(tmp_path / "x.pth", seqs)
    with pytest.raises(UpstreamError, match=r"x.pth: sample 1: token 3 has id 147219, outside the vocabulary"):
        import_upstream(tmp_path / "x.pth", tmp_path / "out")


def test_forms_the_research_parser_accepts_are_imported_canonical(tmp_path):
    # The research parser reads these without error: a missing leading 'scene' (its legacy format),
    # tokens after 'end' (it stops there), no 'end' (it reads to the end of the list). Import writes
    # each as its serializer would, and the result is grammar-valid.
    a, b, c, d = sequences(4)
    v = VOCAB
    raw = [a[1:], np.concatenate([b, [v.end, v.end, v.scene]]), c[:-1], d[1:-1]]
    write_pth(tmp_path / "x.pth", raw)
    report = import_upstream(tmp_path / "x.pth", tmp_path / "out")
    store = TokenStore.open(tmp_path / "out")
    for i, want in enumerate([a, b, c, d]):
        np.testing.assert_array_equal(store[i], want)
    assert report.num_invalid == 0 and report.files[0].normalised == 4
    assert "sample 0: 'scene' added in front" in report.summary() and "4 samples normalised" in report.summary()
    assert store.verify(full=True).valid == 4
    # Still refused: no 'end' and no valid reading (a cut file, or one made with another vocabulary).
    write_pth(tmp_path / "z.pth", [a[:-4]])
    with pytest.raises(UpstreamError, match=r"z.pth: sample 0: the last token is .*not 'end'.*another vocabulary"):
        import_upstream(tmp_path / "z.pth", tmp_path / "out3")
    # A research-valid grasp block of fewer than 3 cells and a serial after an amodal cell import as valid.
    e = serialize(Sample(scene=[Block(v.incomplete, v.cell_ids([[1, 2, 3]]))], amodal=v.cell_ids([[1, 2, 3], [1, 2, 4]]),
                         amodal_serials=np.array([v.id_of("<serial9>"), -1]),
                         grasps=[Block(v.incomplete, v.cell_ids([[1, 2, 3], [5, 5, 5]]))]), v)
    write_pth(tmp_path / "y.pth", [e])
    report = import_upstream(tmp_path / "y.pth", tmp_path / "out2")
    assert report.num_invalid == 0 and report.files[0].normalised == 0
    np.testing.assert_array_equal(TokenStore.open(tmp_path / "out2")[0], e)


@pytest.mark.parametrize("content,message", [
    ({"raw_tokens": [1]}, "expected a list of sample dicts"),
    ([], "holds no samples"),
    (["text"], "sample 0: expected a dict"),
    ([{"raw_tokens": [91, 98], "volume_dims": np.array(DIMS)}], r"sample 0: missing keys \['bbox_min', 'bbox_max', 'voxel_size'\]"),
])
def test_malformed_files(tmp_path, content, message):
    torch.save(content, tmp_path / "x.pth")
    with pytest.raises(UpstreamError, match=f"x.pth: {message}"):
        import_upstream(tmp_path / "x.pth", tmp_path / "out")


def test_raw_tokens_must_be_ints(tmp_path):
    sample = upstream_sample(sequences(1)[0])
    sample["raw_tokens"] = [float(t) for t in sample["raw_tokens"]]
    torch.save([upstream_sample(sequences(1)[0]), sample], tmp_path / "x.pth")
    with pytest.raises(UpstreamError, match="x.pth: sample 1: raw_tokens must be a non-empty list"):
        import_upstream(tmp_path / "x.pth", tmp_path / "out")


def test_paths_that_hold_no_data(tmp_path):
    with pytest.raises(UpstreamError, match="no such file or directory"):
        import_upstream(tmp_path / "missing", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UpstreamError, match="empty: no \\*.pth files at its top level"):
        import_upstream(tmp_path / "empty", tmp_path / "out")
    (tmp_path / "empty" / "train").mkdir()
    write_pth(tmp_path / "empty" / "train" / "a.pth", sequences(1))
    with pytest.raises(UpstreamError, match=r"subdirectories \['train'\] hold some"):
        import_upstream(tmp_path / "empty", tmp_path / "out")
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(UpstreamError, match="empty.pth: cannot read as a torch .pth file"):
        import_upstream(tmp_path / "empty.pth", tmp_path / "out")
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    with pytest.raises(UpstreamError, match="junk.pth: not a plain data file"):
        import_upstream(tmp_path / "junk.pth", tmp_path / "out")


def test_categories_shift_ids(tmp_path):
    vocab = Vocab(DIMS, ["mug", "bowl"])
    seqs = sequences(2, vocab=vocab)
    write_pth(tmp_path / "x.pth", seqs)
    with pytest.raises(UpstreamError, match="pass --categories"):
        import_upstream(tmp_path / "x.pth", tmp_path / "out")
    cats = tmp_path / "vocab.json"
    cats.write_text(json.dumps({"categories": ["mug", "bowl"]}))
    import_upstream(tmp_path / "x.pth", tmp_path / "out", categories=cats)
    store = TokenStore.open(tmp_path / "out")
    assert store.vocab == vocab and store.meta["vocab_size"] == VOCAB.size + 2
    np.testing.assert_array_equal(store[0], seqs[0])
    assert store.verify(full=True).valid_strict == 2


def test_grammar_invalid_samples_counted_or_dropped(tmp_path):
    broken = np.array([VOCAB.scene, VOCAB.object_tag(4), VOCAB.end])  # a tag without cells
    write_pth(tmp_path / "x.pth", sequences(2) + [broken])
    report = import_upstream(tmp_path / "x.pth", tmp_path / "kept")
    assert report.num_invalid == 1 and report.num_samples == 3
    assert "sample 2: token 2" in report.files[0].first_invalid and "1 grammar-invalid" in report.summary()
    report = import_upstream(tmp_path / "x.pth", tmp_path / "dropped", drop_invalid=True)
    assert report.num_invalid == 1 and report.num_samples == 2
    assert len(TokenStore.open(tmp_path / "dropped")) == 2


def test_refuses_non_empty_output_before_reading(tmp_path, monkeypatch):
    write_pth(tmp_path / "x.pth", sequences(1))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    monkeypatch.setattr(upstream, "load_pth", lambda p: pytest.fail("read before checking the output"))
    with pytest.raises(ValueError, match="not empty; pass --overwrite"):
        import_upstream(tmp_path / "x.pth", tmp_path / "out")


def test_ensure_toolkit_dataset_imports_once(tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    write_pth(src / "a.pth", sequences(2))
    calls = []
    real_import = upstream.import_upstream
    monkeypatch.setattr(upstream, "import_upstream", lambda *a, **k: calls.append(a) or real_import(*a, **k))
    cache = tmp_path / "cache"
    first = ensure_toolkit_dataset(src, cache, "allow_all")
    assert first.parent == cache and len(TokenStore.open(first)) == 2 and len(calls) == 1
    assert ensure_toolkit_dataset(src, cache, "allow_all") == first and len(calls) == 1  # reused
    assert [p.name for p in cache.iterdir()] == [first.name]  # no temporary directories left
    assert ensure_toolkit_dataset(first, cache, "allow_all") == first  # a toolkit data set is itself
    other = ensure_toolkit_dataset(src, cache, "skip")  # another filter mode is another data set
    assert other != first and len(calls) == 2
    write_pth(src / "a.pth", sequences(3))  # changed file -> imported again
    os.utime(src / "a.pth", ns=(1, 1))
    third = ensure_toolkit_dataset(src, cache, "allow_all")
    assert third not in (first, other) and len(TokenStore.open(third)) == 3


def test_ensure_toolkit_dataset_lost_race(tmp_path, monkeypatch):
    """Another rank finishes the same import first: this one drops its copy and uses the winner's."""
    src = tmp_path / "src"
    src.mkdir()
    write_pth(src / "a.pth", sequences(2))
    cache = tmp_path / "cache"
    real_import = upstream.import_upstream

    def import_and_lose(src_, out, *a, **k):
        report = real_import(src_, out, *a, **k)
        winner = cache / out.name.split(".tmp-")[0].lstrip(".")
        real_import(src_, winner, *a, **k)
        (winner / "winner").write_text("")
        return report

    monkeypatch.setattr(upstream, "import_upstream", import_and_lose)
    final = ensure_toolkit_dataset(src, cache, "allow_all")
    assert (final / "winner").exists() and [p.name for p in cache.iterdir()] == [final.name]
