"""Decoding: prompts from data samples, and grammar-constrained sampling with a KV cache.

The library under `python -m graspGPT.generate`, `python -m graspGPT.evaluate` and the trainer's grasp
evaluation (evaluation.py). A prompt is a sample's scene section, followed by `detectgrasp` for a grasp
sample (`task_prompt`); `decode_many` writes several continuations of several prompts in one batch, each
row masked by its own GrammarState (the grammar; data/grammar.py) and, where asked, held to the object a
grasp names and the gripper's shape (`Grounding`, using grasp_metrics.SceneVoxels). A row's random draws
depend only on its seed and row, so the same seeds give the same sequences however rows are batched.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from .artifact import ModelRecord, check_compatible, load_model
from .checkpoint import CheckpointError
from .data.grammar import (GRASP_BLOCK, GRASP_TAG, Block, GrammarError, GrammarState, Sample, parse, read_output,
                           section_starts)
from .data.storage import TokenStore
from .data.vocab import Vocab
from .grasp_metrics import ROUNDING, SceneVoxels
from .model import SharedPrefixCache


class GenerateError(ValueError):
    """A prompt, checkpoint or setting that generation cannot use; the message says what to change."""


# -- prompts and reading outputs ------------------------------------------------------------

def scene_prompt(ids: np.ndarray, vocab: Vocab) -> np.ndarray:
    """The scene section of a sequence: `scene` and its blocks, up to the first section opener."""
    ids = np.asarray(ids, dtype=np.int64)
    if len(ids) == 0 or ids[0] != vocab.scene:
        raise GenerateError("the sample does not start with 'scene'; it is not a GraspGPT sequence")
    starts = section_starts(ids, vocab)
    return ids[: min(starts.values(), default=len(ids))]


def task_of(sample: Sample) -> str:
    return "amodal" if sample.amodal is not None else "unseg" if sample.unseg is not None else "grasp"


def task_prompt(ids: np.ndarray, vocab: Vocab, task: str) -> np.ndarray:
    """The prompt for a sample's task: scene + `detectgrasp` for grasps; for amodal and unseg
    samples the scene alone, so the model writes the completion or segmentation first."""
    scene = scene_prompt(ids, vocab)
    return np.append(scene, vocab.detectgrasp) if task == "grasp" else scene


def default_max_new(ids: np.ndarray, prompt: np.ndarray) -> int:
    """Twice the ground truth's continuation plus 64: room for a model that writes more, but an
    untrained or unconstrained model that never stops does not run to the block size."""
    return 2 * max(len(ids) - len(prompt), 1) + 64


def prompt_state(prompt: np.ndarray, vocab: Vocab, scene_tags_only: bool = False) -> GrammarState:
    """A GrammarState that has consumed the prompt. Cells must increase within a block when the
    prompt's do (all toolkit and upstream data), else the decoder may write them in any order.
    scene_tags_only: grasp tags limited to the scene's block tags (what constrained decoding uses)."""
    error = None
    for sorted_cells in (True, False):
        try:
            return GrammarState(vocab, sorted_cells=sorted_cells, scene_tags_only=scene_tags_only).feed(np.asarray(prompt))
        except GrammarError as err:
            error = error or err
    raise GenerateError(f"the prompt breaks the grammar ({error}); generate from a valid sample")


def accepts(state: GrammarState, new: np.ndarray) -> bool:
    """Whether `new`, continuing where `state` stands (e.g. `prompt_state(prompt)`), finishes a whole
    valid sequence: one the constrained decoder could have written."""
    state = state.copy()
    try:
        state.feed(np.asarray(new))
    except GrammarError:
        return False
    return state.done


def truth_of(ids: np.ndarray, vocab: Vocab) -> Sample:
    """A data sample parsed leniently (strict=False, else read_output): its ground truth."""
    try:
        return parse(np.asarray(ids, dtype=np.int64), vocab, strict=False)
    except GrammarError:
        return read_output(ids, vocab)


def grasp_list(blocks: Sequence[Block] | None, vocab: Vocab) -> list[tuple[int, np.ndarray]]:
    """(tag, (k, 3) cells) of grasp blocks, the form grasp_metrics takes."""
    return [(b.tag, vocab.cells_of(b.cells)) for b in blocks or []]


