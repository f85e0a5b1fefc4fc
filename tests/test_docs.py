"""Every command and config snippet that README.md and the guide show is accepted as written."""
from __future__ import annotations

import importlib
import json
import os
import re
import shlex
from pathlib import Path

import pytest

from conftest import REPO

DOCS = [REPO / "README.md", REPO / "DeepSpeed_Training_Guide.md"]
LAUNCHER_VALUE_FLAGS = {"--hostfile", "--num_nodes", "--master_addr", "--master_port", "--include", "--exclude",
                        "--node_rank", "--launcher", "--num_gpus"}
LAUNCHER_BARE_FLAGS = {"--no_ssh", "--no_ssh_check", "--no_local_rank"}
MODULE_CLIS = {"graspGPT.data": "graspGPT.data.__main__", "graspGPT.export": "graspGPT.export",
               "graspGPT.generate": "graspGPT.generate", "graspGPT.evaluate": "graspGPT.evaluate"}


def blocks(path: Path, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", path.read_text(), flags=re.S)


def shell_commands(path: Path) -> list[tuple[str, list[str]]]:
    """(working directory relative to the repo, argv) for each command of the bash blocks."""
    out = []
    for block in blocks(path, "bash"):
        cwd = "."
        text = block.replace("\\\n", " ")
        for line in text.splitlines():
            line = line.split(" #")[0].strip()
            if not line or line.startswith("#"):
                continue
            for part in line.split("&&"):
                argv = shlex.split(part)
                while argv and re.fullmatch(r"[A-Z_]+=\S*", argv[0]):
                    argv = argv[1:]  # environment assignments
                if argv[:1] == ["cd"]:
                    cwd = os.path.normpath(os.path.join(cwd, argv[1]))
                elif argv:
                    out.append((cwd, argv))
    return out


def training_args(argv: list[str]) -> list[str] | None:
    """The arguments that reach train_deepspeed.py, or None if the command doesn't train."""
    if Path(argv[0]).name == "run_deepspeed_training.sh":
        rest = argv[1:]
        if rest and rest[0].isdigit():
            rest = rest[1:]
    elif argv[0] == "deepspeed":
        script = next(i for i, a in enumerate(argv) if a.endswith("train_deepspeed.py"))
        return argv[script + 1:]
    elif len(argv) > 1 and argv[1].endswith("train_deepspeed.py"):
        return argv[2:]
    else:
        return None
    args, i = [], 0
    while i < len(rest):
        flag = rest[i].split("=")[0]
        if flag in LAUNCHER_VALUE_FLAGS:
            i += 1 if "=" in rest[i] else 2
        elif flag in LAUNCHER_BARE_FLAGS:
            i += 1
        else:
            args.append(rest[i])
            i += 1
    return args


ALL = [(doc.name, cwd, argv) for doc in DOCS for cwd, argv in shell_commands(doc)]


def test_the_docs_show_commands():
    names = {a[0] for _, _, a in ALL}
    assert {"./run_deepspeed_training.sh", "deepspeed", "python"} <= names


@pytest.mark.parametrize("doc,cwd,argv", [a for a in ALL if training_args(a[2]) is not None],
                         ids=lambda v: " ".join(v) if isinstance(v, list) else str(v))
def test_training_command_is_accepted(doc, cwd, argv, monkeypatch):
    from graspGPT.config import load_config
    from graspGPT.ds_config import load_deepspeed_json

    monkeypatch.chdir(REPO / cwd)
    cfg = load_config(training_args(argv))  # raises ConfigError on any unknown flag, key or bad value
    load_deepspeed_json(cfg.deepspeed.config)
    script = argv[0] if argv[0].endswith(".sh") else next((a for a in argv if a.endswith("train_deepspeed.py")), None)
    assert script and (REPO / cwd / script).is_file(), f"{script} does not exist from {cwd}"


@pytest.mark.parametrize("doc,cwd,argv", [a for a in ALL if a[2][:2] == ["python", "-m"] and a[2][2] in MODULE_CLIS],
                         ids=lambda v: " ".join(v) if isinstance(v, list) else str(v))
def test_module_command_parses(doc, cwd, argv):
    module = importlib.import_module(MODULE_CLIS[argv[2]])
    module.build_parser().parse_args(argv[3:])  # argparse exits on an unknown flag or a bad choice


def test_json_snippets_are_valid():
    from graspGPT.config import config_from_dict

    snippets = [json.loads(b) for doc in DOCS for b in blocks(doc, "json")]
    assert snippets
    for s in snippets:
        if "zero_optimization" in s or "fp16" in s or "bf16" in s:
            continue  # DeepSpeed fragments, merged by the user into deepspeed_config.json
        config_from_dict(s)


def test_guide_parameter_table_matches_the_parser():
    from graspGPT.config import build_parser

    first_cells = re.findall(r"^\| (`--[^|]+)\|", (REPO / "DeepSpeed_Training_Guide.md").read_text(), flags=re.M)
    table_flags = {f for cell in first_cells for f in re.findall(r"`(--[a-z_]+)`", cell)}
    parser_flags = {o for a in build_parser()._actions for o in a.option_strings if o.startswith("--")}
    assert table_flags and table_flags <= parser_flags
    assert parser_flags - table_flags <= {"--help", "--local_rank"}, parser_flags - table_flags


REFERENCE_DOCS = [*DOCS, *sorted((REPO / "docs").glob("*.md")), REPO / "bench" / "NOTES.md"]


def test_cited_repository_files_exist():
    """Paths the docs cite under bench/results/ and docs/ resolve inside the repository (globs must match)."""
    cited = {(doc.name, m) for doc in REFERENCE_DOCS
             for m in re.findall(r"(?:bench/results|docs)/[\w.*/-]+", doc.read_text())}
    assert cited
    missing = [(doc, path) for doc, path in sorted(cited) if not list(REPO.glob(path.rstrip("/.")))]
    assert not missing, missing


def test_no_reference_outside_the_repository():
    """The format reference is docs/FORMAT.md; nothing points at the design notes outside the repository."""
    sources = [*REFERENCE_DOCS, *REPO.glob("graspGPT/**/*.py"), *REPO.glob("tests/*.py"), *REPO.glob("bench/*.py")]
    outside = [str(p.relative_to(REPO)) for p in sources
               if re.search(r"shared/design|graspgpt-format\.md|format page", p.read_text()) and p.name != "test_docs.py"]
    assert not outside, outside
