"""Packing: several training samples per row of a fixed number of positions.

A sample of L tokens takes L - 1 positions (inputs ids[:-1], targets ids[1:]). A packed row holds
whole samples back to back and padding after them; `Batch.cu_seqlens` says where each sample starts,
and the model restarts each sample's positions at 0 and lets it attend to itself only, so a row
computes what its samples would one per row, and the loss (a sum over targets) is the same. Every
micro-batch then has the same shape, whatever the samples' lengths, and far fewer padding positions.

Which samples go into which row and step is a pure function of (seed, epoch, step), as for
`dataset.BatchSchedule`: resuming at step k needs nothing but k.
"""
from __future__ import annotations

from bisect import bisect_left, insort

import numpy as np
import torch

from .dataset import IGNORE_INDEX, Batch, DatasetError, TrainingSamples, deal


def pack(sizes: np.ndarray, order: np.ndarray, capacity: int) -> list[np.ndarray]:
    """Rows of indices into `sizes` whose sizes sum to at most `capacity`: best fit, largest first.

    Items are placed from the largest down (ties in the order given), each into the open row it fills
    best, else a new row. The decisions depend only on the sizes in that order, so every order of the
    same sizes gives the same number of rows with the same fills.
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    order = np.asarray(order, dtype=np.int64)
    if len(order) and sizes[order].max() > capacity:
        raise DatasetError(f"an item of size {int(sizes[order].max())} does not fit a row of {capacity}")
    rows: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (room left, row) of the rows still open, sorted
    smallest = int(sizes[order].min()) if len(order) else 0
    for i in order[np.argsort(-sizes[order], kind="stable")].tolist():
        size = int(sizes[i])
        j = bisect_left(room, (size, -1))
        if j == len(room):
            rows.append([i])
            left, row = capacity - size, len(rows) - 1
        else:
            left, row = room.pop(j)
            rows[row].append(i)
            left -= size
        if left >= smallest:  # a row nothing fits into any more is closed
            insort(room, (left, row))
    return [np.asarray(r, dtype=np.int64) for r in rows]


class PackedSchedule:
    """Which packed rows every optimizer step uses, as a pure function of (seed, step).

    Each epoch, the samples in a seeded random order are packed (`pack`) into rows of `row_len`
    positions by their estimated lengths (`TrainingSamples.lengths`, which augmentation only shortens
    unless it adds amodal/unseg targets). The sizes are the same every epoch, so every epoch has the
    same rows' worth of samples; which samples share a row and a step changes. The rows are shuffled
    and each step takes the next global batch of micro_batch x grad_accum x world_size rows (the
    remainder below one global batch is dropped). A step's rows are sorted by fill, cut into
    micro-batches and dealt to the ranks in snake order, so every rank gets about as many tokens.
    """

    def __init__(self, lengths: np.ndarray, row_len: int, micro_batch: int, grad_accum: int, world_size: int,
                 seed: int):
        for name, v in (("row_len", row_len), ("micro_batch", micro_batch), ("grad_accum", grad_accum),
                        ("world_size", world_size)):
            if v < 1:
                raise DatasetError(f"{name} must be >= 1, got {v}")
        self.lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
        self.sizes = np.maximum(self.lengths - 1, 1)  # positions a sample takes
        if len(self.sizes) and self.sizes.max() > row_len:
            raise DatasetError(f"a sample of {int(self.lengths.max())} tokens takes {int(self.sizes.max())} positions, "
                               f"more than a packed row of {row_len}; raise dataset.pack_length to at least "
                               f"max_sequence_length - 1")
        self.row_len, self.micro_batch, self.grad_accum, self.world_size = row_len, micro_batch, grad_accum, world_size
        self.seed = seed
        self.global_batch_size = micro_batch * grad_accum * world_size  # rows
        self._plan: tuple[int, list[np.ndarray]] | None = None
        self.rows_per_epoch = len(pack(self.sizes, np.arange(len(self.sizes)), row_len))
        self.steps_per_epoch = self.rows_per_epoch // self.global_batch_size
        if self.steps_per_epoch == 0:
            raise DatasetError(
                f"the {len(self.lengths)} training samples fill {self.rows_per_epoch} packed rows of {row_len} "
                f"positions, fewer than one global batch of {self.global_batch_size} rows (micro_batch "
                f"{micro_batch} x grad_accum {grad_accum} x world_size {world_size}); use more data, a smaller "
                f"batch or shorter rows")

    def fill(self) -> float:
        """Share of the row positions the samples fill, by their estimated lengths."""
        return float(self.sizes.sum()) / (self.rows_per_epoch * self.row_len)

    def epoch_of(self, step: int) -> int:
        if step < 0:
            raise DatasetError(f"step must be >= 0, got {step}")
        return step // self.steps_per_epoch

    def _epoch_rows(self, epoch: int) -> list[np.ndarray]:
        """The epoch's rows (positions into the sample list) in training order, cached for the current epoch."""
        plan = self._plan
        if plan is not None and plan[0] == epoch:
            return plan[1]
        rng = np.random.default_rng([self.seed, epoch])
        rows = pack(self.sizes, rng.permutation(len(self.sizes)), self.row_len)
        rows = [rows[i] for i in rng.permutation(len(rows))[: self.steps_per_epoch * self.global_batch_size]]
        self._plan = (epoch, rows)
        return rows

    def global_batch(self, step: int) -> list[np.ndarray]:
        """The rows of step's global batch, sorted by estimated fill."""
        G = self.global_batch_size
        lo = (step % self.steps_per_epoch) * G
        rows = self._epoch_rows(self.epoch_of(step))[lo: lo + G]
        fills = [int(self.sizes[r].sum()) for r in rows]
        return [rows[i] for i in np.argsort(fills, kind="stable")]

    def micro_batches(self, step: int, rank: int) -> list[list[np.ndarray]]:
        """This rank's grad_accum micro-batches of `step`, in accumulation order; each a list of rows."""
        rows = self.global_batch(step)
        micros = [rows[i: i + self.micro_batch] for i in range(0, len(rows), self.micro_batch)]
        return deal(micros, self.grad_accum, self.world_size, rank)

    def batch_of(self, samples: TrainingSamples, rows: list[np.ndarray], epoch: int, pad_to_multiple: int = 8) -> Batch:
        """The Batch of one micro-batch of micro_batches() (pad_to_multiple: unused, rows have a fixed length)."""
        return packed_batch(samples, rows, epoch, self.row_len)


