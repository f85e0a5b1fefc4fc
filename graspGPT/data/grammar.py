"""The GraspGPT token grammar: parse, validate and serialize sequences.

    sequence  ::= scene amodal? unseg? grasps? "end"
    scene     ::= "scene" block*
    block     ::= tag cell+
    cell      ::= VOXEL SERIAL?
    amodal    ::= "amodal" "unlabel" cell+ "endamodal"
    unseg     ::= "segment" (OBJTAG cell+)* "endunseg"
    grasps    ::= "detectgrasp" ("grasp" tag cell+)*

Parsing walks only the structural tokens (tags and commands); runs of cells
between them are sliced out with numpy, so a 13k-token sample parses in about
a millisecond.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .vocab import Vocab

GRASP_CELLS = 3  # left finger, right finger, gripper base


class GrammarError(ValueError):
    """A sequence that breaks the grammar, with the token position and the rule."""

    def __init__(self, position: int, rule: str, message: str):
        self.position, self.rule = position, rule
        super().__init__(f"token {position}: {message} (rule: {rule})")


@dataclass
class Block:
    """A tag followed by its cells (voxel ids); `serials[i]` is the serial id after cell i, or -1."""

    tag: int
    cells: np.ndarray
    serials: np.ndarray | None = None

    def __post_init__(self):
        self.cells = np.asarray(self.cells, dtype=np.int64)

    def __len__(self) -> int:  # tokens when serialized
        extra = 0 if self.serials is None else int((self.serials >= 0).sum())
        return 1 + len(self.cells) + extra


@dataclass
class Sample:
    """One parsed sequence. A section that is None is absent; an empty list is present but empty."""

    scene: list[Block] = field(default_factory=list)
    amodal: np.ndarray | None = None  # voxel ids of the complete scene
    unseg: list[Block] | None = None
    grasps: list[Block] | None = None

    def num_tokens(self) -> int:
        n = 2 + sum(len(b) for b in self.scene)  # scene ... end
        if self.amodal is not None:
            n += 3 + len(self.amodal)
        if self.unseg is not None:
            n += 2 + sum(len(b) for b in self.unseg)
        if self.grasps is not None:
            n += 1 + sum(1 + len(b) for b in self.grasps)
        return n


def _cells_tokens(block: Block) -> np.ndarray:
    if block.serials is None or not (block.serials >= 0).any():
        return block.cells
    out = []
    for c, s in zip(block.cells, block.serials):
        out.append(c)
        if s >= 0:
            out.append(s)
    return np.asarray(out, dtype=np.int64)


def serialize(sample: Sample, vocab: Vocab) -> np.ndarray:
    """Sample -> int64 ids, the exact inverse of `parse`."""
    parts: list[np.ndarray | list[int]] = [[vocab.scene]]
    for b in sample.scene:
        parts += [[b.tag], _cells_tokens(b)]
    if sample.amodal is not None:
        parts += [[vocab.amodal, vocab.unlabel], sample.amodal, [vocab.endamodal]]
    if sample.unseg is not None:
        parts.append([vocab.segment])
        for b in sample.unseg:
            parts += [[b.tag], _cells_tokens(b)]
        parts.append([vocab.endunseg])
    if sample.grasps is not None:
        parts.append([vocab.detectgrasp])
        for b in sample.grasps:
            parts += [[vocab.grasp, b.tag], _cells_tokens(b)]
    parts.append([vocab.end])
    return np.concatenate([np.asarray(p, dtype=np.int64) for p in parts])


def section_starts(ids: np.ndarray, vocab: Vocab) -> dict[str, int]:
    """Positions of the section openers present in a valid sequence (for cutting at a boundary)."""
    ids = np.asarray(ids)
    out = {}
    for name in ("amodal", "segment", "detectgrasp", "end"):
        hit = np.flatnonzero(ids == getattr(vocab, name))
        if hit.size:
            out[name] = int(hit[0])
    return out


def parse(ids: np.ndarray, vocab: Vocab, strict: bool = True) -> Sample:
    """Parse a whole sequence (ending in `end`). Raises GrammarError at the first broken rule.

    strict also checks what the data format promises beyond the grammar: cells of scene,
    amodal and unseg blocks strictly increasing, and at most 3 cells per grasp.
    """
    ids = np.asarray(ids, dtype=np.int64)
    n = len(ids)
    if n == 0:
        raise GrammarError(0, "sequence", "empty sequence")
    bad = np.flatnonzero((ids < 0) | (ids >= vocab.size))
    if bad.size:
        raise GrammarError(int(bad[0]), "vocabulary", f"id {int(ids[bad[0]])} is outside the vocabulary (V = {vocab.size})")
    is_cell = ids >= vocab.serial_base  # voxels and serials travel together as cell runs
    structural = np.flatnonzero(~is_cell)
    # Each structural token is followed by a (possibly empty) run of cell tokens up to the next one.
    run_end = np.append(structural[1:], n)

    def cells_after(k: int, rule: str, need: bool) -> tuple[np.ndarray, np.ndarray | None]:
        lo, hi = structural[k] + 1, run_end[k]
        run = ids[lo:hi]
        if need and run.size == 0:
            raise GrammarError(int(lo), rule, f"'{vocab.token_of(ids[structural[k]])}' must be followed by at least one voxel cell")
        serial = run < vocab.voxel_base
        if not serial.any():
            return run, None
        # A serial may only follow a voxel: never first, never two in a row.
        if serial[0] or (serial[1:] & serial[:-1]).any():
            pos = lo + int(np.flatnonzero(serial & ~np.append(False, ~serial[:-1]))[0])
            raise GrammarError(int(pos), "cell", "a serial token must follow a voxel cell")
        cells = run[~serial]
        serials = np.full(len(cells), -1, dtype=np.int64)
        serials[np.cumsum(~serial)[serial] - 1] = run[serial]
        return cells, serials

    def check_sorted(cells: np.ndarray, start: int, rule: str):
        if strict and cells.size > 1:
            dec = np.flatnonzero(np.diff(cells) <= 0)
            if dec.size:
                raise GrammarError(int(start + dec[0] + 1), rule, "cells of a block must be strictly increasing (sorted by x, y, z)")

    if ids[0] != vocab.scene:
        raise GrammarError(0, "sequence", f"a sequence starts with 'scene', not '{vocab.token_of(ids[0])}'")
    if run_end[0] != 1:
        raise GrammarError(1, "scene", "'scene' must be followed by a tag or a section, not a cell")
    sample = Sample()
    k, m = 1, len(structural)
    section = "scene"  # the last section opened

    def tok(k):
        return int(ids[structural[k]])

    def expect(k, token_id, rule, what):
        if k >= m:
            raise GrammarError(n, rule, f"sequence ended; expected {what}")
        if tok(k) != token_id:
            raise GrammarError(int(structural[k]), rule, f"expected {what}, found '{vocab.token_of(tok(k))}'")

    while k < m:
        t, pos = tok(k), int(structural[k])
        if vocab.is_tag(t):
            if section == "scene":
                cells, serials = cells_after(k, "block", True)
                check_sorted(cells, pos + 1, "block")
                sample.scene.append(Block(t, cells, serials))
            elif section == "segment":
                if not vocab.is_object_tag(t):
                    raise GrammarError(pos, "unseg", f"segment blocks take an objectNN tag, not '{vocab.token_of(t)}'")
                cells, serials = cells_after(k, "unseg", True)
                check_sorted(cells, pos + 1, "unseg")
                sample.unseg.append(Block(t, cells, serials))
            else:
                where = "after 'endunseg'" if section == "endunseg" else f"inside '{section}'"
                raise GrammarError(pos, "sequence", f"unexpected tag '{vocab.token_of(t)}' {where}")
            k += 1
            continue
        if run_end[k] != pos + 1:  # only tags take cells
            raise GrammarError(pos + 1, "sequence", f"'{vocab.token_of(t)}' cannot be followed by a voxel cell")
        order = {"scene": 0, "amodal": 1, "segment": 2, "endunseg": 2, "detectgrasp": 3}
        if t == vocab.amodal:
            if order[section] >= 1:
                raise GrammarError(pos, "sequence", "'amodal' must come right after the scene, before segment and detectgrasp")
            expect(k + 1, vocab.unlabel, "amodal", "'unlabel' after 'amodal'")
            cells, serials = cells_after(k + 1, "amodal", True)
            if serials is not None:
                raise GrammarError(int(structural[k + 1]) + 1, "amodal", "amodal cells take no serial tokens")
            check_sorted(cells, int(structural[k + 1]) + 1, "amodal")
            expect(k + 2, vocab.endamodal, "amodal", "'endamodal' after the amodal cells")
            sample.amodal = cells
            section = "amodal"
            k += 3
        elif t == vocab.segment:
            if order[section] >= 2:
                raise GrammarError(pos, "sequence", "'segment' must come before detectgrasp and only once")
            sample.unseg = []
            section = "segment"
            k += 1
        elif t == vocab.endunseg:
            if section != "segment":
                raise GrammarError(pos, "unseg", "'endunseg' without an open 'segment'")
            section = "endunseg"
            k += 1
        elif t == vocab.detectgrasp:
            if section == "segment":
                raise GrammarError(pos, "unseg", "'segment' must be closed with 'endunseg' before 'detectgrasp'")
            if order[section] >= 3:
                raise GrammarError(pos, "sequence", "only one 'detectgrasp' section is allowed")
            sample.grasps = []
            section = "detectgrasp"
            k += 1
        elif t == vocab.grasp:
            if section != "detectgrasp":
                raise GrammarError(pos, "grasps", "'grasp' outside the detectgrasp section")
            if k + 1 >= m or not vocab.is_tag(tok(k + 1)):
                where = int(structural[k + 1]) if k + 1 < m else n
                raise GrammarError(where, "grasps", "'grasp' must be followed by a tag")
            cells, serials = cells_after(k + 1, "grasps", True)
            if strict and len(cells) > GRASP_CELLS:
                raise GrammarError(int(structural[k + 1]) + 1 + GRASP_CELLS, "grasps", f"a grasp has at most {GRASP_CELLS} cells")
            sample.grasps.append(Block(tok(k + 1), cells, serials))
            k += 2
        elif t == vocab.end:
            if section == "segment":
                raise GrammarError(pos, "unseg", "'segment' must be closed with 'endunseg' before 'end'")
            if pos != n - 1:
                raise GrammarError(pos + 1, "sequence", "tokens after 'end'")
            return sample
        elif t == vocab.endamodal:
            raise GrammarError(pos, "amodal", "'endamodal' without 'amodal'")
        elif t == vocab.scene:
            raise GrammarError(pos, "sequence", "'scene' may only start the sequence")
        else:  # pragma: no cover - every non-cell id is a tag or a command
            raise GrammarError(pos, "sequence", f"unexpected token '{vocab.token_of(t)}'")
    raise GrammarError(n, "sequence", "sequence does not end with 'end'")


def validate(ids: np.ndarray, vocab: Vocab, strict: bool = True) -> GrammarError | None:
    """None if `ids` is a valid sequence, else the first error."""
    try:
        parse(ids, vocab, strict)
    except GrammarError as err:
        return err
    return None