# -- decoding ---------------------------------------------------------------------------------

@dataclass
class Decoded:
    prompt: np.ndarray
    new: list[np.ndarray]  # per sample: generated ids, up to and including `end` when reached
    ended: np.ndarray  # (K,) bool: the sample wrote `end`
    forwards: int  # forward calls after the prompt (identical on every rank under a `sync`)
    seconds: float
    written: int | None = None  # tokens the model wrote where `new` holds fewer (independent grasps: joined rows)

    @property
    def new_tokens(self) -> int:
        """Tokens the model wrote."""
        return self.written if self.written is not None else sum(len(n) for n in self.new)


GRASP_TOKENS = 5  # one grasp block: `grasp`, its tag, then the left finger, right finger and base cells


def join_grasps(decoded: Decoded, per_sequence: int, vocab: Vocab) -> Decoded:
    """Independent sampling: rows that each wrote one grasp right after a grasp prompt (decode_many with
    max_new_tokens=GRASP_TOKENS) joined, every `per_sequence` consecutive rows into one sequence of their
    distinct whole grasp blocks (`grasp`, a tag, three cells), in row order, then `end`. A row that wrote `end` or a
    shorter block adds nothing. Each grasp is then a draw from what the model writes first after the
    scene; written one after another, a grasp is drawn given the ones before, and the model tends to
    repeat what it wrote (one object's grasps, one wrong region), which a sequence never corrects."""
    if per_sequence < 1 or len(decoded.new) % per_sequence:
        raise GenerateError(f"{len(decoded.new)} rows do not split into sequences of {per_sequence}")
    sequences = []
    for lo in range(0, len(decoded.new), per_sequence):
        seen, ids = set(), []
        for row in decoded.new[lo: lo + per_sequence]:
            grasp = tuple(int(t) for t in row[:GRASP_TOKENS])
            whole = (len(grasp) == GRASP_TOKENS and grasp[0] == vocab.grasp and vocab.is_tag(grasp[1])
                     and all(t >= vocab.voxel_base for t in grasp[2:]))
            if whole and grasp not in seen:
                seen.add(grasp)
                ids.extend(grasp)
        sequences.append(np.array(ids + [vocab.end], dtype=np.int64))
    return Decoded(decoded.prompt, sequences, np.ones(len(sequences), dtype=bool), decoded.forwards, decoded.seconds,
                   decoded.new_tokens)


def _row_uniforms(seed: int, rows: int, steps: int, device) -> torch.Tensor:
    """(rows, steps) uniform [0, 1) draws, row r's from a generator seeded with (seed, r): a row's draws
    do not depend on what else shares its batch, so batching scenes together changes nothing. Drawn
    once, so that sampling a step is one batched kernel rather than one call per row."""
    seeds = np.random.SeedSequence(int(seed)).generate_state(rows, dtype=np.uint64) >> np.uint64(1)
    return torch.stack([torch.rand(steps, generator=torch.Generator().manual_seed(int(s)), dtype=torch.float64)
                        for s in seeds]).to(device)


def allowed_masks(states: list[GrammarState | None], vocab_size: int, device) -> torch.Tensor:
    """(B, V) bool: what each row's grammar state allows (a None row: everything). The one place a
    GrammarState becomes a tensor mask.

    Built in a few kernels whatever B: each allowed set is a small non-voxel mask plus one voxel id
    range, so only those go to the device (a per-row (V,) mask would cost several launches per row)."""
    sets = [s.allowed() if s is not None else None for s in states]
    nv = next(a for a in sets if a is not None).nonvoxel.size
    heads = np.stack([a.nonvoxel if a is not None else np.ones(nv, dtype=bool) for a in sets])
    ranges = torch.tensor([(a.lo, a.hi) if a is not None else (nv, vocab_size) for a in sets]).to(device)
    ids = torch.arange(vocab_size, device=device)
    mask = (ids >= ranges[:, :1]) & (ids < ranges[:, 1:])
    mask[:, :nv] = torch.from_numpy(heads).to(device)
    return mask


