"""Evaluating a model: the validation loss and what its decoded sequences are worth.

The library under `python -m graspGPT.evaluate` (which documents every metric) and the trainer
(`TrainingEvaluator`, `validation_loss`). Each scene's task prompt (decoding.task_prompt) is continued
with the grammar and grounding, with the grammar alone and without either (DECODINGS); the rows of a
scene are scored against its ground truth (grasp_metrics) into counts (COUNT_KEYS) that add over scenes
and ranks, and `summarize` turns summed counts into metrics. Beside them: the loss, each grasp token's
prediction after the true prefix (`teacher_forced_grasps`) and one grasp after a true prefix
(`prefix_precision`).
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist

from .data.dataset import AugmentConfig, TrainingSamples, val_batches
from .data.grammar import Sample, read_blocks, read_output
from .data.storage import TokenStore
from .data.vocab import Vocab
from .decoding import (GenerateError, accepts, decode, decode_many, default_max_new, grasp_list, prompt_state, task_of,
                       task_prompt, truth_of)
from .grasp_metrics import (NEIGHBOURHOOD, GraspScore, correct_grasps, random_grasps, score_grasps, segmentation_counts,
                            untagged, valid_grasps, voxel_iou)

# Each scene is decoded in up to three ways, in one batch; counts of each carry its prefix:
#   ""          constrained, as generation does it: the grammar and the grounding (GROUNDINGS)
#   "grammar_"  the grammar alone, where grounding is on: which object the model binds a tag to by itself
#   "free_"     no mask: what the model learned of the grammar
DECODINGS = ("", "grammar_", "free_")
# What constrained decoding holds each grasp to, besides the grammar (decoding.Grounding):
#   gripper  fingers on the object its tag names, and the gripper's shape: every grasp physically valid
#   fingers  the two fingers on the object only
#   none     nothing: the grammar alone
GROUNDINGS = ("gripper", "fingers", "none")
# Independent grasp sampling decodes this many grasps (rows) of each decoding at once, at most: the quality
# evaluation's 8 scenes of 128 grasps in one batch, 2,048 rows with the grammar-only ones. The prompts' keys are held once
# (model.SharedPrefixCache), so what grows with the rows is the step's (rows, V) logits and masks: ~1.2 GB a
# float copy on the real grid (V = 147,219). On one H200, 1,024 against 256 decoded 1.3x the tokens a second:
# docs/BENCHMARKS.md, "Decoding".
INDEPENDENT_GRASPS_PER_BATCH = 1024
ROW_COUNTS = ("sequences", "valid", "predicted", "correct", "objects", "covered", "any_tag_correct", "feasible")
BASELINE_COUNTS = ("predicted", "correct", "objects", "covered", "any_tag_correct", "feasible")
# Sums kept per scene and added over scenes and ranks; every metric is a ratio of two of them.
COUNT_KEYS = (
    "scenes", *(p + k for p in DECODINGS for k in ROW_COUNTS), *("baseline_" + k for k in BASELINE_COUNTS),
    "amodal_sequences", "amodal_iou_sum", "seg_correct", "seg_cells", "new_tokens", "decode_seconds",
)


def _add(counts: dict[str, float], prefix: str, score: GraspScore) -> None:
    for key in ("predicted", "correct", "objects", "covered"):
        counts[prefix + key] += getattr(score, key)


def evaluate_scene(model, ids: np.ndarray, vocab: Vocab, voxel_size: float, num_samples: int = 1,
                   temperature: float = 1.0, top_k: int | None = None, seed: int = 0, unconstrained: bool = True,
                   max_new_tokens: int | None = None, sync: Callable[[bool], bool] | None = None,
                   grounding: str = "gripper", cell_temperature: float | None = None, independent: int = 0
                   ) -> tuple[dict[str, float], list, Sample]:
    """Counts (COUNT_KEYS) for one sample, the first constrained sequence's grasps, and the truth."""
    return evaluate_batch(model, [ids], vocab, voxel_size, [seed], num_samples, temperature, top_k, unconstrained,
                          max_new_tokens, sync, grounding, cell_temperature, independent)[0]


