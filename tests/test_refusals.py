"""A run that cannot start is refused before it changes anything: one line on rank 0, exit 2 on every
rank, the other ranks quiet, the output directory as it was."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from conftest import Ranks, assert_refused, hold_output_dir, write_config
from graspGPT.data.source import builtin_dataset

pytestmark = pytest.mark.ranks  # every test here starts training ranks


def snapshot(root: Path) -> dict:
    """Every file and directory under root with its bytes and modification time."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def cfg(tmp_path_factory) -> Path:
    return write_config(tmp_path_factory.mktemp("refusals") / "cfg.json", {"trainer": {"max_iters": 2}})


@pytest.mark.parametrize("resume", [[], ["--resume", "auto"]], ids=["fresh", "resume_auto"])
def test_a_held_output_dir_is_refused_and_left_alone(tmp_path, cache_dir, cfg, resume):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text('{"the": "first run"}')
    (out / "checkpoint_iter_5").mkdir()  # the holder's save in progress
    (out / "checkpoint_iter_5" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"x" * 100)
    holder = hold_output_dir(out)
    try:
        before = snapshot(out)
        run = Ranks(2, ["--config", cfg, "--output_dir", out, *resume], cache_dir, tmp_path / "logs")
        assert_refused(run, f"--output_dir {out} is in use by another run", f"pid {holder.pid}, started 20")
        assert snapshot(out) == before
    finally:
        holder.kill()
        holder.wait()


@contextlib.contextmanager
def read_only(path: Path):
    """Root ignores permission bits; the immutable attribute stops it too."""
    if os.geteuid() == 0:
        if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
            pytest.skip("running as root where chattr +i is not allowed: cannot make a read-only directory")
        try:
            yield
        finally:
            subprocess.run(["chattr", "-i", str(path)], check=True)
    else:
        path.chmod(0o555)
        try:
            yield
        finally:
            path.chmod(0o755)


def _dataset(tmp_path: Path) -> Path:
    made = builtin_dataset(8, 0, 0.03, "grasp", 4, root=tmp_path / "made")
    return Path(shutil.copytree(made, tmp_path / "data"))


def _truncate_tokens(d: Path) -> None:
    tokens = d / "tokens.u32"
    os.truncate(tokens, tokens.stat().st_size - 8)


def _wrong_vocab_size(d: Path) -> None:
    meta = json.loads((d / "meta.json").read_text())
    (d / "meta.json").write_text(json.dumps({**meta, "vocab_size": meta["vocab_size"] + 1}))


@pytest.mark.parametrize("case,needle", [
    ("empty_dir", "no *.pth files at its top level"),
    ("plain_file", "a file, not a data set"),
    ("truncated_tokens", "tokens.u32: "),
    ("wrong_vocab_size", "meta.json: vocab_size"),
])
def test_bad_data_is_refused_before_the_output_dir_exists(tmp_path, cache_dir, cfg, case, needle):
    if case == "empty_dir":
        data = tmp_path / "empty"
        data.mkdir()
    elif case == "plain_file":
        data = tmp_path / "notes.txt"
        data.write_text("not a data set\n")
    else:
        data = _dataset(tmp_path)
        (_truncate_tokens if case == "truncated_tokens" else _wrong_vocab_size)(data)
    out = tmp_path / "out"
    run = Ranks(2, ["--config", cfg, "--output_dir", out, "--data_path", data], cache_dir, tmp_path / "logs")
    line = assert_refused(run, str(data), needle)
    assert any(fix in line for fix in ("write the data set again", "give ", "point the data path")), line
    assert not out.exists()


def test_read_only_output_dir_is_refused(tmp_path, cache_dir, cfg):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")
    before = snapshot(out)
    with read_only(out):
        run = Ranks(2, ["--config", cfg, "--output_dir", out], cache_dir, tmp_path / "logs")
        assert_refused(run, f"--output_dir {out}: cannot be written", "choose a writable directory")
    assert snapshot(out) == before


def test_a_busy_rendezvous_port_is_named(tmp_path, cache_dir, cfg):
    """Started without the launcher script (deepspeed, torchrun, several nodes): the port clash is an error."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        run = Ranks(1, ["--config", cfg, "--output_dir", tmp_path / "out"], cache_dir, tmp_path / "logs", port=port)
        assert_refused(run, f"port {port} on 127.0.0.1 is already in use", "--master_port")
    assert not (tmp_path / "out").exists()


def test_flash_attention_4_asked_where_it_is_missing_is_refused_first(tmp_path, cache_dir, cfg):
    """GRASPGPT_ATTENTION=fa4 without the package (no CPU has it) stops the run before its data is read
    (an empty data directory would be the next refusal) and before the output directory exists."""
    empty, out = tmp_path / "empty", tmp_path / "out"
    empty.mkdir()
    run = Ranks(2, ["--config", cfg, "--output_dir", out, "--data_path", empty], cache_dir, tmp_path / "logs",
                hooks={"GRASPGPT_ATTENTION": "fa4"})
    assert_refused(run, "GRASPGPT_ATTENTION=fa4 needs the flash-attn-4 package (No module named 'flash_attn')",
                   "unset GRASPGPT_ATTENTION")
    assert not out.exists()
