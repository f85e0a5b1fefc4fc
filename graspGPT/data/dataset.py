"""Training samples: augmentation, overlong handling, length-grouped batching and collate.

Lengths: `max_len` counts the tokens of a whole sequence, `end` included. The model reads
the first len-1 tokens and predicts the last len-1, so its block size is max_len - 1.

Everything here is a pure function of (seed, epoch, sample index) or (seed, step): every rank
builds the same tokens for a sample whatever the world size, and resuming at optimizer step k
needs nothing but k (pitfalls 1 and 8).
"""
from __future__ import annotations

import dataclasses
import queue
import threading
import time
from dataclasses import dataclass
from typing import Iterator, Protocol

import numpy as np
import torch

from .grammar import Block, GrammarError, Sample, parse, section_starts, serialize
from .vocab import Vocab, VocabError

IGNORE_INDEX = -100  # target of a padded position; cross-entropy skips it
LOSS_ON = ("all", "answer")  # which tokens are targets: the whole sequence, or what follows the scene


class DatasetError(ValueError):
    """Training data or batch settings that cannot work; the message says what to change."""


class SampleStore(Protocol):
    vocab: Vocab
    lengths: np.ndarray

    def __len__(self) -> int: ...
    def __getitem__(self, i: int) -> np.ndarray: ...


# -- augmentation -------------------------------------------------------------------------