def evaluate_batch(model, samples: Sequence[np.ndarray], vocab: Vocab, voxel_size: float, seeds: Sequence[int],
                   num_samples: int = 1, temperature: float = 1.0, top_k: int | None = None,
                   unconstrained: bool = True, max_new_tokens: int | None = None,
                   sync: Callable[[bool], bool] | None = None, grounding: str = "gripper",
                   cell_temperature: float | None = None, independent: int = 0
                   ) -> list[tuple[dict[str, float], list, Sample]]:
    """evaluate_scene for several samples decoded in one batch (decode_many): per sample, its counts, the
    first constrained sequence's grasps and the truth. `voxel_size` (metres) is the data's, for the
    physical check and the gripper's shape. `grounding` (GROUNDINGS): what constrained decoding holds each
    grasp to; unless "none", the grammar-only rows are decoded beside it. `independent` = N > 0: each
    sequence is N grasps sampled each on its own right after the scene (decoding.join_grasps; grasp
    prompts only, no free rows). The decoding time is counted once, on the first sample."""
    if grounding not in GROUNDINGS:
        raise GenerateError(f"grounding must be one of {', '.join(GROUNDINGS)}, got {grounding!r}")
    grounded = grounding != "none"
    samples = [np.asarray(ids, dtype=np.int64) for ids in samples]
    truths = [truth_of(ids, vocab) for ids in samples]
    prompts = [task_prompt(ids, vocab, task_of(t)) for ids, t in zip(samples, truths)]
    caps = [max_new_tokens if max_new_tokens is not None else default_max_new(ids, p)
            for ids, p in zip(samples, prompts)]
    unconstrained = unconstrained and not independent  # free rows judge a whole sequence's grammar
    kinds = [""] + (["grammar_"] if grounded else []) + (["free_"] if unconstrained else [])
    rows = [k for k in kinds for _ in range(num_samples)]  # the prefix of each row of a sample
    outs = decode_many(model, prompts, vocab, len(rows), caps, temperature, top_k,
                       constrained=[k != "free_" for k in rows], seeds=seeds, sync=sync,
                       grounded=[k == "" and grounded for k in rows],
                       voxel_size=voxel_size if grounding == "gripper" else None, cell_temperature=cell_temperature,
                       independent=independent)
    results = []
    for i, (out, truth, prompt, seed) in enumerate(zip(outs, truths, prompts, seeds)):
        c = _score(out, truth, prompt, rows, vocab, voxel_size, np.random.default_rng([seed, 1]))
        c["decode_seconds"] = out.seconds if i == 0 else 0.0
        results.append((c, read_output(np.concatenate([prompt, out.new[0]]), vocab).grasps or [], truth))
    return results


def _score(out, truth: Sample, prompt: np.ndarray, rows: list[str], vocab: Vocab, voxel_size: float,
           rng: np.random.Generator) -> dict[str, float]:
    """Counts (COUNT_KEYS) of one sample's decoded rows (`rows`: each one's prefix) against its truth."""
    task = task_of(truth)
    true_grasps = grasp_list(truth.grasps, vocab) if truth.grasps is not None else None
    scene = [(b.tag, vocab.cells_of(b.cells)) for b in truth.scene]
    start = prompt_state(prompt, vocab)
    c = dict.fromkeys(COUNT_KEYS, 0.0)
    c["scenes"] = 1
    c["new_tokens"] = out.new_tokens
    for p, new in zip(rows, out.new):
        c[p + "sequences"] += 1
        c[p + "valid"] += accepts(start, new)
        got = read_output(np.concatenate([prompt, new]), vocab)
        predicted = grasp_list(got.grasps, vocab)
        c[p + "feasible"] += valid_grasps(predicted, scene, vocab.dims, voxel_size).sum()
        if true_grasps is not None:
            _add(c, p, score_grasps(predicted, true_grasps))
            c[p + "any_tag_correct"] += correct_grasps(untagged(predicted), untagged(true_grasps)).sum()
            if p == "":  # the baseline draws as many grasps as the model wrote
                guesses = random_grasps(rng, scene, len(predicted), vocab.dims)
                _add(c, "baseline_", score_grasps(guesses, true_grasps))
                c["baseline_feasible"] += valid_grasps(guesses, scene, vocab.dims, voxel_size).sum()
                c["baseline_any_tag_correct"] += correct_grasps(untagged(guesses), untagged(true_grasps)).sum()
        if p == "" and task == "amodal":
            c["amodal_sequences"] += 1
            c["amodal_iou_sum"] += voxel_iou(got.amodal if got.amodal is not None else [], truth.amodal)
        if p == "" and task == "unseg":
            right, total = segmentation_counts([(b.tag, b.cells) for b in got.unseg or []],
                                               [(b.tag, b.cells) for b in truth.unseg])
            c["seg_correct"] += right
            c["seg_cells"] += total
    return c