# How far the rounding of a grasp's points to cells may bend the gripper's shape where a grounded grasp's base
# is allowed (voxels; grasp_metrics.SceneVoxels.base_cells). Validity allows the worst case of the three points
# (ROUNDING); the bases of the built-in data's own grasps lie within half of it 99.7% of the time (0.0075, 0.015
# and 0.03 m), and holding a decoded base there turns away most bases off the gripper's shape: on the mid grid,
# precision 0.179 -> 0.219 at the same checkpoint (docs/QUALITY_LAB.md, "The base's shell").
BASE_ROUNDING = ROUNDING / 2


class Grounding:
    """Where each grasp of one prompt's scene may put its cells: the two fingers touching the object its
    tag names and not inside another one; with `gripper`, also the gripper's shape (second finger within
    the opening, closing segment through the object, base FINGER_LENGTH behind the contacts with fingers
    and palm clear), so that every grasp written passes grasp_metrics.valid_grasps. `incomplete` blocks
    (one camera's view) are not held: their objects go on where the camera does not see."""

    def __init__(self, prompt: np.ndarray, vocab: Vocab, voxel_size: float | None):
        scene = [(b.tag, vocab.cells_of(b.cells)) for b in read_output(prompt, vocab).scene]
        self.vocab, self.gripper = vocab, voxel_size is not None
        self.voxels = SceneVoxels(scene, vocab.dims, voxel_size or 1.0)
        self._known: dict[tuple[int, ...], np.ndarray | None] = {}  # a model repeats grasps: each set is built once

    def next_cells(self, tag: int, written: Sequence[int]) -> np.ndarray | None:
        """Voxel ids the grasp's next cell may take after its `written` cell ids; None: no constraint."""
        return self.next_cells_many([(tag, written)])[0]

    def next_cells_many(self, asks: Sequence[tuple[int, Sequence[int]]]) -> list[np.ndarray | None]:
        """next_cells of each (tag, written), the new ones computed together (one decoding step's rows)."""
        keys = [(int(tag), *map(int, written)) for tag, written in asks]
        new = [k for k in dict.fromkeys(keys) if k not in self._known]
        if len(self._known) + len(new) > 100_000:
            self._known.clear()
            new = list(dict.fromkeys(keys))
        seconds, bases = [], []
        for key in new:
            tag, cells = key[0], self.vocab.cells_of(np.asarray(key[1:], dtype=np.int64))
            if tag == self.vocab.incomplete or tag not in self.voxels.label_of or len(cells) > 2 or (
                    len(cells) == 2 and not self.gripper):
                self._known[key] = None
            elif len(cells) == 0 or not self.gripper:
                self._known[key] = self._ids(self.voxels.left_cells(tag))
            elif len(cells) == 1:
                seconds.append((key, (tag, cells[0])))
            else:
                bases.append((key, (tag, cells[0], cells[1])))
        for asked, found in ((seconds, self.voxels.right_cells_many([a for _, a in seconds])),
                             (bases, self.voxels.base_cells_many([a for _, a in bases], BASE_ROUNDING))):
            for (key, _), allowed in zip(asked, found):
                self._known[key] = self._ids(allowed)
        return [self._known[k] for k in keys]

    def _ids(self, allowed: np.ndarray) -> np.ndarray | None:
        return self.vocab.cell_ids(allowed) if len(allowed) else None  # nothing fits: leave it to the model


