"""The model record, its one compatibility check and the one loader, in process: a stage-0 checkpoint is
written by hand (DeepSpeed's module file plus toolkit_state.json and COMPLETE), as the trainer writes it.
test_generate.py and test_export.py do the same with checkpoints of real training runs."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from graspGPT import artifact, checkpoint, evaluate, generate
from graspGPT.artifact import ArtifactError, ModelRecord, check_compatible, load_model
from graspGPT.config import Config
from graspGPT.data.storage import DatasetWriter
from graspGPT.data.synth import generate_scenes
from graspGPT.data.vocab import Vocab, Workspace
from graspGPT.export import export
from graspGPT.model import GraspGPT, GraspGPTConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WS = Workspace(voxel_size=0.03)  # dims (20, 14, 9)
VOCAB = Vocab(WS.dims)


def record(vocab: Vocab = VOCAB, workspace: Workspace | None = WS, grasp_cells: str | None = "upstream",
           **model) -> ModelRecord:
    shape = dict(block_size=64, n_layer=2, n_head=2, n_embd=32, n_kv_head=1, rope_theta=5e4, voxel_grid=vocab.dims)
    return ModelRecord(GraspGPTConfig(vocab_size=vocab.size, **{**shape, **model}), vocab, workspace, grasp_cells)


def write_data(path: Path, ws: Workspace = WS, n: int = 3) -> Path:
    with DatasetWriter(path, Vocab.for_workspace(ws), ws, "test") as w:
        for ids in generate_scenes(n, 0, ws, max_grasps_per_object=2):
            w.add(ids)
    return path


def layout1_state(rec: ModelRecord, config: dict) -> dict:
    """toolkit_state.json as the trainer wrote it before the record (its model_shape, vocab.to_meta())."""
    m = rec.model
    shape = {k: getattr(m, k) for k in ("n_layer", "n_head", "n_embd", "n_kv_head", "vocab_size")}
    ws = rec.workspace
    return {"config": config, "model": {**shape, "coordinate_embedding": m.voxel_grid is not None},
            "vocab": rec.vocab.to_meta(), "workspace": {"bbox_min": list(ws.bbox_min), "bbox_max": list(ws.bbox_max),
                                                        "voxel_size": ws.voxel_size, "grasp_cells": rec.grasp_cells}}


def training_config(rec: ModelRecord, data_path: Path | None) -> dict:
    cfg = Config().to_dict()
    cfg["dataset"].update(data_path=str(data_path) if data_path else None, max_sequence_length=rec.model.block_size)
    cfg["model"].update(rope_theta=rec.model.rope_theta)
    return cfg


def write_checkpoint(out: Path, model: GraspGPT, state: dict, step: int = 7) -> Path:
    """A complete ZeRO-0 checkpoint: what engine.save_checkpoint and checkpoint.Saver leave."""
    path = out / checkpoint.tag_for(step)
    path.mkdir(parents=True)
    torch.save({"module": model.state_dict()}, path / "mp_rank_00_model_states.pt")
    (path / checkpoint.STATE_FILE).write_text(json.dumps({"step": step, "world_size": 1, "zero_stage": 0, **state}))
    files = {f.name: f.stat().st_size for f in path.iterdir()}
    (path / checkpoint.MARKER).write_text(json.dumps({"step": step, "files": files}))
    (out / checkpoint.LATEST).write_text(path.name + "\n")
    return path


@pytest.fixture
def trained(tmp_path):
    """(checkpoint, model, data set on its grid): trained on a data directory that is deleted afterwards."""
    rec = record(grasp_cells="scene_grid", block_size=1024)  # room for a whole scene
    torch.manual_seed(0)
    model = GraspGPT(rec.model)
    with torch.no_grad():  # axis terms that matter, so folding them is tested
        for p in model.model.embed_tokens.parameters():
            p.normal_()
    train_data = write_data(tmp_path / "train_data")
    ckpt = write_checkpoint(tmp_path / "out", model, {"config": training_config(rec, train_data), **rec.to_json()})
    shutil.rmtree(train_data)
    return ckpt, model.eval(), write_data(tmp_path / "eval_data")


# -- the record ----------------------------------------------------------------------------
def test_record_round_trip():
    rec = record()
    d = json.loads(json.dumps(rec.to_json()))
    assert d["model"] == {"vocab_size": 2859, "block_size": 64, "n_layer": 2, "n_head": 2, "n_embd": 32, "n_kv_head": 1,
                          "rope_theta": 5e4, "rms_norm_eps": 1e-6, "coordinate_embedding": True}
    assert d["vocab"] == {"dims": [20, 14, 9], "dynamic_tags": [], "vocab_size": 2859, "voxel_base": 339, "end_id": 98}
    assert d["workspace"] == {"bbox_min": [-0.3, -0.2, 0.0], "bbox_max": [0.3, 0.2, 0.25], "voxel_size": 0.03,
                              "grasp_cells": "upstream"}
    back = ModelRecord.from_json(d, "x")
    assert back.to_json() == d and back.model.voxel_grid == (20, 14, 9) and back.workspace == WS
    assert rec.folded().to_json()["model"]["coordinate_embedding"] is False
    assert ModelRecord.from_json({**d, "workspace": None}, "x").grasp_cells is None


def test_layout1_checkpoint_state_reads_as_the_same_record(tmp_path):
    rec = record()
    old = {"step": 3, "world_size": 1, "zero_stage": 2, **layout1_state(rec, training_config(rec, None))}
    assert ModelRecord.of_state(old, "x").to_json() == rec.to_json()
    # and resumes: plan_resume checks it against the run like a new one
    path = tmp_path / "out" / "checkpoint_iter_3"
    path.mkdir(parents=True)
    (path / checkpoint.STATE_FILE).write_text(json.dumps(old))
    (path / checkpoint.MARKER).write_text(json.dumps({"step": 3, "files": {}}))
    assert checkpoint.plan_resume("auto", path.parent, 1, 2, rec.check_resume).path == path
    with pytest.raises(ArtifactError, match="model.rope_theta is 50000.0 in the checkpoint but 10000.0 in this run"):
        checkpoint.plan_resume("auto", path.parent, 1, 2, record(rope_theta=1e4).check_resume)


def test_layout1_grasp_cells_from_the_training_data(tmp_path):
    """Layout-1 checkpoints from before grasp_cells was recorded: decided from the training data."""
    box = {"bbox_min": [-0.3, -0.2, 0.0], "bbox_max": [0.3, 0.2, 0.25], "voxel_size": 0.03}

    def cells(data_path, **extra):
        state = {"config": {"dataset": {"data_path": data_path, "synthetic_voxel_size": 0.03}}, **extra}
        ws = artifact._layout1_workspace(state, VOCAB)
        return ws and ws["grasp_cells"]

    assert cells(None, workspace=box) == "scene_grid"
    assert cells(None) == "scene_grid"
    pth = tmp_path / "pth"
    pth.mkdir()
    (pth / "a.pth").write_bytes(b"")
    assert cells(str(pth), workspace=box) == "upstream"
    imported = tmp_path / "imported"
    imported.mkdir()
    (imported / "meta.json").write_text(json.dumps({**box, "source": "upstream import of /x (1 files)"}))
    assert cells(str(imported), workspace=box) == "upstream"
    assert cells(str(tmp_path / "moved"), workspace=box) is None
    assert cells(str(tmp_path / "moved")) is None  # no workspace recorded, data gone: unknown
    assert cells(None, workspace={**box, "grasp_cells": "upstream"}) == "upstream"  # recorded wins


@pytest.mark.parametrize("edit,needle", [
    (lambda d: d["vocab"].update(vocab_size=2860), "vocab_size 2860"),
    (lambda d: d["workspace"].update(voxel_size=0.02), "workspace grid (30, 20, 13) differs"),
    (lambda d: d["workspace"].update(grasp_cells="corner"), "grasp_cells 'corner'"),
    (lambda d: d["model"].pop("n_head"), "n_head"),
    (lambda d: d["model"].update(n_embd=33), "n_embd=33 is not divisible"),
])
def test_a_bad_record_is_named(edit, needle):
    d = record().to_json()
    edit(d)
    with pytest.raises(ArtifactError, match=r"^src/toolkit_state.json: incomplete or inconsistent model record") as e:
        ModelRecord.from_json(d, "src/toolkit_state.json")
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_one_check_names_every_mismatch_on_one_line():
    ours = record()
    check_compatible(record(block_size=4096), ours, "src", "A", "B", "fix")  # RoPE: any length
    check_compatible(record(workspace=None, grasp_cells=None), ours, "src", "A", "B", "fix")  # data frame: not weights
    tags = [f"object{i}" for i in range(100, 108)]
    with pytest.raises(ArtifactError) as e:
        check_compatible(record(Vocab(WS.dims, tags), n_embd=64, voxel_grid=None), ours, "src", "A", "B", "Fix it.")
    assert str(e.value) == (
        "src: A does not fit B: model.vocab_size is 2867 in A but 2859 in B; model.n_embd is 64 in A but 32 in B; "
        "model.coordinate_embedding is false in A but true in B; vocabulary dynamic_tags is "
        "['object100', 'object101', 'object102', ... 8 in all] in A but [] in B. Fix it.")
    with pytest.raises(ArtifactError, match=r"^src: A does not fit B: vocabulary dims is \[20, 14, 9\] in A but "
                                            r"\[30, 20, 13\] in B. fix$"):
        check_compatible(ours, Vocab((30, 20, 13)), "src", "A", "B", "fix")  # a data set: its vocabulary only


# -- the loader: a checkpoint alone is enough -------------------------------------------------
def test_export_evaluate_generate_from_a_checkpoint_whose_data_was_deleted(trained, tmp_path, capsys):
    ckpt, model, data = trained
    x = torch.randint(0, VOCAB.size, (2, 20), generator=torch.Generator().manual_seed(0))
    loaded, meta = load_model(ckpt.parent)  # OUTPUT: follows latest
    with torch.no_grad():
        assert (loaded(x) - model(x)).abs().max().item() < 1e-4  # the axis terms folded into a plain table
    assert loaded.cfg.voxel_grid is None and loaded.cfg.rope_theta == 5e4 and loaded.cfg.n_kv_head == 1
    assert meta["workspace"]["grasp_cells"] == "scene_grid" and meta["step"] == 7
    assert meta["model"]["coordinate_embedding"] is False  # as exported

    exported = tmp_path / "exported"
    assert export(ckpt, exported) == meta
    again, meta2 = load_model(exported)
    assert meta2 == meta
    for (name, a), b in zip(loaded.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name

    for source in (ckpt, exported):
        code = generate.main(["--checkpoint", str(source), "--data", str(data), "--index", "0", "--num_samples", "1",
                              "--max_new_tokens", "12", "--out", str(tmp_path / "gen"), "--device", "cpu"])
        assert code == 0 and "note:" not in capsys.readouterr().err
        assert json.loads((tmp_path / "gen" / "grasps.json").read_text())["workspace"]["grasp_cells"] == "scene_grid"
        code = evaluate.main(["--checkpoint", str(source), "--data", str(data), "--split", "all", "--num_scenes", "1",
                              "--no_free", "--device", "cpu"])
        assert code == 0, capsys.readouterr().err


def test_old_layout_checkpoint_loads_the_same(trained):
    ckpt, _, _ = trained
    new_model, new_meta = load_model(ckpt)
    state = json.loads((ckpt / checkpoint.STATE_FILE).read_text())
    rec = ModelRecord.of_state(state, "x")
    (ckpt / checkpoint.STATE_FILE).write_text(json.dumps({**state, **layout1_state(rec, state["config"])}))
    old_model, old_meta = load_model(ckpt)
    assert old_meta == new_meta
    for (name, a), b in zip(new_model.state_dict().items(), old_model.state_dict().values()):
        assert torch.equal(a, b), name


def test_an_incompatible_checkpoint_is_refused_in_one_line(trained, tmp_path, capsys):
    ckpt, _, _ = trained
    other = write_data(tmp_path / "fine", Workspace(voxel_size=0.02))
    for cli in (generate, evaluate):
        args = ["--checkpoint", str(ckpt), "--data", str(other), "--device", "cpu"]
        assert cli.main(args + (["--index", "0"] if cli is generate else [])) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: {ckpt}: the model does not fit the data set: ")
        assert "vocabulary dims is [20, 14, 9] in the model but [30, 20, 13] in the data set" in err[0]
        assert str(other) in err[0]
    # --init_from: the one check again, before any weight is copied
    target = GraspGPT(record(n_layer=3).model)
    with pytest.raises(ArtifactError, match=r"the export does not fit this model: model.n_layer is 2 in the export "
                                            r"but 3 in this model\. Use the model shape"):
        artifact.load_hf_weights(target, _export(ckpt, tmp_path / "exported"))


def _export(ckpt: Path, out: Path) -> Path:
    export(ckpt, out)
    return out
