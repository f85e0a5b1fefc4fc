import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from graspGPT.data.__main__ import main
from graspGPT.data.grammar import Block, Sample, serialize
from graspGPT.data.storage import TokenStore
from graspGPT.data.vocab import Vocab

REPO = Path(__file__).resolve().parents[1]
VOCAB = Vocab((80, 54, 34))


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "graspGPT.data", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in stderr, stderr
    return lines[0]


def write_upstream(path: Path, n: int, layout_every: int = 0) -> list[np.ndarray]:
    """An upstream .pth file of n grasp samples (every `layout_every`-th one an amodal sample)."""
    rng = np.random.default_rng(0)
    seqs = []
    for i in range(n):
        cells = np.unique(rng.integers(0, VOCAB.dims, size=(10 + i, 3)), axis=0)
        block = Block(VOCAB.object_tag(i), VOCAB.cell_ids(cells))
        sample = Sample(scene=[block], grasps=[Block(block.tag, block.cells[:3])])
        if layout_every and i % layout_every == 0:
            sample.scene, sample.amodal = [Block(VOCAB.incomplete, block.cells)], block.cells
        seqs.append(serialize(sample, VOCAB))
    torch.save([{"raw_tokens": s.tolist(), "ind": -1, "repeat": -1, "volume_dims": np.array([80, 54, 34]),
                 "bbox_min": np.array([-0.3, -0.2, 0.0]), "bbox_max": np.array([0.3, 0.2, 0.25]),
                 "voxel_size": 0.0075} for s in seqs], path)
    return seqs


def test_synth_is_deterministic_and_inspectable(tmp_path):
    args = ["--num_scenes", 20, "--seed", 7, "--voxel_size", 0.03, "--task_mix", "grasp=0.6,amodal=0.2,unseg=0.2"]
    a, b = cli("synth", "--out", tmp_path / "a", *args), cli("synth", "--out", tmp_path / "b", *args)
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    assert "wrote 20 samples" in a.stdout
    for name in ("tokens.u32", "offsets.i64", "meta.json", "val.u8"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    store = TokenStore.open(tmp_path / "a")
    assert len(store) == 20 and store.vocab.dims == (20, 14, 9)
    assert store.verify(full=True).valid_strict == 20
    assert len(store.split(0.5, 0)[1]) == 1  # the recorded 2% split (at least one sample)

    png = tmp_path / "scene.png"
    out = cli("inspect", tmp_path / "a", "--render", png, "--index", 3, "--samples", 1)
    assert out.returncode == 0, out.stderr
    lengths = store.lengths
    lines = {line[:12].strip(): line[12:].strip() for line in out.stdout.splitlines() if not line.startswith("sample ")}
    assert lines["dims"] == "20 x 14 x 9 (2520 cells)"
    assert lines["voxel size"] == "0.03 m"
    assert lines["vocabulary"] == f"V = {store.vocab.size} (0 dynamic tags)"
    assert lines["samples"] == "20" and lines["tokens"] == str(store.num_tokens)
    assert lines["length"].startswith(f"p0 {lengths.min()}  p50 ") and lines["length"].endswith(f"p100 {lengths.max()}")
    tasks = dict(zip(*[iter(lines["tasks"].split())] * 2))
    assert sum(int(v) for v in tasks.values()) == 20 and set(tasks) == {"grasp", "amodal", "unseg"}
    assert lines["grammar"] == "valid 20 / 20 (strict 20)"
    assert lines["split"] == "recorded: 1 val, 19 train"
    sample_lines = [line for line in out.stdout.splitlines() if line.startswith("sample ")]
    assert len(sample_lines) == 1 and sample_lines[0].startswith(f"sample 0 ({lengths[0]} tokens): scene ")
    assert sample_lines[0].endswith(f"... ({lengths[0] - 48} more)")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    missing = cli("inspect", tmp_path / "nothing")
    assert missing.returncode == 2 and "no such data set directory" in one_error_line(missing.stderr)


def test_import_and_inspect_upstream(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    seqs = write_upstream(src / "part_real.pth", 6, layout_every=3)
    assert main(["import", "--src", str(src), "--out", str(tmp_path / "out"), "--real_filter_mode", "amodal_only"]) == 0
    out = capsys.readouterr().out
    assert "part_real.pth: 6 samples, kept 2, filtered 4" in out
    store = TokenStore.open(tmp_path / "out")
    np.testing.assert_array_equal(store[1], seqs[3])

    assert main(["inspect", str(src), "--samples", "0"]) == 0  # a .pth directory is imported on the fly
    out = capsys.readouterr().out
    assert "samples      6" in out and f"tokens       {sum(map(len, seqs))}" in out
    assert "tasks        grasp 4  amodal 2  unseg 0" in out
    assert "split        none recorded" in out and "sample 0" not in out


class EvilPayload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("argv,message", [
    (["inspect", "{tmp}/missing"], "no such data set directory"),
    (["import", "--src", "{tmp}/missing", "--out", "{tmp}/out"], "no such file or directory"),
    (["import", "--src", "{tmp}/evil.pth", "--out", "{tmp}/out"], "not a plain data file"),
    (["synth", "--out", "{tmp}/s", "--num_scenes", "0", "--seed", "0"], "--num_scenes must be at least 1"),
    (["synth", "--out", "{tmp}/s", "--num_scenes", "2", "--seed", "0", "--task_mix", "dance"], "unknown task 'dance'"),
    (["synth", "--out", "{tmp}/s", "--num_scenes", "2", "--seed", "0", "--val_fraction", "1"], "--val_fraction must be in"),
    (["synth", "--out", "{tmp}/data", "--num_scenes", "2", "--seed", "0"], "not empty; pass --overwrite"),
    (["inspect", "{tmp}/data", "--render", "{tmp}/x.png", "--index", "99"], "--index 99 is out of range for 3 samples"),
])
def test_user_errors_exit_2_with_one_line(tmp_path, capsys, argv, message):
    torch.save([EvilPayload(tmp_path / "pwned")], tmp_path / "evil.pth")
    write_upstream(tmp_path / "up.pth", 3)
    assert main(["import", "--src", str(tmp_path / "up.pth"), "--out", str(tmp_path / "data")]) == 0
    capsys.readouterr()
    assert main([a.format(tmp=tmp_path) for a in argv]) == 2
    assert message in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "pwned").exists()


def test_argparse_errors_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["import", "--src", str(tmp_path), "--out", str(tmp_path / "o"), "--real_filter_mode", "sometimes"])
    assert exc.value.code == 2 and "invalid choice: 'sometimes'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["synth", "--out", str(tmp_path / "o")])
    assert exc.value.code == 2 and "--num_scenes" in capsys.readouterr().err