@dataclass(frozen=True)
class AugmentConfig:
    """What `TrainingSamples` does to a sample; defaults live in config.py's dataset section."""

    shuffle_blocks: bool  # scene block order and grasp order (before the stable re-sort)
    drop_cell_prob: float  # per scene cell, in blocks of 2+ cells
    max_grasps_per_object: int | None  # per grasp tag; None: no cap
    grasp_order: str  # "sorted" by first cell (the format's order) or "random"
    amodal_prob: float  # labelled scene -> amodal task
    unseg_prob: float  # labelled scene -> unseg task

    def __post_init__(self):
        for name in ("drop_cell_prob", "amodal_prob", "unseg_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise DatasetError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.amodal_prob + self.unseg_prob > 1.0:
            raise DatasetError(f"amodal_prob + unseg_prob must be <= 1 (a sample gets at most one), "
                               f"got {self.amodal_prob} + {self.unseg_prob}")
        if self.grasp_order not in ("sorted", "random"):
            raise DatasetError(f"grasp_order must be 'sorted' or 'random', got {self.grasp_order!r}")
        if self.max_grasps_per_object is not None and self.max_grasps_per_object < 1:
            raise DatasetError(f"max_grasps_per_object must be >= 1 (or None for no cap), got {self.max_grasps_per_object}")

    @classmethod
    def none(cls) -> "AugmentConfig":
        """No augmentation (validation)."""
        return cls(False, 0.0, None, "sorted", 0.0, 0.0)

    @classmethod
    def of(cls, section) -> "AugmentConfig":
        """From any object with these fields as attributes, e.g. the config's dataset section; a positive
        `train_grasps_per_object` there lowers the cap further."""
        fields = {f.name: getattr(section, f.name) for f in dataclasses.fields(cls)}
        per_sample = getattr(section, "train_grasps_per_object", 0)
        if per_sample:
            fields["max_grasps_per_object"] = min(per_sample, fields["max_grasps_per_object"] or per_sample)
        return cls(**fields)

    @classmethod
    def validation(cls, train_grasps_per_object: int = 0) -> "AugmentConfig":
        """No augmentation but the training samples' cap on grasps per object (dataset.train_grasps_per_object,
        0: none): the validation loss then scores sequences like those the model is trained to write (a fixed
        random pick per sample), not the data's longer ones."""
        return dataclasses.replace(cls.none(), max_grasps_per_object=train_grasps_per_object or None)

    @property
    def is_noop(self) -> bool:
        return self == AugmentConfig.none()


def _drop_cells(blocks: list[Block], p: float, rng: np.random.Generator) -> list[Block]:
    out = []
    for b in blocks:
        n = len(b.cells)
        if n < 2:
            out.append(b)
            continue
        keep = rng.random(n) >= p
        if not keep.any():
            keep[rng.integers(n)] = True
        out.append(Block(b.tag, b.cells[keep], None if b.serials is None else b.serials[keep]))
    return out


def _pick_grasps(grasps: list[Block], shuffle: bool, cap: int | None, grasp_order: str,
                 rng: np.random.Generator) -> list[Block]:
    """Shuffle, keep at most `cap` per tag (a random pick), then re-sort by first cell (stable, so ties stay
    shuffled) or keep the random order."""
    shuffle = shuffle or grasp_order == "random" or cap is not None
    order = rng.permutation(len(grasps)) if shuffle else np.arange(len(grasps))
    if cap is not None:
        seen: dict[int, int] = {}
        kept = []
        for i in order:
            t = grasps[i].tag
            if seen.get(t, 0) < cap:
                seen[t] = seen.get(t, 0) + 1
                kept.append(i)
        order = np.asarray(kept, dtype=np.int64)
    if grasp_order == "random":
        return [grasps[i] for i in order]
    firsts = np.array([grasps[i].cells[0] for i in order], dtype=np.int64)
    return [grasps[i] for i in order[np.argsort(firsts, kind="stable")]]


def _capped_length(ids: np.ndarray, vocab: Vocab, cap: int) -> int:
    """The length of `ids` once each object keeps at most `cap` grasps (_pick_grasps; the mean block length of
    each object's grasps where their lengths differ)."""
    starts = np.flatnonzero(ids == vocab.grasp)  # grasp blocks, in the last section: `end` closes the final one
    if len(starts) == 0:
        return len(ids)
    sizes = np.diff(np.append(starts, len(ids) - 1))
    _, which, counts = np.unique(ids[np.minimum(starts + 1, len(ids) - 1)], return_inverse=True, return_counts=True)
    over = np.maximum(counts - cap, 0)
    if not over.any():
        return len(ids)
    mean_size = np.bincount(which, weights=sizes) / counts
    return len(ids) - int(round(float((over * mean_size).sum())))


def _retag(grasps: list[Block] | None, tag: int) -> list[Block] | None:
    return None if grasps is None else [Block(tag, g.cells, g.serials) for g in grasps]


def _convertible(sample: Sample, vocab: Vocab) -> bool:
    """A fully labelled scene with no amodal/unseg target yet (serials can't survive a merge)."""
    return (bool(sample.scene) and sample.amodal is None and sample.unseg is None
            and all(vocab.is_object_tag(b.tag) and b.serials is None for b in sample.scene))


def _all_cells(blocks: list[Block]) -> np.ndarray:
    return np.unique(np.concatenate([b.cells for b in blocks]))


def _to_amodal(sample: Sample, vocab: Vocab, rng: np.random.Generator) -> bool:
    """Single view in, complete scene as target. False if the view sees nothing (sample unchanged)."""
    from .visibility import visible_mask

    cells = _all_cells(sample.scene)
    seen = np.asarray(visible_mask(vocab.cells_of(cells), vocab.dims, rng), dtype=bool)
    if not seen.any():
        return False
    sample.scene = [Block(vocab.incomplete, cells[seen])]
    sample.amodal = cells
    sample.grasps = _retag(sample.grasps, vocab.incomplete)
    return True


def _to_unseg(sample: Sample, vocab: Vocab) -> None:
    """Unsegmented scene in, its labelled blocks as the segmentation target."""
    sample.unseg = sample.scene
    sample.scene = [Block(vocab.unlabel, _all_cells(sample.scene))]
    sample.grasps = _retag(sample.grasps, vocab.unlabel)


def _cut(sample: Sample, max_len: int, rng: np.random.Generator) -> Sample | None:
    """The scene plus whatever whole sections fit, in order, then `end`; None if the scene alone doesn't.

    A section that does not fit is left out (the rest is still a valid task); of the grasps, a
    random subset of whole grasp blocks that fits is kept, in their sorted order (pitfall 14).
    """
    budget = max_len - (2 + sum(len(b) for b in sample.scene))  # scene ... end
    if budget < 0:
        return None
    out = Sample(scene=sample.scene)
    if sample.amodal is not None and sample.amodal_tokens() <= budget:
        out.amodal, out.amodal_serials = sample.amodal, sample.amodal_serials
        budget -= sample.amodal_tokens()
    if sample.unseg is not None:
        size = 2 + sum(len(b) for b in sample.unseg)
        if size <= budget:
            out.unseg = sample.unseg
            budget -= size
    if sample.grasps is not None and budget >= 1:
        order = rng.permutation(len(sample.grasps))
        sizes = np.array([1 + len(sample.grasps[i]) for i in order], dtype=np.int64)  # grasp tag cells
        fit = int(np.searchsorted(np.cumsum(sizes), budget - 1, side="right"))
        if fit or not sample.grasps:  # a grasp section that lost every grasp would teach "no grasps"
            out.grasps = [sample.grasps[i] for i in np.sort(order[:fit])]
    return out


class TrainingSamples:
    """The samples `indices` of a store, augmented per (seed, epoch, index) and fitted to max_len."""

    def __init__(self, store: SampleStore, indices: np.ndarray, max_len: int, augment: AugmentConfig,
                 seed: int, overlong: str = "cut", loss_on: str = "all"):
        if overlong not in ("cut", "drop"):
            raise DatasetError(f"overlong must be 'cut' or 'drop', got {overlong!r}")
        if loss_on not in LOSS_ON:
            raise DatasetError(f"loss_on must be one of {', '.join(LOSS_ON)}, got {loss_on!r}")
        if max_len < 2:
            raise DatasetError(f"max_len must be >= 2 (scene + end), got {max_len}")
        self.indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if self.indices.size and (self.indices.min() < 0 or self.indices.max() >= len(store)):
            raise DatasetError(f"sample indices must be in [0, {len(store)}); the split does not match this data set")
        self.store, self.vocab = store, store.vocab
        self.max_len, self.augment, self.seed, self.overlong = max_len, augment, seed, overlong
        self.loss_on = loss_on
        # Length estimate for batching: augmentation changes lengths a little, cutting caps them, a cap on
        # the grasps per object may shorten them a lot (packed rows are planned from these).
        lengths = np.asarray(store.lengths, dtype=np.int64)[self.indices]
        if augment.max_grasps_per_object is not None:
            lengths = np.array([_capped_length(np.asarray(store[int(i)]), store.vocab, augment.max_grasps_per_object)
                                for i in self.indices], dtype=np.int64)
        self.lengths = np.minimum(lengths, max_len)
        self.stats = {"cut": 0, "dropped": 0, "unparsable": 0, "amodal": 0, "unseg": 0}

    def __len__(self) -> int:
        return len(self.indices)

    def get(self, k: int, epoch: int, limit: int | None = None) -> np.ndarray | None:
        """Tokens (int64, ending in `end`) of the k-th sample in this epoch; None if dropped.

        limit: a cap below max_len on the sample's tokens (the room left in its packed row);
        a longer sample is cut (or dropped) as an overlong one is.
        """
        index = int(self.indices[k])
        ids = np.asarray(self.store[index], dtype=np.int64)
        # Checked here, in the loader's thread, so that the model need not check its targets on the GPU
        # (a host-device synchronization in every forward).
        try:
            self.vocab.check_ids(ids)
        except VocabError as e:
            raise DatasetError(f"sample {index}: {e}; the data set is corrupt: write it again "
                               f"(python -m graspGPT.data)") from None
        max_len = self.max_len if limit is None else min(self.max_len, limit)
        if self.augment.is_noop and len(ids) <= max_len:
            return ids
        rng = np.random.default_rng([self.seed, epoch, index])
        try:
            sample = parse(ids, self.vocab, strict=False)
        except GrammarError:
            self.stats["unparsable"] += 1
            if len(ids) <= max_len:
                return ids
            self.stats["dropped"] += 1  # no section boundaries to cut at
            return None
        self._augment(sample, rng)
        if sample.num_tokens() > max_len:
            if self.overlong == "drop" or (sample := _cut(sample, max_len, rng)) is None:
                self.stats["dropped"] += 1
                return None
            self.stats["cut"] += 1
        return serialize(sample, self.vocab)

    def first_target(self, ids: np.ndarray) -> int:
        """Index of the first token of `ids` that is a training target: 1 (every token after `scene`),
        or with loss_on "answer" the first section opener after the scene (the scene is context only)."""
        if self.loss_on == "all":
            return 1
        return min(section_starts(ids, self.vocab).values())  # every sample ends in `end`, an opener too

    def batch(self, positions: np.ndarray, epoch: int, pad_to_multiple: int = 8) -> Batch:
        """The next-token batch of the samples at `positions` (into this list) in `epoch`."""
        seqs = [self.get(int(k), epoch) for k in positions]
        return collate(seqs, self.vocab.end, pad_to_multiple, self.max_len,
                       [None if s is None else self.first_target(s) for s in seqs])

    def _augment(self, sample: Sample, rng: np.random.Generator) -> None:
        a, vocab = self.augment, self.vocab
        if a.shuffle_blocks:
            sample.scene = [sample.scene[i] for i in rng.permutation(len(sample.scene))]
        if sample.grasps and (a.shuffle_blocks or a.max_grasps_per_object is not None or a.grasp_order == "random"):
            sample.grasps = _pick_grasps(sample.grasps, a.shuffle_blocks, a.max_grasps_per_object, a.grasp_order,
                                         rng)
        u = rng.random()
        task = None
        if _convertible(sample, vocab):
            task = "amodal" if u < a.amodal_prob else "unseg" if u < a.amodal_prob + a.unseg_prob else None
        # Amodal before the cell drop (the completion target stays whole), unseg after it (the
        # segmentation target matches the scene it segments).
        if task == "amodal" and _to_amodal(sample, vocab, rng):
            self.stats["amodal"] += 1
        if a.drop_cell_prob > 0:
            sample.scene = _drop_cells(sample.scene, a.drop_cell_prob, rng)
        if task == "unseg":
            _to_unseg(sample, vocab)
            self.stats["unseg"] += 1


# -- batching -----------------------------------------------------------------------------

class BatchSchedule:
    """Which samples every optimizer step uses, as a pure function of (seed, step).

    Each epoch is a seeded permutation (the remainder below one global batch is dropped). With
    group_by_length, windows of `window` global batches are sorted by length and cut into
    global batches, whose order within the window is shuffled. A global batch depends only on
    its size, never on how it is split into micro x accumulation x world; it is sorted by length
    and cut into micro-batches, dealt to ranks in snake order so neighbours in length run
    together and every rank's total is balanced.
    """

    def __init__(self, lengths: np.ndarray, micro_batch: int, grad_accum: int, world_size: int, seed: int,
                 group_by_length: bool = True, window: int = 32):
        for name, v in (("micro_batch", micro_batch), ("grad_accum", grad_accum), ("world_size", world_size), ("window", window)):
            if v < 1:
                raise DatasetError(f"{name} must be >= 1, got {v}")
        self.lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
        self.micro_batch, self.grad_accum, self.world_size = micro_batch, grad_accum, world_size
        self.seed, self.group_by_length, self.window = seed, group_by_length, window
        self.global_batch_size = micro_batch * grad_accum * world_size
        self.steps_per_epoch = len(self.lengths) // self.global_batch_size
        if self.steps_per_epoch == 0:
            raise DatasetError(
                f"the data set has {len(self.lengths)} training samples, fewer than one global batch of "
                f"{self.global_batch_size} (micro_batch {micro_batch} x grad_accum {grad_accum} x world_size "
                f"{world_size}); use more data or a smaller batch")
        self._plan: tuple[int, np.ndarray] | None = None

    def epoch_of(self, step: int) -> int:
        if step < 0:
            raise DatasetError(f"step must be >= 0, got {step}")
        return step // self.steps_per_epoch

    def _epoch_plan(self, epoch: int) -> np.ndarray:
        """(steps_per_epoch, global_batch) positions for one epoch, cached for the current epoch."""
        plan = self._plan
        if plan is not None and plan[0] == epoch:
            return plan[1]
        G = self.global_batch_size
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.lengths))[: self.steps_per_epoch * G]
        if self.group_by_length:
            parts = []
            for lo in range(0, len(order), self.window * G):
                w = order[lo: lo + self.window * G]
                batches = w[np.argsort(self.lengths[w], kind="stable")].reshape(-1, G)
                parts.append(batches[rng.permutation(len(batches))])
            batches = np.concatenate(parts)
        else:
            batches = order.reshape(-1, G)
        self._plan = (epoch, batches)
        return batches

    def global_batch(self, step: int) -> np.ndarray:
        """Positions (into the sample list) of step's global batch, sorted by length."""
        row = self._epoch_plan(self.epoch_of(step))[step % self.steps_per_epoch]
        return row[np.argsort(self.lengths[row], kind="stable")]

    def micro_batches(self, step: int, rank: int) -> list[np.ndarray]:
        """This rank's grad_accum micro-batches of `step`, in accumulation order."""
        return deal(self.global_batch(step).reshape(-1, self.micro_batch), self.grad_accum, self.world_size, rank)

    def batch_of(self, samples: TrainingSamples, positions: np.ndarray, epoch: int, pad_to_multiple: int = 8) -> Batch:
        """The Batch of one micro-batch of micro_batches()."""
        return samples.batch(positions, epoch, pad_to_multiple)