def _ratio(a: float, b: float) -> float:
    return a / b if b else 0.0


def summarize(c: dict[str, float]) -> dict[str, float]:
    """Metrics from summed counts: per decoding (DECODINGS: no prefix, grammar_, free_, where decoded)
    and for the random baseline."""
    m: dict[str, float] = {"scenes": int(c["scenes"])}
    for p in DECODINGS:
        if p and not c[p + "sequences"]:
            continue
        m.update({p + "valid_rate": _ratio(c[p + "valid"], c[p + "sequences"]),
                  p + "grasp_precision": _ratio(c[p + "correct"], c[p + "predicted"]),
                  p + "grasp_coverage": _ratio(c[p + "covered"], c[p + "objects"]),
                  p + "any_tag_precision": _ratio(c[p + "any_tag_correct"], c[p + "predicted"]),
                  p + "grasp_validity": _ratio(c[p + "feasible"], c[p + "predicted"]),
                  p + "grasps_per_sequence": _ratio(c[p + "predicted"], c[p + "sequences"])})
    m.update(baseline_precision=_ratio(c["baseline_correct"], c["baseline_predicted"]),
             baseline_coverage=_ratio(c["baseline_covered"], c["baseline_objects"]),
             baseline_any_tag_precision=_ratio(c["baseline_any_tag_correct"], c["baseline_predicted"]),
             baseline_validity=_ratio(c["baseline_feasible"], c["baseline_predicted"]))
    if c["amodal_sequences"]:
        m["amodal_iou"] = c["amodal_iou_sum"] / c["amodal_sequences"]
    if c["seg_cells"]:
        m["seg_accuracy"] = c["seg_correct"] / c["seg_cells"]
    m["decode_tokens_per_s"] = _ratio(c["new_tokens"], c["decode_seconds"])  # prompt forwards included
    return m


def _device_of(model) -> torch.device:
    """Where a model's inputs go: a DeepSpeed engine's device, else its parameters'."""
    device = getattr(model, "device", None)
    return device if device is not None else next(model.parameters()).device


