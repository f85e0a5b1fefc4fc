"""The GraspGPT token grammar: parse, validate and serialize sequences.

    sequence  ::= scene amodal? unseg? grasps? "end"
    scene     ::= "scene" block*
    block     ::= tag cell+
    cell      ::= VOXEL SERIAL?
    amodal    ::= "amodal" "unlabel" cell+ "endamodal"
    unseg     ::= "segment" (OBJTAG cell+)* "endunseg"
    grasps    ::= "detectgrasp" ("grasp" tag cell+)*

Parsing walks only the structural tokens (tags and commands); runs of cells
between them are sliced out with numpy, so a 13k-token sample parses in a few
milliseconds. `GrammarState` is the same grammar as a token-by-token state
machine, for masking logits during generation.
"""
from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, field

import numpy as np
import torch

from .vocab import COMMANDS, Vocab

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
    amodal_serials: np.ndarray | None = None  # serial id after amodal cell i, or -1 (as Block.serials)

    def amodal_tokens(self) -> int:
        """Tokens of the amodal section when serialized (amodal unlabel cells [serials] endamodal), 0 if absent."""
        if self.amodal is None:
            return 0
        serials = 0 if self.amodal_serials is None else int((self.amodal_serials >= 0).sum())
        return 3 + len(self.amodal) + serials

    def num_tokens(self) -> int:
        n = 2 + sum(len(b) for b in self.scene)  # scene ... end
        n += self.amodal_tokens()
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
        amodal = Block(vocab.unlabel, sample.amodal, sample.amodal_serials)
        parts += [[vocab.amodal, vocab.unlabel], _cells_tokens(amodal), [vocab.endamodal]]
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

    def cells_after(k: int, rule: str, sort: bool, most: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """The cells (and serials) of the block whose tag is structural token k; strict checks order and count."""
        lo, hi = structural[k] + 1, run_end[k]
        run = ids[lo:hi]
        if run.size == 0:
            raise GrammarError(int(lo), rule, f"'{vocab.token_of(ids[structural[k]])}' must be followed by at least one voxel cell")
        serial = run < vocab.voxel_base
        cells, serials = run, None
        if serial.any():
            # A serial may only follow a voxel: never first, never two in a row.
            if serial[0] or (serial[1:] & serial[:-1]).any():
                pos = lo + int(np.flatnonzero(serial & ~np.append(False, ~serial[:-1]))[0])
                raise GrammarError(int(pos), "cell", "a serial token must follow a voxel cell")
            cells = run[~serial]
            serials = np.full(len(cells), -1, dtype=np.int64)
            serials[np.cumsum(~serial)[serial] - 1] = run[serial]
        if strict:
            def at(i: int) -> int:  # position of the i-th cell, counting serials in between
                return int(lo + np.flatnonzero(~serial)[i])

            if sort and cells.size > 1:
                dec = np.flatnonzero(np.diff(cells) <= 0)
                if dec.size:
                    raise GrammarError(at(dec[0] + 1), rule, "cells of a block must be strictly increasing (sorted by x, y, z)")
            if most is not None and len(cells) > most:
                raise GrammarError(at(most), rule, f"a grasp has at most {most} cells")
        return cells, serials

    if ids[0] != vocab.scene:
        raise GrammarError(0, "sequence", f"a sequence starts with 'scene', not '{vocab.token_of(ids[0])}'")
    if run_end[0] != 1:
        raise GrammarError(1, "scene", "'scene' must be followed by a tag or a section, not a cell")
    sample = Sample()
    k, m = 1, len(structural)
    section = "scene"  # the last section opened
    order = {"scene": 0, "amodal": 1, "segment": 2, "endunseg": 2, "detectgrasp": 3}

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
                cells, serials = cells_after(k, "block", sort=True)
                sample.scene.append(Block(t, cells, serials))
            elif section == "segment":
                if not vocab.is_segment_tag(t):
                    raise GrammarError(pos, "unseg", f"segment blocks take an objectNN tag, not '{vocab.token_of(t)}'")
                cells, serials = cells_after(k, "unseg", sort=True)
                sample.unseg.append(Block(t, cells, serials))
            else:
                where = {"amodal": "after 'endamodal'", "endunseg": "after 'endunseg'"}.get(section, f"inside '{section}'")
                raise GrammarError(pos, "sequence", f"unexpected tag '{vocab.token_of(t)}' {where}")
            k += 1
            continue
        if t == vocab.end:
            if section == "segment":
                raise GrammarError(pos, "unseg", "'segment' must be closed with 'endunseg' before 'end'")
            if pos != n - 1:
                raise GrammarError(pos + 1, "sequence", "tokens after 'end'")
            return sample
        if run_end[k] != pos + 1:  # only tags take cells
            if t == vocab.grasp:
                raise GrammarError(pos + 1, "grasps", "'grasp' must be followed by a tag, not a cell")
            raise GrammarError(pos + 1, "sequence", f"'{vocab.token_of(t)}' cannot be followed by a voxel cell")
        if t == vocab.amodal:
            if order[section] >= 1:
                raise GrammarError(pos, "sequence", "'amodal' must come right after the scene, before segment and detectgrasp")
            expect(k + 1, vocab.unlabel, "amodal", "'unlabel' after 'amodal'")
            # The format's `cell ::= VOXEL SERIAL?` holds here too: the research parser reads the amodal
            # block as any other block, serials included.
            cells, serials = cells_after(k + 1, "amodal", sort=True)
            expect(k + 2, vocab.endamodal, "amodal", "'endamodal' after the amodal cells")
            if run_end[k + 2] != structural[k + 2] + 1:
                raise GrammarError(int(structural[k + 2]) + 1, "sequence", "'endamodal' cannot be followed by a voxel cell")
            sample.amodal, sample.amodal_serials = cells, serials
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
            cells, serials = cells_after(k + 1, "grasps", sort=False, most=GRASP_CELLS)
            sample.grasps.append(Block(tok(k + 1), cells, serials))
            k += 2
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


def read_output(ids: np.ndarray, vocab: Vocab) -> Sample:
    """The sections of a sequence read leniently, for unfinished or invalid model output too.

    Walks the structural tokens: a tag after `scene`, after `amodal`, inside `segment`, or right
    after `grasp` (inside `detectgrasp`) opens a block taking the voxel cells that follow; anything
    out of place is skipped, and reading stops at `end`. On a valid sequence this gives what
    `parse(strict=False)` gives, without serials.
    """
    ids = np.asarray(ids, dtype=np.int64)
    structural = np.flatnonzero(ids < vocab.serial_base)
    run_end = np.append(structural[1:], len(ids))
    sample, section, prev = Sample(), None, -1
    opens = {vocab.scene: "scene", vocab.amodal: "amodal", vocab.segment: "segment",
             vocab.detectgrasp: "detectgrasp", vocab.endamodal: None, vocab.endunseg: None}
    for k, p in enumerate(structural):
        t = int(ids[p])
        if t == vocab.end:
            break
        if t in opens:
            section = opens[t]
            if section == "amodal" and sample.amodal is None:
                sample.amodal = np.zeros(0, np.int64)
            elif section == "segment" and sample.unseg is None:
                sample.unseg = []
            elif section == "detectgrasp" and sample.grasps is None:
                sample.grasps = []
        elif vocab.is_tag(t):
            run = ids[p + 1: run_end[k]]
            cells = run[run >= vocab.voxel_base]
            if len(cells):
                if section == "scene":
                    sample.scene.append(Block(t, cells))
                elif section == "amodal" and t == vocab.unlabel:
                    sample.amodal = np.concatenate([sample.amodal, cells])
                elif section == "segment" and vocab.is_segment_tag(t):
                    sample.unseg.append(Block(t, cells))
                elif section == "detectgrasp" and prev == vocab.grasp:
                    sample.grasps.append(Block(t, cells))
        prev = t
    return sample


# -- grammar-constrained decoding ---------------------------------------------
#
# The decoder is in one of these modes. Between blocks: START, SCENE, AFTER_AMODAL,
# SEGMENT, AFTER_SEGMENT, GRASPS, DONE. Collecting cells: the four *_BLOCK modes.
# Waiting for a tag: AMODAL_OPEN (only 'unlabel'), GRASP_TAG.
(START, SCENE, SCENE_BLOCK, AMODAL_OPEN, AMODAL_BLOCK, AFTER_AMODAL, SEGMENT, SEGMENT_BLOCK,
 AFTER_SEGMENT, GRASPS, GRASP_TAG, GRASP_BLOCK, DONE) = range(13)
_WHERE = (
    "at the start (a sequence starts with 'scene')", "between scene blocks", "in a scene block",
    "after 'amodal' (expected 'unlabel')", "in the amodal block", "after 'endamodal'",
    "between segment blocks", "in a segment block", "after 'endunseg'", "between grasps",
    "after 'grasp' (expected a tag)", "in a grasp", "after 'end'",
)
_SORTED_BLOCKS = frozenset((SCENE_BLOCK, AMODAL_BLOCK, SEGMENT_BLOCK))
_TAG_NEXT = {SCENE: SCENE_BLOCK, SCENE_BLOCK: SCENE_BLOCK, AMODAL_OPEN: AMODAL_BLOCK,
             SEGMENT: SEGMENT_BLOCK, SEGMENT_BLOCK: SEGMENT_BLOCK, GRASP_TAG: GRASP_BLOCK}
_COMMAND_NEXT = dict(zip(COMMANDS, (SCENE, SEGMENT, AFTER_SEGMENT, AMODAL_OPEN, AFTER_AMODAL, GRASPS, GRASP_TAG, DONE)))


class _Tables:
    """The non-voxel part of every allowed set, built once per (vocab, options) and shared by all states.

    Indexed by key = mode * 4 + closable * 2 + serial, where closable means the current block has
    enough cells to end and serial means a serial token may come next.
    """

    def __init__(self, vocab: Vocab, allow_segment: bool, allow_serials: bool):
        nv = vocab.voxel_base
        self.vocab = vocab

        def mask(*ids: int) -> np.ndarray:
            m = np.zeros(nv, dtype=bool)
            m[list(ids)] = True
            return m

        def cmd(*names: str) -> np.ndarray:
            return mask(*(getattr(vocab, c) for c in names if c != "segment" or allow_segment))

        tags = np.zeros(nv, dtype=bool)
        tags[: vocab.num_tags] = True
        objects = np.zeros(nv, dtype=bool)
        objects[list(vocab.segment_tags)] = True
        serials = np.zeros(nv, dtype=bool)
        serials[vocab.serial_base:] = allow_serials
        follow_scene = tags | cmd("amodal", "segment", "detectgrasp", "end")
        follow_segment = objects | cmd("endunseg")
        follow_grasp = cmd("grasp", "end")
        base = {
            START: cmd("scene"), SCENE: follow_scene, AMODAL_OPEN: mask(vocab.unlabel),
            AFTER_AMODAL: cmd("segment", "detectgrasp", "end"), SEGMENT: follow_segment,
            AFTER_SEGMENT: cmd("detectgrasp", "end"), GRASPS: follow_grasp, GRASP_TAG: tags, DONE: cmd("end"),
        }
        closing = {SCENE_BLOCK: follow_scene, AMODAL_BLOCK: cmd("endamodal"),
                   SEGMENT_BLOCK: follow_segment, GRASP_BLOCK: follow_grasp}
        self.masks = []
        for mode in range(DONE + 1):
            for closable in (False, True):
                for serial in (False, True):
                    m = base.get(mode, np.zeros(nv, dtype=bool)).copy()
                    if closable and mode in closing:
                        m |= closing[mode]
                    if serial:
                        m |= serials
                    m.flags.writeable = False
                    self.masks.append(m)
        self._torch: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}

    def nonvoxel(self, key: int, only: tuple[int, ...] | None = None) -> np.ndarray:
        """The non-voxel mask of `key`, restricted to the ids `only` when given."""
        if only is None:
            return self.masks[key]
        m = np.zeros_like(self.masks[key])
        m[list(only)] = True
        return m & self.masks[key]

    def torch_masks(self, key: int, device, only: tuple[int, ...] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(allowed, forbidden) non-voxel masks as bool tensors on `device`, cached."""
        device = torch.device(device if device is not None else "cpu")
        hit = self._torch.get((key, device, only))
        if hit is None:
            allowed = torch.from_numpy(self.nonvoxel(key, only).copy()).to(device)
            hit = self._torch[(key, device, only)] = (allowed, ~allowed)
        return hit


@functools.lru_cache(maxsize=32)
def _tables(vocab: Vocab, allow_segment: bool, allow_serials: bool) -> _Tables:
    return _Tables(vocab, allow_segment, allow_serials)


@dataclass(frozen=True)
class AllowedSet:
    """The tokens the grammar allows next: a mask over the non-voxel ids plus one voxel id range [lo, hi)."""

    nonvoxel: np.ndarray  # (voxel_base,) bool, read-only and shared
    lo: int
    hi: int
    tables: _Tables = field(repr=False, compare=False)
    key: int = field(repr=False, compare=False)
    only: tuple[int, ...] | None = field(default=None, repr=False, compare=False)  # see GrammarState.scene_tags_only

    def __contains__(self, token_id: int) -> bool:
        t = int(token_id)
        return self.lo <= t < self.hi if t >= len(self.nonvoxel) else t >= 0 and bool(self.nonvoxel[t])

    def __len__(self) -> int:
        return int(self.nonvoxel.sum()) + self.hi - self.lo

    def nonvoxel_ids(self) -> np.ndarray:
        return np.flatnonzero(self.nonvoxel)

    def mask(self, device=None) -> torch.Tensor:
        """(V,) bool tensor, True where allowed."""
        nv = len(self.nonvoxel)
        m = torch.zeros(self.tables.vocab.size, dtype=torch.bool, device=device)
        m[:nv] = self.tables.torch_masks(self.key, m.device, self.only)[0]
        m[self.lo: self.hi] = True
        return m

    def apply_mask(self, logits: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        """Set the forbidden entries of `logits` (..., V) to -inf; returns the masked logits."""
        if logits.shape[-1] != self.tables.vocab.size:
            raise ValueError(f"logits have {logits.shape[-1]} entries in the last dim, the vocabulary has {self.tables.vocab.size}; "
                             "pass logits over the whole vocabulary")
        out = logits if inplace else logits.clone()
        nv = len(self.nonvoxel)
        out[..., :nv].masked_fill_(self.tables.torch_masks(self.key, out.device, self.only)[1], float("-inf"))
        out[..., nv: self.lo] = float("-inf")
        out[..., self.hi:] = float("-inf")
        return out


class GrammarState:
    """Where a partial sequence stands in the grammar, for grammar-constrained decoding.

    Stricter than `parse` in one way: a grasp takes exactly 3 cells. Data may hold shorter grasps
    (a point fell outside the box), but those name no gripper pose, so the decoder never writes
    one. Options: `sorted_cells` makes cells strictly increasing inside scene, amodal and segment
    blocks (what `parse` checks with strict=True); `allow_segment` permits the segment section;
    `allow_serials` permits a serial token after any voxel, amodal ones included (as `parse` does).

    `scene_tags_only` makes a second restriction, of meaning rather than syntax: a grasp's tag must
    be one of the scene's block tags. A grasp belongs to an object the scene shows (or to its one
    `incomplete`/`unlabel` block), so any other tag is certainly wrong.

    `advance` is O(1); the allowed set is a cached non-voxel mask plus one voxel id range,
    so `mask()` is a vectorized O(V) fill and no per-voxel Python set is ever built.
    """

    def __init__(self, vocab: Vocab, sorted_cells: bool = True, allow_segment: bool = True, allow_serials: bool = False,
                 scene_tags_only: bool = False):
        self.vocab = vocab
        self.sorted_cells = sorted_cells
        self.allow_serials = allow_serials
        self.scene_tags_only = scene_tags_only
        self.scene_tags: tuple[int, ...] = ()  # block tags of the scene section, sorted (immutable: copies share it)
        self._tables = _tables(vocab, allow_segment, allow_serials)
        self.mode = START
        self.cells = 0  # voxel cells in the current block
        self.last = -1  # last voxel id of the current block
        self.after_voxel = False  # the previous token was a voxel, so a serial may follow
        self.pos = 0  # tokens consumed so far

    @property
    def done(self) -> bool:
        return self.mode == DONE

    def copy(self) -> "GrammarState":
        return copy.copy(self)  # every field is a scalar; the tables are shared on purpose

    def _key(self) -> int:
        mode = self.mode
        closable = self.cells == GRASP_CELLS if mode == GRASP_BLOCK else self.cells > 0
        serial = self.after_voxel and self.allow_serials
        return mode * 4 + closable * 2 + serial

    def _voxels(self) -> tuple[int, int]:
        V = self.vocab.size
        if self.mode in _SORTED_BLOCKS:
            return (self.last + 1 if self.sorted_cells else self.vocab.voxel_base), V
        if self.mode == GRASP_BLOCK and self.cells < GRASP_CELLS:
            return self.vocab.voxel_base, V
        return V, V

    def allowed(self) -> AllowedSet:
        key = self._key()
        lo, hi = self._voxels()
        only = self.scene_tags if self.scene_tags_only and self.mode == GRASP_TAG and self.scene_tags else None
        return AllowedSet(self._tables.nonvoxel(key, only), lo, hi, self._tables, key, only)

    def allowed_ids_nonvoxel(self) -> np.ndarray:
        return self.allowed().nonvoxel_ids()

    def mask(self, device=None) -> torch.Tensor:
        """(V,) bool tensor of the tokens allowed next."""
        return self.allowed().mask(device)

    def apply_mask(self, logits: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        """Set logits (..., V) of forbidden tokens to -inf."""
        return self.allowed().apply_mask(logits, inplace)

    def advance(self, token_id: int) -> None:
        """Consume one token; GrammarError if the grammar does not allow it here."""
        t, vocab = int(token_id), self.vocab
        if t >= vocab.voxel_base:
            lo, hi = self._voxels()
            if not lo <= t < hi:
                self._reject(t, lo, hi)
            self.cells += 1
            self.last = t
            self.after_voxel = True
        else:
            if t < 0 or t not in self.allowed():
                self._reject(t, vocab.size, vocab.size)
            self.after_voxel = False
            if t < vocab.num_tags:
                if self.mode in (SCENE, SCENE_BLOCK) and t not in self.scene_tags:
                    self.scene_tags = tuple(sorted(self.scene_tags + (t,)))
                self.mode = _TAG_NEXT[self.mode]
                self.cells, self.last = 0, vocab.voxel_base - 1
            elif t < vocab.serial_base:
                self.mode = _COMMAND_NEXT[COMMANDS[t - vocab.command_base]]
        self.pos += 1

    def feed(self, ids) -> "GrammarState":
        """Advance over every id of `ids` (a prompt); returns self."""
        for t in ids.tolist() if hasattr(ids, "tolist") else ids:
            self.advance(t)
        return self

    def _reject(self, t: int, lo: int, hi: int):
        vocab = self.vocab
        if not 0 <= t < vocab.size:
            raise GrammarError(self.pos, "vocabulary", f"id {t} is outside the vocabulary (V = {vocab.size})")
        name, why = vocab.token_of(t), ""
        if vocab.is_voxel(t) and self.mode in _SORTED_BLOCKS and t < lo:
            why = "; cells of a block must be strictly increasing"
        elif vocab.is_voxel(t) and self.mode == GRASP_BLOCK:
            why = f"; a grasp takes exactly {GRASP_CELLS} cells"
        elif self.mode == GRASP_TAG and t < vocab.num_tags and self.scene_tags_only:
            why = "; a grasp's tag must be one of the scene's block tags (scene_tags_only)"
        elif vocab.is_serial(t):
            why = ("; serials are disabled (allow_serials=False)" if not self.allow_serials
                   else "; a serial may only follow a voxel cell")
        raise GrammarError(self.pos, "decode", f"'{name}' is not allowed {_WHERE[self.mode]}{why}")