def deal(micros, grad_accum: int, world_size: int, rank: int) -> list:
    """Rank `rank`'s grad_accum micro-batches of a step's micro-batches, sorted by size: dealt in snake
    order, so neighbours in size run together and every rank's total is balanced."""
    if not 0 <= rank < world_size:
        raise DatasetError(f"rank must be in [0, {world_size}), got {rank}")
    W = world_size
    return [micros[a * W + (rank if a % 2 == 0 else W - 1 - rank)] for a in range(grad_accum)]


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T) long
    targets: torch.Tensor  # (B, T) long, IGNORE_INDEX where no target
    num_targets: int  # real target tokens
    num_tokens: int  # B * T
    # packed rows (packing.py): (n + 1,) int32 starts of the samples in the flattened (B*T) batch, then B*T
    cu_seqlens: torch.Tensor | None = None

    def to(self, device, non_blocking: bool = False) -> "Batch":
        return Batch(self.input_ids.to(device, non_blocking=non_blocking),
                     self.targets.to(device, non_blocking=non_blocking), self.num_targets, self.num_tokens,
                     None if self.cu_seqlens is None else self.cu_seqlens.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "Batch":
        """This batch in page-locked memory (needs CUDA). A copy from pageable memory waits for all the
        GPU's queued work first; from pinned memory `to(device, non_blocking=True)` does not."""
        return Batch(self.input_ids.pin_memory(), self.targets.pin_memory(), self.num_targets, self.num_tokens,
                     None if self.cu_seqlens is None else self.cu_seqlens.pin_memory())


def collate(seqs: list[np.ndarray | None], pad_id: int, pad_to_multiple: int = 8, max_len: int | None = None,
            first_targets: list[int | None] | None = None) -> Batch:
    """Next-token batch: input seq[:-1], target seq[1:], right-padded; dropped (None) samples skipped.

    first_targets: per sequence, the index of its first token that is a target (default 1: all);
    the tokens before it are context only (their targets are IGNORE_INDEX).

    Inputs and targets are separate fresh tensors, so padding can never leak into the
    targets (pitfall 2), and `end` is always a target (pitfall 3). T is the longest input
    rounded up to pad_to_multiple, capped at max_len - 1. With nothing left, one padded row
    with zero targets keeps the shapes valid.
    """
    if first_targets is None:
        first_targets = [1] * len(seqs)
    firsts = [max(1, int(f)) for s, f in zip(seqs, first_targets) if s is not None]
    seqs = [s for s in seqs if s is not None]
    longest = max((len(s) - 1 for s in seqs), default=1)
    T = -(-max(longest, 1) // pad_to_multiple) * pad_to_multiple
    if max_len is not None:
        if longest > max_len - 1:
            raise DatasetError(f"a sequence of {longest + 1} tokens is longer than max_len {max_len}; "
                               f"pass samples through TrainingSamples, which cuts or drops overlong ones")
        T = min(T, max_len - 1)
    B = max(len(seqs), 1)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    targets = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    for row, s in enumerate(seqs):
        s = torch.from_numpy(np.asarray(s, dtype=np.int64))
        input_ids[row, : len(s) - 1] = s[:-1]
        targets[row, firsts[row] - 1: len(s) - 1] = s[firsts[row]:]
    return Batch(input_ids, targets, sum(max(0, len(s) - f) for s, f in zip(seqs, firsts)), B * T)


def val_batches(lengths: np.ndarray, micro_batch: int, world_size: int = 1, rank: int = 0,
                limit: int | None = None) -> list[np.ndarray]:
    """This rank's validation micro-batches: positions into the validation samples.

    Sorted by length (little padding), dealt round-robin; every rank gets the same number of
    batches (empty ones at the end) so collective ops like ZeRO-3's gathers stay in step.
    `limit` takes that many samples spread evenly over the list.
    """
    n = len(lengths)
    positions = np.arange(n, dtype=np.int64)
    if limit is not None and limit < n:
        positions = np.arange(limit, dtype=np.int64) * n // limit
    positions = positions[np.argsort(np.asarray(lengths)[positions], kind="stable")]
    batches = [positions[i: i + micro_batch] for i in range(0, len(positions), micro_batch)]
    per_rank = -(-len(batches) // world_size)
    mine = batches[rank::world_size]
    return mine + [np.zeros(0, dtype=np.int64)] * (per_rank - len(mine))


# -- loading ------------------------------------------------------------------------------

@dataclass
class StepBatches:
    """One optimizer step for one rank: its grad_accum micro-batches."""

    step: int
    epoch: int
    micro: list[Batch]
    num_targets: int  # this rank's; the trainer sums over ranks for the loss denominator
    num_tokens: int
    wait_s: float = 0.0  # time the consumer waited for this step


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


class BatchLoader:
    """Iterator over one rank's optimizer steps from start_step on, built ahead in a daemon thread.

    The batches are a pure function of the step, so prefetch changes timing, never content. The
    schedule is a BatchSchedule (a sample per row) or a packing.PackedSchedule (rows of packed samples).
    pin_memory (training on a GPU): the batches come in page-locked memory, so that copying them to the
    GPU does not wait for the GPU's queued work.
    """

    def __init__(self, samples: TrainingSamples, schedule: BatchSchedule, rank: int, start_step: int,
                 prefetch: int = 2, pad_to_multiple: int = 8, pin_memory: bool = False):
        if start_step < 0 or prefetch < 0:
            raise DatasetError(f"start_step and prefetch must be >= 0, got {start_step} and {prefetch}")
        if not 0 <= rank < schedule.world_size:
            raise DatasetError(f"rank must be in [0, {schedule.world_size}), got {rank}")
        if len(schedule.lengths) != len(samples):
            raise DatasetError(f"the schedule covers {len(schedule.lengths)} samples but there are {len(samples)}; "
                               f"build it from samples.lengths")
        self.samples, self.schedule, self.rank = samples, schedule, rank
        self.pad_to_multiple, self.pin_memory = pad_to_multiple, pin_memory
        self._next_step = start_step
        self._targets = self._tokens = 0
        self._closed = threading.Event()
        self._thread = None
        if prefetch > 0:
            self._queue: queue.Queue = queue.Queue(maxsize=prefetch)
            self._thread = threading.Thread(target=self._produce, args=(start_step,), daemon=True,
                                            name=f"batch-loader-rank{rank}")
            self._thread.start()

    def build(self, step: int) -> StepBatches:
        epoch = self.schedule.epoch_of(step)
        micro = [self.schedule.batch_of(self.samples, positions, epoch, self.pad_to_multiple)
                 for positions in self.schedule.micro_batches(step, self.rank)]
        if self.pin_memory:
            micro = [b.pin_memory() for b in micro]
        return StepBatches(step, epoch, micro, sum(b.num_targets for b in micro), sum(b.num_tokens for b in micro))

    def _put(self, item) -> bool:
        while not self._closed.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                pass
        return False

    def _produce(self, step: int) -> None:
        try:
            while self._put(self.build(step)):
                step += 1
        except BaseException as exc:  # handed to the consumer, raised there
            self._put(_Failure(exc))

    def __iter__(self) -> Iterator[StepBatches]:
        return self

    def __next__(self) -> StepBatches:
        if self._closed.is_set():
            raise StopIteration
        t0 = time.perf_counter()
        if self._thread is None:
            item = self.build(self._next_step)
        else:
            item = self._queue.get()
            if isinstance(item, _Failure):
                self.close()
                raise item.exc
        item.wait_s = time.perf_counter() - t0
        self._next_step += 1
        self._targets += item.num_targets
        self._tokens += item.num_tokens
        return item

    def padding_fraction(self) -> float:
        """Share of the padded input positions consumed so far that carried no target."""
        return 1.0 - self._targets / self._tokens if self._tokens else 0.0

    def close(self) -> None:
        self._closed.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)

    def __enter__(self) -> "BatchLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