@torch.no_grad()
def validation_loss(model, samples: TrainingSamples, batches: list[np.ndarray]) -> float:
    """Mean next-token loss over every real target token of `batches` (positions into `samples`, unaugmented;
    dataset.val_batches), in eval mode. The trainer's validation loss and evaluate's.

    `model` is a GraspGPT or its DeepSpeed engine. Under a process group every rank calls it with its own
    batches, the same number on every rank so that ZeRO-3's gathers stay in step, and gets the mean over
    all ranks' tokens."""
    device = _device_of(model)
    was_training = model.training
    model.eval()
    loss_sum = count = 0.0
    try:
        for positions in batches:
            batch = samples.batch(positions, epoch=0)
            s, n = model(batch.input_ids.to(device), batch.targets.to(device))
            loss_sum, count = loss_sum + float(s), count + int(n)
    finally:
        model.train(was_training)
    if dist.is_available() and dist.is_initialized():  # float64 keeps token counts exact
        t = torch.tensor([loss_sum, count], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        loss_sum, count = t.tolist()
    return loss_sum / max(count, 1)


GRASP_SLOTS = ("tag", "cell1", "cell2", "cell3")  # the tokens of a grasp block after `grasp`


def grasp_slots(ids: np.ndarray, vocab: Vocab) -> np.ndarray:
    """Per position, the index in GRASP_SLOTS of the token there (tag, first, second, third cell of a
    grasp block, as grammar.read_blocks reads them), or -1 outside grasp blocks (a fourth cell or later
    counts as cell3)."""
    ids = np.asarray(ids, dtype=np.int64)
    slots = np.full(len(ids), -1, np.int64)
    for section, at, cells in read_blocks(ids, vocab):
        if section.field == "grasps" and cells is not None:
            slots[at] = 0
            slots[cells] = np.minimum(np.arange(1, len(cells) + 1), len(GRASP_SLOTS) - 1)
    return slots


def _slot_scores(logits: torch.Tensor, target: np.ndarray, vocab: Vocab) -> tuple[np.ndarray, ...]:
    """Per row of logits (n, V) with true next token `target` (n,): loss, top-1 hit and `near` mass
    (for cells: within one voxel of the true cell; else: of the true token)."""
    logp = torch.log_softmax(logits, dim=-1)
    t = torch.from_numpy(target).to(logits.device)
    loss = -logp.gather(1, t[:, None])[:, 0]
    near = torch.exp(-loss)
    best = logp.argmax(dim=1).cpu().numpy()
    top1 = best == target
    cell = target >= vocab.voxel_base
    if cell.any():
        dims = np.array(vocab.dims)
        around = vocab.cells_of(target[cell])[:, None] + NEIGHBOURHOOD  # (n, 27, 3)
        inside = torch.from_numpy(np.all((around >= 0) & (around < dims), axis=2)).to(logits.device)
        ids = vocab.cell_ids(np.clip(around, 0, dims - 1).reshape(-1, 3)).reshape(around.shape[:2])
        rows = torch.from_numpy(cell).to(logits.device)
        near[rows] = (logp[rows].exp().gather(1, torch.from_numpy(ids).to(logits.device)) * inside).sum(dim=1)
        guess = best[cell]
        hit = guess >= vocab.voxel_base
        gap = np.abs(vocab.cells_of(guess[hit]) - vocab.cells_of(target[cell][hit])).max(axis=1)
        hit[hit] = gap <= 1
        top1[cell] = hit
    return loss.cpu().numpy(), top1.astype(np.float64), near.cpu().numpy()


@torch.no_grad()
def teacher_forced_grasps(model, store, indices: np.ndarray) -> dict[str, float]:
    """How well the model predicts each token of the true grasp blocks, given the true sequence before it.

    Per slot (GRASP_SLOTS): tf_<slot>_loss (mean next-token loss), tf_<slot>_top1 (the most likely token
    is right; for cells: within one voxel of the true cell) and tf_<slot>_near (probability of the true
    tag; for cells: of the 27 cells within one voxel). The product of the four `near` values is roughly the
    chance that sampling at temperature 1 along a true prefix writes that very grasp to within a voxel: it
    tells which part of a grasp the model has not learned when the decoded precision is low."""
    vocab = store.vocab
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    sums = np.zeros((len(GRASP_SLOTS), 4))  # loss, top1, near, count
    chunk = 512
    try:
        for i in indices:
            ids = np.asarray(store[int(i)], dtype=np.int64)[: model.cfg.block_size]
            slots = grasp_slots(ids, vocab)
            where = np.flatnonzero(slots[1:] >= 0) + 1  # positions whose token is predicted from t - 1
            if len(where) == 0:
                continue
            chunks = model.logits_at(torch.from_numpy(ids[None]).to(device),
                                     torch.from_numpy(where - 1).to(device), chunk)
            for lo, logits in zip(range(0, len(where), chunk), chunks):
                at = where[lo: lo + chunk]
                scores = np.stack(_slot_scores(logits, ids[at], vocab) + (np.ones(len(at)),), axis=1)
                np.add.at(sums, slots[at], scores)
    finally:
        model.train(was_training)
    out = {}
    for k, name in enumerate(GRASP_SLOTS):
        if sums[k, 3]:
            out.update({f"tf_{name}_{m}": float(sums[k, j] / sums[k, 3])
                        for j, m in enumerate(("loss", "top1", "near"))})
    return out


def prefix_precision(model, store, scenes: np.ndarray, per_scene: int = 8, temperature: float = 1.0,
                     top_k: int | None = None, seed: int = 0) -> dict[str, float]:
    """One grasp sampled (with the grammar mask) right after each of `per_scene` evenly spaced true
    `grasp` tokens of each scene, given the true sequence before it, and scored like grasp_precision.

    prefix_precision beside grasp_precision separates what the model knows about one grasp from what
    it loses by continuing its own output over hundreds of grasps (the decoded sequences). Also
    prefix_any_tag_precision (cells matching any object's grasp) and prefix_grasps (how many)."""
    vocab = store.vocab
    predicted, correct, any_tag = 0, 0, 0
    for i in scenes:
        ids = np.asarray(store[int(i)], dtype=np.int64)[: model.cfg.block_size]
        truth = truth_of(ids, vocab)
        true = grasp_list(truth.grasps, vocab)
        starts = np.flatnonzero(ids[:-4] == vocab.grasp)  # room for the tag and three cells after it
        if not true or len(starts) == 0:
            continue
        picked = starts[np.unique(np.linspace(0, len(starts) - 1, per_scene).round().astype(int))]
        prompts = [ids[: s + 1] for s in picked]
        outs = decode_many(model, prompts, vocab, 1, 4, temperature, top_k, constrained=True,
                           seeds=[seed + 1000 * int(i) + k for k in range(len(prompts))])
        guesses = []
        for out in outs:
            new = out.new[0]
            cells = new[1:]
            if len(new) == 4 and vocab.is_tag(int(new[0])) and (cells >= vocab.voxel_base).all():
                guesses.append((int(new[0]), vocab.cells_of(cells)))
        predicted += len(prompts)  # a grasp that is not a tag and three cells counts as wrong
        correct += int(correct_grasps(guesses, true).sum())
        any_tag += int(correct_grasps(untagged(guesses), untagged(true)).sum())
    return {"prefix_precision": _ratio(correct, predicted), "prefix_any_tag_precision": _ratio(any_tag, predicted),
            "prefix_grasps": predicted}


def lockstep_sync(device) -> Callable[[bool], bool]:
    """decode()'s `sync` for ZeRO-3: whether any rank is still decoding (one all-reduce per step)."""
    def any_running(active: bool) -> bool:
        flag = torch.tensor([float(active)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
    return any_running


def pick_scenes(indices: np.ndarray, num_scenes: int, seed: int, lengths: np.ndarray | None = None,
                max_len: int | None = None) -> np.ndarray:
    """A fixed, seeded choice of up to num_scenes of `indices`, sorted; with max_len, only samples of at
    most that many tokens (`lengths[i]`), so that every prompt and its answer fit the model.

    Nested: the first num_scenes of one seeded order, so a larger evaluation holds a smaller one's
    scenes and runs evaluated on different counts can be compared on the scenes they share."""
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    if max_len is not None:
        indices = indices[np.asarray(lengths)[indices] <= max_len]
    n = max(0, min(int(num_scenes), len(indices)))
    return np.sort(indices[np.random.default_rng(seed).permutation(len(indices))[:n]])


def grasp_scenes(store, scenes: np.ndarray) -> np.ndarray:
    """Those of `scenes` whose task is grasps: independent grasp sampling continues grasp prompts only."""
    return np.array([i for i in scenes if task_of(truth_of(store[int(i)], store.vocab)) == "grasp"], dtype=np.int64)


def evaluate_scenes(model, store, scenes: np.ndarray, seed: int = 0, rounds: int | None = None,
                    sync: Callable[[bool], bool] | None = None, scenes_per_batch: int = 16,
                    per_scene: list | None = None, **options) -> tuple[dict[str, float], tuple | None]:
    """Summed counts over `scenes` and (index, grasps, truth, counts) of the first, for a picture;
    `per_scene`, if given, receives each scene's (index, counts, grasps): its own counts and the grasp
    blocks of its first constrained sequence.

    Up to `scenes_per_batch` scenes decode together (a step's cost grows far slower than its rows: one
    sequence a row on one H200, 16 scenes decoded 1.6-1.8x the tokens a second of 8, docs/BENCHMARKS.md);
    16 is the trainer's default `eval_scenes`, one batch. Scene i samples with seed + i wherever it is batched. With `sync` (ZeRO-3),
    `rounds` >= len(scenes) is the scene count of the busiest rank: a rank with fewer makes up the
    missing batches with one-token dummy decodes, so that every rank makes the same forward calls.
    """
    counts = dict.fromkeys(COUNT_KEYS, 0.0)
    first = None
    total = len(scenes) if rounds is None else rounds
    if options.get("independent"):  # each scene is then that many rows per decoding: fewer scenes at once
        scenes_per_batch = max(1, min(scenes_per_batch, INDEPENDENT_GRASPS_PER_BATCH // options["independent"]))
    for lo in range(0, total, scenes_per_batch):
        batch = [int(i) for i in scenes[lo: lo + scenes_per_batch]]
        if batch:
            results = evaluate_batch(model, [store[i] for i in batch], store.vocab, store.workspace.voxel_size,
                                     [seed + i for i in batch],
                                     sync=sync, **options)
            for index, (c, grasps, truth) in zip(batch, results):
                counts = {k: counts[k] + c[k] for k in COUNT_KEYS}
                if per_scene is not None:
                    per_scene.append((index, c, grasps))
                first = first or (index, grasps, truth, c)
        elif sync is not None:
            decode(model, np.array([store.vocab.scene]), store.vocab, max_new_tokens=0, sync=sync)
    return counts, first


class TrainingEvaluator:
    """Generation metrics during training, on a fixed set of validation scenes.

    Built once; `run` evaluates the model as it is. The scenes are `num_scenes` of `val_indices`
    picked with `seed`, among those of at most `max_len` tokens (pass the model's block size, so
    no prompt is too long); with `independent` grasp sampling, only the grasp scenes of those. Scene k
    goes to rank k % world; the counts
    are summed over ranks with one all-reduce, so every rank returns the same metrics. Rank 0
    also draws its first scene with the predicted grasps to OUTPUT/eval/step_N.png.

    ZeRO-3 partitions the parameters, and each forward gathers them collectively, so all ranks
    must make the same forward calls: pass lockstep=True. Every rank then runs the same number of
    scenes (ranks with fewer run one-token dummy prompts) and, at each decoding step, agrees
    with the others whether anyone is still writing; a finished rank keeps making dummy
    one-token forwards until all are done. With ZeRO 0-2 every rank holds the whole model and
    decodes its own scenes independently (lockstep=False); ranks only meet at the final sum.
    """

    def __init__(self, store: TokenStore, val_indices: np.ndarray, num_scenes: int, output_dir: str | Path,
                 seed: int = 0, max_len: int | None = None, num_samples: int = 1, temperature: float = 1.0,
                 top_k: int | None = None, unconstrained: bool = True, max_new_tokens: int | None = None,
                 grounding: str = "gripper", cell_temperature: float | None = None, independent: int = 0):
        self.store, self.seed = store, seed
        self.scenes = pick_scenes(val_indices, num_scenes, seed, store.lengths, max_len)
        if independent:
            self.scenes = grasp_scenes(store, self.scenes)
        self.output_dir = Path(output_dir)
        self.options = dict(num_samples=num_samples, temperature=temperature, top_k=top_k,
                            unconstrained=unconstrained, max_new_tokens=max_new_tokens, grounding=grounding,
                            cell_temperature=cell_temperature, independent=independent)

    def run(self, model, step: int, rank: int = 0, world: int = 1, lockstep: bool = False) -> dict:
        """Metrics (see `summarize`, plus eval_seconds) and, on rank 0, "picture": the PNG's path.

        Every rank must call it (the counts are summed over ranks)."""
        if len(self.scenes) == 0:
            return {}
        t0 = time.perf_counter()
        device = next(model.parameters()).device
        distributed = world > 1 and dist.is_available() and dist.is_initialized()
        sync = lockstep_sync(device) if lockstep and distributed else None
        counts, first = evaluate_scenes(model, self.store, self.scenes[rank::world], self.seed,
                                        rounds=-(-len(self.scenes) // world), sync=sync, **self.options)
        if distributed:
            t = torch.tensor([counts[k] for k in COUNT_KEYS], dtype=torch.float64, device=device)
            dist.all_reduce(t)
            counts = dict(zip(COUNT_KEYS, t.tolist()))
        metrics = summarize(counts)
        if rank == 0 and first is not None:
            metrics["picture"] = str(self._draw(step, *first))
        metrics["eval_seconds"] = time.perf_counter() - t0
        return metrics

    def _draw(self, step: int, index: int, grasps: list, truth: Sample, c: dict) -> Path:
        from .data.render import render_sample

        path = self.output_dir / "eval" / f"step_{step}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        title = f"step {step}, sample {index}: {len(grasps)} predicted grasps (red)"
        if c["predicted"]:
            title += f", precision {c['correct'] / c['predicted']:.2f}"
        render_sample(truth, self.store.vocab, path, title=title, predicted=grasps, workspace=self.store.workspace,
                      grasp_cells=self.store.grasp_cells)  # the model is trained on this store: one convention
        return path


def evaluation_scenes(store: TokenStore, indices: np.ndarray, num_scenes: int, seed: int, block_size: int,
                      independent: int = 0) -> np.ndarray:
    """The `num_scenes` of `indices` that `evaluate` decodes (picked with `seed` among those that fit
    `block_size`; with independent grasps, the grasp scenes of those)."""
    scenes = pick_scenes(indices, num_scenes, seed, store.lengths, block_size)
    if independent:
        scenes = grasp_scenes(store, scenes)
    if len(scenes) == 0:
        raise GenerateError(f"no sample of the split fits the model's block size ({block_size} tokens)")
    return scenes


def checkpoint_metrics(model, store: TokenStore, scenes: np.ndarray, loss_on: str = "all", batch_size: int = 4,
                       temperature: float = 1.0, top_k: int | None = None, seed: int = 0,
                       train_grasps_per_object: int = 0) -> dict:
    """What `evaluate` reports beside the decoding: the loss on `scenes` as the trainer's validation scores it
    (loss_on and train_grasps_per_object: the model's dataset.loss_on and dataset.train_grasps_per_object),
    each grasp token's prediction after the true prefix and one grasp after a true prefix (at `temperature`).
    The same for every decoding of one checkpoint."""
    samples = TrainingSamples(store, scenes, model.cfg.block_size, AugmentConfig.validation(train_grasps_per_object),
                              seed=0, loss_on=loss_on)
    loss = validation_loss(model, samples, val_batches(samples.lengths, batch_size))
    metrics = dict(val_loss=loss, val_ppl=math.exp(min(loss, 50.0)))
    metrics.update(teacher_forced_grasps(model, store, scenes))
    metrics.update(prefix_precision(model, store, scenes, temperature=temperature, top_k=top_k, seed=seed))
    return metrics


def evaluate(model, store: TokenStore, indices: np.ndarray, num_scenes: int, seed: int = 0, batch_size: int = 4,
             loss_on: str = "all", per_scene: list | None = None, train_grasps_per_object: int = 0,
             **options) -> dict:
    """Generation metrics and the loss on `num_scenes` of `indices` (picked with `seed`), in one process:
    `evaluation_scenes`, decoded (`evaluate_scenes` with `options`), then `checkpoint_metrics`. `per_scene`,
    if given, receives each scene's (index, counts, grasps) (evaluate_scenes)."""
    scenes = evaluation_scenes(store, indices, num_scenes, seed, model.cfg.block_size, options.get("independent", 0))
    counts, _ = evaluate_scenes(model, store, scenes, seed, per_scene=per_scene, **options)
    return {**summarize(counts), **checkpoint_metrics(model, store, scenes, loss_on, batch_size,
                                                      options.get("temperature", 1.0), options.get("top_k"), seed,
                                                      train_grasps_per_object)}