def packed_batch(samples: TrainingSamples, rows: list[np.ndarray], epoch: int, row_len: int) -> Batch:
    """Rows of row_len positions holding the samples at `rows` (positions into `samples`) in `epoch`.

    A sample that comes out longer than the room left in its row (possible when augmentation adds
    amodal or unseg targets) is cut to fit, as an overlong one is, or dropped.
    """
    packed = []
    for row in rows:
        seqs, used = [], 0
        for k in row:
            ids = samples.get(int(k), epoch, limit=row_len - used + 1)
            if ids is not None:
                seqs.append((ids, samples.first_target(ids)))
                used += len(ids) - 1
        packed.append(seqs)
    return collate_packed(packed, row_len, samples.vocab.end)


def collate_packed(rows: list[list[tuple[np.ndarray, int]]], row_len: int, pad_id: int) -> Batch:
    """Packed next-token batch: per row, each (ids, first_target) back to back, then padding.

    A sample's inputs are ids[:-1] and its targets ids[1:], the targets before first_target being
    IGNORE_INDEX, so no target crosses into the next sample and `end` is always one (pitfalls 2, 3).
    The padding after the samples is a sample of its own in cu_seqlens (no target; it attends only
    to itself). With no rows, one padding row keeps the shapes valid.
    """
    B = max(len(rows), 1)
    input_ids = torch.full((B, row_len), pad_id, dtype=torch.long)
    targets = torch.full((B, row_len), IGNORE_INDEX, dtype=torch.long)
    starts, num_targets = [], 0
    for r, seqs in enumerate(rows):
        at = 0
        for ids, first in seqs:
            n = len(ids) - 1
            if n < 1:  # a lone token has no target: nothing to train on
                continue
            if at + n > row_len:
                raise DatasetError(f"samples of {[len(i) for i, _ in seqs]} tokens do not fit a packed row of "
                                   f"{row_len} positions (each takes its length - 1)")
            first = max(1, int(first))
            t = torch.from_numpy(np.asarray(ids, dtype=np.int64))
            input_ids[r, at: at + n] = t[:-1]
            targets[r, at + first - 1: at + n] = t[first:]
            starts.append(r * row_len + at)
            num_targets += max(0, n + 1 - first)
            at += n
        if at < row_len:  # the padding
            starts.append(r * row_len + at)
    if not rows:
        starts.append(0)
    cu_seqlens = torch.tensor([*starts, B * row_len], dtype=torch.int32)
    return Batch(input_ids, targets, num_targets, B * row_len, cu_seqlens)