def held_cells(grounding: list[Grounding], rows: list[int], per_prompt: int, tags: list[int],
               written: list[list[int]], batch: int) -> list[np.ndarray | None]:
    """Per row of the batch, the voxel ids its grasp's next cell may take (None: not held): `rows` are the
    rows writing a grasp, asked of their prompt's Grounding together."""
    cells: list[np.ndarray | None] = [None] * batch
    for p, g in enumerate(grounding):
        mine = [b for b in rows if b // per_prompt == p]
        for b, allowed in zip(mine, g.next_cells_many([(tags[b], written[b]) for b in mine]) if mine else []):
            cells[b] = allowed
    return cells


def _sample_tokens(logits: torch.Tensor, states: list[GrammarState | None], temperature: float,
                   top_k: int | None, uniforms: torch.Tensor, cells: list[np.ndarray | None] | None = None,
                   cell_temperature: float | None = None, voxel_base: int = 0) -> torch.Tensor:
    """(B,) next tokens from last-position logits (B, V): grammar mask (None rows are free), the voxel ids
    a grounded row's grasp may take next (or None), temperature, top-k; row b samples by inverting its
    distribution's CDF at its own uniform draw uniforms[b].

    With `cell_temperature`, the voxel ids (>= voxel_base) share among themselves the probability the
    `temperature` gives them all, at their own temperature: where a cell goes is sharpened while the
    odds of a cell against a tag, another grasp or `end` stay the model's."""
    logits = logits.float()
    if any(s is not None for s in states):
        logits = logits.masked_fill(~allowed_masks(states, logits.size(-1), logits.device), float("-inf"))
    held = [(b, ids) for b, ids in enumerate(cells or []) if ids is not None]
    if held:  # one scatter for all rows: (row, voxel id) pairs flattened
        keep = torch.ones_like(logits, dtype=torch.bool)
        keep[torch.tensor([b for b, _ in held], device=logits.device)] = False
        flat = np.concatenate([b * logits.size(-1) + ids for b, ids in held])
        keep.view(-1)[torch.from_numpy(flat).to(logits.device)] = True
        logits = logits.masked_fill(~keep, float("-inf"))
    if temperature <= 0:
        return logits.argmax(-1)
    if cell_temperature is not None and cell_temperature > 0:
        cell = logits[:, voxel_base:]
        sharp = cell / cell_temperature
        shift = torch.logsumexp(cell / temperature, -1, keepdim=True) - torch.logsumexp(sharp, -1, keepdim=True)
        logits = torch.cat([logits[:, :voxel_base] / temperature, sharp + shift.nan_to_num(0.0)], -1)
    else:
        logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    cdf = torch.softmax(logits, -1, dtype=torch.float64).cumsum(-1)
    # The first token whose cumulative probability exceeds u * total: never a token of probability 0.
    tok = torch.searchsorted(cdf, (uniforms * cdf[:, -1]).unsqueeze(-1), right=True).squeeze(-1)
    return tok.clamp_(max=logits.size(-1) - 1)


@torch.no_grad()
def decode(model, prompt: np.ndarray, vocab: Vocab, num_samples: int = 1, max_new_tokens: int | None = None,
           temperature: float = 1.0, top_k: int | None = None, constrained: bool | Sequence[bool] = True, seed: int = 0,
           sync: Callable[[bool], bool] | None = None, grounded: bool | Sequence[bool] = False,
           voxel_size: float | None = None, cell_temperature: float | None = None, independent: int = 0) -> Decoded:
    """Sample `num_samples` continuations of `prompt` together, stopping at `end` (decode_many of one prompt).

    With `constrained` every row's logits are masked by its own GrammarState: the grammar, and grasp
    tags limited to the scene's block tags (GrammarState.scene_tags_only); a list of num_samples bools
    says it per row, so constrained and free samples share one batch. temperature <= 0 is greedy. At
    most `max_new_tokens` are written (default and cap: what the model's block size leaves).
    """
    return decode_many(model, [prompt], vocab, num_samples, max_new_tokens, temperature, top_k, constrained,
                       [seed], sync, grounded, voxel_size, cell_temperature, independent)[0]


@torch.no_grad()
def decode_many(model, prompts: Sequence[np.ndarray], vocab: Vocab, num_samples: int = 1,
                max_new_tokens: int | Sequence[int] | None = None, temperature: float = 1.0, top_k: int | None = None,
                constrained: bool | Sequence[bool] = True, seeds: Sequence[int] | None = None,
                sync: Callable[[bool], bool] | None = None,
                grounded: bool | Sequence[bool] = False, voxel_size: float | None = None,
                cell_temperature: float | None = None, independent: int = 0) -> list[Decoded]:
    """`num_samples` continuations of each prompt, all prompts in one batch; one Decoded per prompt.

    The prompts run once, left-padded to the longest with a key mask; their KV cache is kept once per
    prompt, each sample's own keys after it (model.SharedPrefixCache); each step then feeds only the new
    tokens, so the cost per token does not grow with the prompt, and a step costs about the same for one
    row or many. `max_new_tokens` may be one cap per prompt; `constrained` as in `decode`, the same
    pattern for every prompt; `seeds` one per prompt (default 0, 1, ...); the rows' random draws depend
    only on their seed and row.
    Every Decoded reports the batch's forward calls and seconds.

    `grounded` (for all rows or, as a list, per row) also holds constrained rows to the object each grasp
    names: its two finger cells must touch (lie within one cell of) a cell of the scene block with the
    grasp's tag, and not lie inside another block. Given the data's `voxel_size` (metres), grounded rows
    also keep to the gripper's shape (see Grounding): every grasp they write is physically valid.
    `cell_temperature` sharpens (or flattens) where cells go without changing the odds of a cell against
    the other tokens (see _sample_tokens); None: the one `temperature` for all.

    `sync(still_running) -> any_rank_running` keeps ranks in lock-step for ZeRO-3, whose
    forward passes gather parameters collectively: a rank that has finished keeps running a
    one-token dummy forward until every rank has, so all ranks make the same calls.

    `independent` = N > 0: each sample is N grasps, each sampled on its own right after a grasp prompt
    (N rows of one grasp block, joined: join_grasps); `max_new_tokens` then does not apply, and
    `constrained` / `grounded` lists still give one flag per sample.
    """
    prompts = [np.asarray(p, dtype=np.int64) for p in prompts]
    if independent:
        if not all(len(p) and p[-1] == vocab.detectgrasp for p in prompts):
            raise GenerateError("independent grasp sampling continues grasp prompts only (a scene, then "
                                "`detectgrasp`); decode amodal and unseg prompts as one sequence (independent 0)")

        def each_row(flags):  # a sample's flag for each of its rows
            return flags if isinstance(flags, bool) else [f for f in flags for _ in range(independent)]

        outs = decode_many(model, prompts, vocab, num_samples * independent, GRASP_TOKENS, temperature, top_k,
                           each_row(constrained), seeds, sync, each_row(grounded), voxel_size, cell_temperature)
        return [join_grasps(out, independent, vocab) for out in outs]
    P, K, block = len(prompts), num_samples, model.cfg.block_size
    lengths = [len(p) for p in prompts]
    T = max(lengths, default=0)
    for n in lengths:
        if n == 0 or n > block:
            raise GenerateError(f"the prompt has {n} tokens; the model takes 1 to {block} (its block size): "
                                f"use a model trained with a longer max_sequence_length, or a smaller scene")
    if P == 0 or K < 1:
        raise GenerateError(f"need at least one prompt and num_samples >= 1, got {P} prompts, {K} samples")
    if top_k is not None and top_k < 1:
        raise GenerateError(f"top_k must be >= 1 (or unset), got {top_k}")
    room = block - T + 1  # the last new token is never fed back
    caps = [max_new_tokens] * P if max_new_tokens is None or isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(caps) != P:
        raise GenerateError(f"max_new_tokens lists {len(caps)} caps for {P} prompts; give one per prompt")
    caps = [room if c is None else max(0, min(int(c), room)) for c in caps]
    per_row = [bool(constrained)] * K if isinstance(constrained, bool) else [bool(c) for c in constrained]
    ground = [bool(grounded)] * K if isinstance(grounded, bool) else [bool(g) for g in grounded]
    if len(per_row) != K or len(ground) != K:
        raise GenerateError(f"constrained and grounded list {len(per_row)} and {len(ground)} rows but num_samples "
                            f"is {K}; give one per row")
    ground = [g and c for g, c in zip(ground, per_row)]  # grounding is part of constrained decoding
    seeds = list(range(P)) if seeds is None else list(seeds)
    states: list[GrammarState | None] = []
    for p in prompts:
        start = prompt_state(p, vocab, scene_tags_only=True) if any(per_row) else None
        states += [start.copy() if c else None for c in per_row]
    B = P * K
    cap = np.repeat(caps, K)
    device = next(model.parameters()).device
    grounding = [Grounding(p, vocab, voxel_size) if any(ground) else None for p in prompts]
    grasp_tag = [-1] * B  # per row: the tag of the grasp being written
    grasp_cells: list[list[int]] = [[] for _ in range(B)]  # per row: its cells written so far
    uniforms = torch.cat([_row_uniforms(s, K, max(int(cap.max()), 1), device) for s in seeds])
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    try:
        own_len = max(0, int(cap.max()) - 1)  # the last new token is never fed back
        max_len = T if K > 1 else T + own_len
        batch = np.full((P, T), vocab.end, dtype=np.int64)
        key_mask = torch.ones(P, max_len, dtype=torch.bool)
        for r, p in enumerate(prompts):
            batch[r, T - len(p):] = p
            key_mask[r, :T - len(p)] = False
        key_mask = None if min(lengths) == T else key_mask.to(device)  # no padding, no mask
        cache = model.new_kv_cache(P, max_len)
        logits = model.forward_cached(torch.as_tensor(batch, device=device), cache, 0, last_only=True,
                                      key_mask=key_mask)[:, -1]
        if K > 1:  # the prompts' keys stay once per prompt, each sample's own go after them
            cache, key_mask = SharedPrefixCache(cache, T, K, own_len, key_mask), None
            logits = logits.repeat_interleave(K, dim=0)
        rows: list[list[int]] = [[] for _ in range(B)]
        ended = np.zeros(B, dtype=bool)
        done = cap == 0  # wrote `end` or reached its cap
        end = torch.full((B,), vocab.end, device=device)
        dummy, forwards, steps, active = None, 0, 0, not done.all()
        while True:
            if active:
                cells = held_cells(grounding, [b for b, s in enumerate(states) if ground[b % K] and not done[b]
                                               and s.mode == GRASP_BLOCK], K, grasp_tag, grasp_cells, B) \
                    if any(ground) else None
                tok = _sample_tokens(logits, states, temperature, top_k, uniforms[:, steps], cells, cell_temperature,
                                     vocab.voxel_base)
                tok = torch.where(torch.as_tensor(done, device=device), end, tok)  # finished rows repeat `end`
                for b, t in enumerate(tok.tolist()):
                    if not done[b]:
                        rows[b].append(t)
                        if states[b] is not None:
                            if states[b].mode == GRASP_TAG:
                                grasp_tag[b], grasp_cells[b] = t, []
                            elif states[b].mode == GRASP_BLOCK and t >= vocab.voxel_base:
                                grasp_cells[b].append(t)
                            states[b].advance(t)
                        ended[b] = t == vocab.end
                        done[b] = ended[b] or len(rows[b]) >= cap[b]
                steps += 1
                active = not done.all()
            if not (sync(active) if sync is not None else active):
                break
            forwards += 1
            if active:
                logits = model.forward_cached(tok[:, None], cache, T + steps - 1, last_only=True,
                                              key_mask=key_mask)[:, -1]
            else:  # lock-step filler: this rank is done, another is not
                dummy = dummy or model.new_kv_cache(1, 1)
                model.forward_cached(end[:1, None], dummy, 0, last_only=True)
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - t0
    return [Decoded(p, [np.asarray(r, dtype=np.int64) for r in rows[i * K:(i + 1) * K]], ended[i * K:(i + 1) * K],
                    forwards, seconds) for i, p in enumerate(prompts)]


# -- loading a model for a data set -----------------------------------------------------------

def load_checked(checkpoint: str | Path, store: TokenStore, device: str, dtype: str | None = None):
    """(model, meta) of CKPT, checked to share the vocabulary of the data set `store`."""
    if not Path(checkpoint).exists():
        raise GenerateError(f"--checkpoint {checkpoint}: no such file or directory; give an exported model "
                            f"directory or a training checkpoint (OUTPUT/checkpoint_iter_N)")
    try:
        model, meta = load_model(checkpoint, device=device, dtype=getattr(torch, dtype) if dtype else None)
        check_compatible(ModelRecord.from_json(meta, checkpoint), store.vocab, checkpoint, "the model", "the data set",
                         f"Give a data set made on the voxel grid (and vocabulary file) of the model's training data, "
                         f"not {store.path}")
    except CheckpointError as err:  # the artifact layer's errors are CheckpointErrors
        raise GenerateError(str(err)) from None
    return model, meta


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
