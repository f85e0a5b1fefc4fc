"""The training log's grasp line says how the grasps were decoded and only what was measured."""
from __future__ import annotations

import logging
from types import SimpleNamespace

from graspGPT.config import TrainerConfig
from graspGPT.observe import StepReport, Throughput

GEN = {"grasp_precision": 0.75, "any_tag_precision": 0.75, "grasp_validity": 1.0, "grasp_coverage": 0.9,
       "baseline_precision": 0.25, "baseline_any_tag_precision": 0.26, "baseline_validity": 0.4,
       "baseline_coverage": 0.7, "scenes": 20, "eval_seconds": 2.0}


def report_line(tmp_path, caplog, gen: dict, **trainer) -> str:
    log = logging.getLogger("test_observe")
    wandb = SimpleNamespace(log=lambda *a: None, image=lambda *a: None, finish=lambda: None)
    report = StepReport(TrainerConfig(**trainer), tmp_path, 0, 0, 0, Throughput(1.0, 1, False), log, wandb, {})
    record: dict = {}
    with caplog.at_level(logging.INFO, logger="test_observe"):
        report.grasps(150, dict(gen), record)
    report.close()
    assert record["eval/grasp_precision"] == 0.75 and "eval/eval_seconds" not in record
    return caplog.records[-1].getMessage()


def test_grasp_line_names_the_decoding_and_leaves_out_what_was_not_decoded(tmp_path, caplog):
    line = report_line(tmp_path, caplog, {**GEN, "grammar_grasp_precision": 0.1, "free_valid_rate": 0.5},
                       eval_cell_temperature=0.3)
    assert line.startswith("step 150 grasps (T=1, cells 0.3): precision 0.750")
    assert "grammar mask only: precision 0.100; unmasked valid 0.500; 20 scenes" in line
    line = report_line(tmp_path, caplog, {**GEN, "grammar_grasp_precision": 0.1}, eval_cell_temperature=0.3,
                       eval_independent_grasps=32)  # independent grasps: no free rows
    assert line.startswith("step 150 grasps (T=1, cells 0.3, 32 independent grasps):")
    assert "unmasked" not in line and "nan" not in line and "grammar mask only: precision 0.100" in line
    assert "token cap" not in line
    line = report_line(tmp_path, caplog, {**GEN, "valid_rate": 0.75})  # a quarter did not end: said so
    assert "; 25% of the sequences stopped at the token cap (twice the truth's length + 64) before `end`" in line
