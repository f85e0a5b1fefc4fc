"""The GraspGPT token grammar, defined once: parse, validate, serialize, read leniently, decode.

    sequence  ::= scene amodal? unseg? grasps? "end"
    scene     ::= "scene" block*
    block     ::= tag cell+
    cell      ::= VOXEL SERIAL?
    amodal    ::= "amodal" "unlabel" cell+ "endamodal"
    unseg     ::= "segment" (OBJTAG cell+)* "endunseg"
    grasps    ::= "detectgrasp" ("grasp" tag cell+)*

`SECTIONS` says this as data: the sections in their order, the command opening and closing each, the
tags that start its blocks. From it comes one state machine (`_Tables`: what may come next in each mode
and where each token leads), read three ways:

- `parse` (and `validate`): a whole sequence, strictly, errors naming the position and the rule. It walks
  only the structural tokens (tags and commands) through the machine and slices the runs of cells
  between them out with numpy, so a 13k-token sample parses in a few milliseconds.
- `read_blocks` / `read_output`: leniently, for unfinished or invalid model output.
- `GrammarState`: token by token, what may come next, for grammar-constrained decoding.
"""
from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, field
from typing import Iterator

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


# -- the sections and the machine ------------------------------------------------------------

@dataclass(frozen=True)
class Section:
    """One section of a sequence: how it opens and closes, and what its blocks are."""

    field: str  # the Sample field it fills
    opener: str  # the command that opens it
    tags: str  # the tags that start its blocks: "any", "unlabel" or "objects" (Vocab.is_segment_tag)
    rule: str  # the rule that errors about its blocks name
    block: str  # what one of its blocks is called in messages
    closer: str | None = None  # the command that must close it
    prefix: str | None = None  # the command written before each block's tag
    one_block: bool = False  # exactly one block (the section's cells; Sample keeps them as an array)
    sorted: bool = True  # cells strictly increasing within a block (parse strict=True, GrammarState sorted_cells)
    max_cells: int | None = None  # cells of a block: at most this many (strict parse), exactly (GrammarState)

    def takes(self, tag: int, vocab: Vocab) -> bool:
        """Whether `tag` may start one of its blocks."""
        if self.tags == "unlabel":
            return tag == vocab.unlabel
        return vocab.is_segment_tag(tag) if self.tags == "objects" else vocab.is_tag(tag)


# The sections in the order they must come, each at most once; the scene always opens the sequence.
SECTIONS = (
    Section("scene", "scene", "any", "block", "scene block"),
    Section("amodal", "amodal", "unlabel", "amodal", "amodal block", closer="endamodal", one_block=True),
    Section("unseg", "segment", "objects", "unseg", "segment block", closer="endunseg"),
    Section("grasps", "detectgrasp", "any", "grasps", "grasp", prefix="grasp", sorted=False, max_cells=GRASP_CELLS),
)

# Where a sequence stands: START, then for each section one of four phases, then DONE (after `end`).
OPEN, TAG, BLOCK, CLOSED = range(4)  # between blocks, after the prefix (waiting for a tag), in a block, closed
START, DONE = 0, 1 + 4 * len(SECTIONS)


