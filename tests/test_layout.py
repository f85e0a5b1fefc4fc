"""The package's layering, measured from the source by bench/code_map.py (docs/DESIGN.md quotes it)."""
from __future__ import annotations

import importlib.util

import pytest

from conftest import REPO

spec = importlib.util.spec_from_file_location("code_map", REPO / "bench" / "code_map.py")
code_map = importlib.util.module_from_spec(spec)
spec.loader.exec_module(code_map)

COMMAND_LINE = {"graspGPT.data.__main__", "graspGPT.evaluate", "graspGPT.export", "graspGPT.generate",
                "graspGPT.train_deepspeed"}


def test_the_command_line_modules_are_the_documented_ones():
    assert set(code_map.command_line_modules()) == COMMAND_LINE


def test_no_library_module_imports_a_command_line_module():
    assert code_map.library_imports_of_command_line() == []


def test_command_line_modules_share_only_library_modules():
    """The trainer, generate, evaluate and export import no command line: decoding, evaluation and
    artifact are library modules."""
    assert code_map.command_line_imports_of_command_line() == []


def test_the_format_is_numpy_only():
    """One mask path: the grammar gives allowed sets, decoding (decoding.allowed_masks) makes tensors of them."""
    imported = code_map.external_imports(REPO / "graspGPT" / "data" / "grammar.py")
    assert "torch" not in imported and "numpy" in imported


def test_every_module_is_in_the_design_doc():
    design = (REPO / "docs" / "DESIGN.md").read_text()
    missing = [m for m, path in code_map.modules().items()
               if path.name != "__init__.py" and f"{path.relative_to(REPO / 'graspGPT').as_posix()}" not in design]
    assert not missing, missing


def _bench_train():
    import sys
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import bench_train
    finally:
        sys.path.remove(str(REPO / "bench"))
    return bench_train


def test_the_benchmark_baseline_takes_the_engines_call_and_scores_like_ours():
    """The trainer's step calls the model as (ids, targets, cu_seqlens=...): the transformers baseline takes that
    call (unpacked rows only) and gives our model's loss sum and count with the same weights."""
    import torch
    bench_train = _bench_train()
    mcfg = bench_train.model_config("gpt-nano", vocab_size=97, block_size=24)
    ours = bench_train.build_model("fast", mcfg, torch.device("cpu"))
    theirs = bench_train.build_model("baseline", mcfg, torch.device("cpu"), weights=ours.state_dict())
    ids = torch.randint(0, 97, (2, 24))
    targets = torch.randint(0, 97, (2, 24))
    targets[0, :5] = -100
    with torch.no_grad():
        (a, n), (b, m) = ours(ids, targets, cu_seqlens=None), theirs(ids, targets, cu_seqlens=None)
    assert int(n) == int(m) == 43
    torch.testing.assert_close(a.float(), b.float(), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="one sample per row"):
        theirs(ids, targets, cu_seqlens=torch.tensor([0, 10, 48], dtype=torch.int32))


def test_the_benchmark_takes_a_custom_shape_as_layers_x_heads_x_width():
    bench_train = _bench_train()
    mcfg = bench_train.model_config("6x4x256", vocab_size=97, block_size=24)
    assert (mcfg.n_layer, mcfg.n_head, mcfg.n_embd, mcfg.head_dim) == (6, 4, 256, 64)
    assert (bench_train.model_config("gpt-mini", vocab_size=97, block_size=24).head_dim) == 32


def test_the_cce_switch_without_its_package_is_a_one_line_error():
    bench_train = _bench_train()
    try:
        import cut_cross_entropy  # noqa: F401
        pytest.skip("cut-cross-entropy is installed here")
    except ImportError:
        pass
    with pytest.raises(SystemExit, match="^error: [+]cce needs the cut-cross-entropy package"):
        bench_train.apply_switches("fast+cce")
    assert bench_train.gm.chunked_cross_entropy is bench_train.DEFAULTS["loss"]


def test_the_benchmark_runs_the_trainers_engine_and_step():
    """bench/bench_train.py measures the trainer's step: no engine, step or DeepSpeed config of its own."""
    bench_train = _bench_train()
    import graspGPT.engine as engine

    assert bench_train.build_engine is engine.build_engine and bench_train.train_step is engine.train_step
    source = (REPO / "bench" / "bench_train.py").read_text() + (REPO / "bench" / "loss_curves.py").read_text()
    assert "deepspeed.initialize" not in source and "engine.backward" not in source
    cfg, ds = bench_train.bench_config(zero=2, micro=2, accum=4, world=1, on_gpu=False, overrides=("a.b=1",))
    assert (ds.config["train_batch_size"], ds.config["gradient_accumulation_steps"], ds.zero_stage) == (8, 4, 2)
    assert ds.config["gradient_clipping"] == 2.0 and ds.config["optimizer"]["params"]["fused"] is True
    assert ds.config["a"] == {"b": 1} and cfg.trainer.lr_schedule == "constant" and cfg.trainer.warmup_iters == 0