_PHASES = [(SECTIONS[(m - 1) // 4], (m - 1) % 4) if START < m < DONE else (None, -1) for m in range(DONE + 1)]


def _mode(section: int, phase: int) -> int:
    return 1 + 4 * section + phase


def _phase(mode: int) -> tuple[Section | None, int]:
    """(section, phase) of a mode; (None, -1) at START and DONE."""
    return _PHASES[mode]


_GRASPS = next(i for i, s in enumerate(SECTIONS) if s.field == "grasps")
GRASP_TAG, GRASP_BLOCK = _mode(_GRASPS, TAG), _mode(_GRASPS, BLOCK)  # where decoding grounds a grasp


def _where(mode: int) -> str:
    """Where a sequence in `mode` stands, for messages."""
    s, phase = _phase(mode)
    if s is None:
        return "at the start (a sequence starts with 'scene')" if mode == START else "after 'end'"
    if phase == OPEN:
        return f"after '{s.opener}' (expected '{s.tags}')" if s.one_block else f"between {s.block}s"
    if phase == TAG:
        return f"after '{s.prefix}' (expected a tag)"
    return f"in {'the' if s.one_block else 'a'} {s.block}" if phase == BLOCK else f"after '{s.closer}'"


class _Tables:
    """The machine for one vocabulary and set of options, built once and shared by every state and parse.

    masks[key]: the non-voxel tokens allowed next, key = mode * 4 + closable * 2 + serial, where closable
    means the current block has enough cells to end and serial means a serial token may come next.
    command_next[id]: the mode a command leads to (a tag leads to a block of the section it is in).
    """

    def __init__(self, vocab: Vocab, allow_segment: bool, allow_serials: bool):
        nv = vocab.voxel_base
        self.vocab = vocab

        def mask(*names: str | None) -> np.ndarray:
            m = np.zeros(nv, dtype=bool)
            m[[getattr(vocab, c) for c in names if c is not None]] = True
            return m

        def follow(i: int) -> np.ndarray:  # what may come once section i is done: a later section or `end`
            return mask("end", *(s.opener for s in SECTIONS[i + 1:] if s.field != "unseg" or allow_segment))

        serials = np.zeros(nv, dtype=bool)
        serials[vocab.serial_base:] = allow_serials
        nothing = np.zeros(nv, dtype=bool)
        allowed = {START: (mask("scene"),) * 2, DONE: (mask("end"),) * 2}  # mode -> (not closable, closable)
        self.command_next = {vocab.end: DONE}
        for i, s in enumerate(SECTIONS):
            tags = np.array([s.takes(t, vocab) for t in range(nv)])
            starts = mask(s.prefix) if s.prefix else tags
            between = starts if s.one_block else starts | (mask(s.closer) if s.closer else follow(i))
            allowed[_mode(i, OPEN)] = (between,) * 2
            allowed[_mode(i, TAG)] = (tags,) * 2
            allowed[_mode(i, BLOCK)] = (nothing, mask(s.closer) if s.one_block else between)
            allowed[_mode(i, CLOSED)] = (follow(i),) * 2
            self.command_next[getattr(vocab, s.opener)] = _mode(i, OPEN)
            if s.prefix:
                self.command_next[getattr(vocab, s.prefix)] = _mode(i, TAG)
            if s.closer:
                self.command_next[getattr(vocab, s.closer)] = _mode(i, CLOSED)
        self.masks = []
        for mode in range(DONE + 1):
            for closable in (False, True):
                for serial in (False, True):
                    m = allowed[mode][closable] | (serials if serial else nothing)
                    m.flags.writeable = False
                    self.masks.append(m)

    def next_mode(self, mode: int, token: int) -> int:
        """The mode an allowed non-voxel token leads to."""
        return self.command_next[token] if token >= self.vocab.num_tags else _mode((mode - 1) // 4, BLOCK)

    def nonvoxel(self, key: int, only: tuple[int, ...] | None = None) -> np.ndarray:
        """The non-voxel mask of `key`, restricted to the ids `only` when given."""
        if only is None:
            return self.masks[key]
        m = np.zeros_like(self.masks[key])
        m[list(only)] = True
        return m & self.masks[key]


@functools.lru_cache(maxsize=32)
def _tables(vocab: Vocab, allow_segment: bool, allow_serials: bool) -> _Tables:
    return _Tables(vocab, allow_segment, allow_serials)


def _structure(ids: np.ndarray, vocab: Vocab) -> tuple[np.ndarray, np.ndarray]:
    """Positions of the structural tokens (tags and commands) and where the run of cells (voxels and
    serials) after each one ends: every cell belongs to the structural token before it."""
    structural = np.flatnonzero(ids < vocab.serial_base)
    return structural, np.append(structural[1:], len(ids))


# -- parse: a whole sequence, strictly ----------------------------------------------------------

def section_starts(ids: np.ndarray, vocab: Vocab) -> dict[str, int]:
    """Positions of the section openers after the scene, and of `end`, present in a valid sequence (for
    cutting at a boundary)."""
    ids = np.asarray(ids)
    out = {}
    for name in (*(s.opener for s in SECTIONS[1:]), "end"):
        hit = np.flatnonzero(ids == getattr(vocab, name))
        if hit.size:
            out[name] = int(hit[0])
    return out


# Why a command is out of place where the sections do not say more: (rule, message).
_MISPLACED = {
    "scene": ("sequence", "'scene' may only start the sequence"),
    "amodal": ("sequence", "'amodal' must come right after the scene, before segment and detectgrasp"),
    "segment": ("sequence", "'segment' must come before detectgrasp and only once"),
    "detectgrasp": ("sequence", "only one 'detectgrasp' section is allowed"),
    "endamodal": ("amodal", "'endamodal' without 'amodal'"),
    "endunseg": ("unseg", "'endunseg' without an open 'segment'"),
    "grasp": ("grasps", "'grasp' outside the detectgrasp section"),
}


def _expected(mode: int, found: str | None) -> tuple[str, str] | None:
    """(rule, message) where `mode` takes one thing only and got `found` (None: the sequence ended)."""
    s, phase = _phase(mode)
    if phase == TAG:
        return s.rule, f"'{s.prefix}' must be followed by a tag"
    if s is None or not s.one_block or phase not in (OPEN, BLOCK):
        return None
    what = f"'{s.tags}' after '{s.opener}'" if phase == OPEN else f"'{s.closer}' after the {s.field} cells"
    return s.rule, f"expected {what}, found '{found}'" if found is not None else f"sequence ended; expected {what}"


def _misplaced(mode: int, t: int, vocab: Vocab) -> tuple[str, str]:
    """(rule, message): why structural token t may not come in `mode` (it is not what `_expected` wants)."""
    s, phase = _phase(mode)
    name = vocab.token_of(t)
    is_open = phase in (OPEN, BLOCK)
    if vocab.is_tag(t):
        if is_open and s.tags == "objects":
            return s.rule, f"{s.opener} blocks take an objectNN tag, not '{name}'"
        return "sequence", f"unexpected tag '{name}' " + (f"after '{s.closer}'" if phase == CLOSED else f"inside '{s.opener}'")
    later = [getattr(vocab, x.opener) for x in SECTIONS[SECTIONS.index(s) + 1:]] if s is not None else []
    if is_open and s.closer and (t == vocab.end or t in later):
        return s.rule, f"'{s.opener}' must be closed with '{s.closer}' before '{name}'"
    return _MISPLACED[name]


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
    structural, run_end = _structure(ids, vocab)

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
    tables = _tables(vocab, True, False)
    sample, mode = Sample(), tables.command_next[vocab.scene]
    for k in range(1, len(structural)):
        pos, t = int(structural[k]), int(ids[structural[k]])
        cell_after_command = t >= vocab.num_tags and t != vocab.end and run_end[k] != pos + 1
        # The first broken rule: what a mode that takes one thing only expected, else a cell after a
        # command, else why the token is out of place. (A block read so far has its cells: closable.)
        if not tables.masks[mode * 4 + 2][t]:
            expected = _expected(mode, vocab.token_of(t))
            if expected is None and not cell_after_command:
                expected = _misplaced(mode, t, vocab)
            if expected is not None:
                raise GrammarError(pos, *expected)
        if cell_after_command:  # only tags take cells
            s = next((s for s in SECTIONS if s.prefix and t == getattr(vocab, s.prefix)), None)
            if s is not None:
                raise GrammarError(pos + 1, s.rule, f"'{s.prefix}' must be followed by a tag, not a cell")
            raise GrammarError(pos + 1, "sequence", f"'{vocab.token_of(t)}' cannot be followed by a voxel cell")
        if t == vocab.end:
            if pos != n - 1:
                raise GrammarError(pos + 1, "sequence", "tokens after 'end'")
            return sample
        mode = tables.next_mode(mode, t)
        s, phase = _phase(mode)
        if phase == BLOCK:
            cells, serials = cells_after(k, s.rule, sort=strict and s.sorted, most=s.max_cells if strict else None)
            if s.one_block:
                setattr(sample, s.field, cells)
                setattr(sample, f"{s.field}_serials", serials)
            else:
                getattr(sample, s.field).append(Block(t, cells, serials))
        elif phase == OPEN and getattr(sample, s.field) is None and not s.one_block:
            setattr(sample, s.field, [])
    raise GrammarError(n, *(_expected(mode, None) or ("sequence", "sequence does not end with 'end'")))


def validate(ids: np.ndarray, vocab: Vocab, strict: bool = True) -> GrammarError | None:
    """None if `ids` is a valid sequence, else the first error."""
    try:
        parse(ids, vocab, strict)
    except GrammarError as err:
        return err
    return None


# -- reading model output leniently ------------------------------------------------------------

def read_blocks(ids: np.ndarray, vocab: Vocab) -> Iterator[tuple[Section, int, np.ndarray | None]]:
    """The sections and blocks of a sequence read leniently, for unfinished or invalid model output too:
    (section, position of its opener, None) where a section opens, and (section, position of the tag,
    positions of its voxel cells) for each block, in order.

    A tag starts a block when the section open at that point takes it (SECTIONS: any tag after `scene`,
    `unlabel` after `amodal`, an object tag inside `segment`) and, where the section has a prefix, right
    after it (`grasp` inside `detectgrasp`); the block's cells are the voxels up to the next tag or
    command (serials are skipped; a block may have none). Anything out of place is skipped, a closer
    closes its section, an opener opens its section again, and reading stops at `end`.
    """
    ids = np.asarray(ids, dtype=np.int64)
    structural, run_end = _structure(ids, vocab)
    opens = {getattr(vocab, s.opener): s for s in SECTIONS}
    closes = {getattr(vocab, s.closer) for s in SECTIONS if s.closer}
    prefixes = {s.field: getattr(vocab, s.prefix) for s in SECTIONS if s.prefix}
    section, prev = None, -1
    for k, p in enumerate(structural.tolist()):
        t = int(ids[p])
        if t == vocab.end:
            return
        if t in opens:
            section = opens[t]
            yield section, p, None
        elif t in closes:
            section = None
        elif section is not None and section.takes(t, vocab) and prefixes.get(section.field, prev) == prev:
            yield section, p, p + 1 + np.flatnonzero(ids[p + 1: run_end[k]] >= vocab.voxel_base)
        prev = t


def read_output(ids: np.ndarray, vocab: Vocab) -> Sample:
    """The sections of a sequence read leniently (read_blocks), blocks without a voxel cell left out.
    On a valid sequence this gives what `parse(strict=False)` gives, without serials."""
    ids = np.asarray(ids, dtype=np.int64)
    sample = Sample()
    for s, at, cells in read_blocks(ids, vocab):
        if cells is None:
            if getattr(sample, s.field) is None:
                setattr(sample, s.field, np.zeros(0, np.int64) if s.one_block else [])
        elif len(cells) and s.one_block:
            setattr(sample, s.field, np.concatenate([getattr(sample, s.field), ids[cells]]))
        elif len(cells):
            getattr(sample, s.field).append(Block(int(ids[at]), ids[cells]))
    return sample


# -- grammar-constrained decoding ---------------------------------------------------------------

@dataclass(frozen=True)
class AllowedSet:
    """The tokens the grammar allows next: a mask over the non-voxel ids plus one voxel id range [lo, hi)."""

    nonvoxel: np.ndarray  # (voxel_base,) bool, read-only and shared
    lo: int
    hi: int

    def __contains__(self, token_id: int) -> bool:
        t = int(token_id)
        return self.lo <= t < self.hi if t >= len(self.nonvoxel) else t >= 0 and bool(self.nonvoxel[t])

    def __len__(self) -> int:
        return int(self.nonvoxel.sum()) + self.hi - self.lo

    def nonvoxel_ids(self) -> np.ndarray:
        return np.flatnonzero(self.nonvoxel)


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

    `advance` is O(1); the allowed set is a cached non-voxel mask plus one voxel id range, so
    decoding masks a whole batch in a few vectorized operations (decoding.allowed_masks).
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
        s, phase = _phase(self.mode)
        full = phase == BLOCK and s.max_cells is not None
        closable = self.cells == s.max_cells if full else self.cells > 0
        serial = self.after_voxel and self.allow_serials
        return self.mode * 4 + closable * 2 + serial

    def _voxels(self) -> tuple[int, int]:
        V = self.vocab.size
        s, phase = _phase(self.mode)
        if phase != BLOCK or (s.max_cells is not None and self.cells >= s.max_cells):
            return V, V
        return (self.last + 1 if s.sorted and self.sorted_cells else self.vocab.voxel_base), V

    def allowed(self) -> AllowedSet:
        lo, hi = self._voxels()
        only = self.scene_tags if self.scene_tags_only and self.mode == GRASP_TAG and self.scene_tags else None
        return AllowedSet(self._tables.nonvoxel(self._key(), only), lo, hi)

    def allowed_ids_nonvoxel(self) -> np.ndarray:
        return self.allowed().nonvoxel_ids()

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
                if self.mode in (_mode(0, OPEN), _mode(0, BLOCK)) and t not in self.scene_tags:
                    self.scene_tags = tuple(sorted(self.scene_tags + (t,)))
                self.cells, self.last = 0, vocab.voxel_base - 1
            if t < vocab.serial_base:
                self.mode = self._tables.next_mode(self.mode, t)
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
        s, phase = _phase(self.mode)
        name, why = vocab.token_of(t), ""
        if vocab.is_voxel(t) and phase == BLOCK and s.sorted and t < lo:
            why = "; cells of a block must be strictly increasing"
        elif vocab.is_voxel(t) and phase == BLOCK and s.max_cells is not None:
            why = f"; a {s.block} takes exactly {s.max_cells} cells"
        elif phase == TAG and t < vocab.num_tags and self.scene_tags_only:
            why = "; a grasp's tag must be one of the scene's block tags (scene_tags_only)"
        elif vocab.is_serial(t):
            why = ("; serials are disabled (allow_serials=False)" if not self.allow_serials
                   else "; a serial may only follow a voxel cell")
        raise GrammarError(self.pos, "decode", f"'{name}' is not allowed {_where(self.mode)}{why}")
