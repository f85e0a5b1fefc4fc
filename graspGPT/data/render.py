"""PNG picture of a sample: its voxels as shaded cubes and its grasps as parallel-jaw grippers.

An orthographic view from the front-left and above; cubes are drawn far to near (painter's
algorithm), only their faces that border free space. Pillow only.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .grammar import Block, Sample, parse
from .vocab import SCENE_GRID, Vocab, Workspace

SIZE = (800, 600)
SUPERSAMPLE = 2  # draw at 2x and downscale: smooth edges without an antialiasing rasterizer
AZIMUTH, ELEVATION = np.deg2rad(-102.0), np.deg2rad(42.0)  # camera direction from the scene
AMODAL_ONLY = -1  # colour key of completion cells the scene does not show

# A qualitative palette for the other tags, without reds (red marks predicted grasps).
PALETTE = [
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (148, 103, 189), (23, 190, 207),
    (140, 86, 75), (188, 189, 34), (227, 119, 194), (57, 59, 121), (255, 187, 120),
    (152, 223, 138), (197, 176, 213), (158, 218, 229), (99, 121, 57), (196, 156, 148),
    (140, 109, 49), (123, 65, 115), (82, 84, 163), (181, 207, 107), (231, 186, 82),
]
SPECIAL = {0: (95, 95, 95), 1: (150, 150, 155), 2: (125, 140, 160), AMODAL_ONLY: (222, 222, 230)}
PREDICTED = (235, 0, 35)
BACKGROUND = (250, 250, 248)
FACE_SHADE = (0.80, 0.64, 1.0)  # x faces, y faces, top faces


def tag_colours(tags) -> dict[int, tuple[int, int, int]]:
    """Colour per tag: greys for the special tags, palette colours for the others in tag order.

    Indexing the palette by the tag's rank among the picture's tags (not by the tag id) keeps
    the objects of one picture apart: 88 object tags cannot all get distinct colours.
    """
    tags = sorted({int(t) for t in tags})
    others = [t for t in tags if t not in SPECIAL]
    colours = {t: PALETTE[i % len(PALETTE)] for i, t in enumerate(others)}
    colours.update({t: SPECIAL[t] for t in tags if t in SPECIAL})
    return colours


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


class _View:
    """Orthographic projection of cell coordinates to (supersampled) pixels."""

    def __init__(self, frame: np.ndarray, box: tuple[int, int, int, int]):
        ce, se, ca, sa = np.cos(ELEVATION), np.sin(ELEVATION), np.cos(AZIMUTH), np.sin(AZIMUTH)
        self.to_camera = np.array([ce * ca, ce * sa, se])
        right = np.array([-sa, ca, 0.0])
        up = np.cross(self.to_camera, right)
        self.basis = np.stack([right, -up], axis=1)  # image y grows downwards
        corners = np.array(np.meshgrid(*frame.T, indexing="ij")).reshape(3, -1).T
        flat = corners @ self.basis
        lo, hi = flat.min(0), flat.max(0)
        x0, y0, x1, y1 = box
        self.scale = min((x1 - x0) / (hi[0] - lo[0]), (y1 - y0) / (hi[1] - lo[1]))
        self.offset = np.array([x0 + x1, y0 + y1]) / 2 - self.scale * (lo + hi) / 2

    def __call__(self, points: np.ndarray) -> np.ndarray:
        return (np.asarray(points, dtype=np.float64) @ self.basis) * self.scale + self.offset


def _cell_colours(sample: Sample) -> tuple[np.ndarray, np.ndarray]:
    """Voxel ids to draw and a colour key (tag) each: segment tag > scene tag > amodal-only."""
    ids, keys = [], []
    if sample.amodal is not None:
        ids.append(sample.amodal)
        keys.append(np.full(len(sample.amodal), AMODAL_ONLY))
    for b in list(sample.scene) + list(sample.unseg or []):
        ids.append(b.cells)
        keys.append(np.full(len(b.cells), b.tag))
    if not ids:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    ids, keys = np.concatenate(ids)[::-1], np.concatenate(keys)[::-1]
    ids, first = np.unique(ids, return_index=True)  # the last listed wins
    return ids, keys[first]


def _draw_cubes(draw: ImageDraw.ImageDraw, view: _View, cells: np.ndarray, keys: np.ndarray, dims,
                colours: dict) -> None:
    occ = np.zeros(tuple(d + 2 for d in dims), bool)
    occ[tuple((cells + 1).T)] = True
    side = (view.to_camera > 0).astype(int)  # which face of each axis looks at the camera
    unit = np.eye(3, dtype=int)
    faces = []  # per axis: exposed mask and the 4 corner offsets of that face
    for a in range(3):
        b, c = [i for i in range(3) if i != a]
        n = cells + 1 + (2 * side[a] - 1) * unit[a]
        exposed = ~occ[n[:, 0], n[:, 1], n[:, 2]]
        quad = np.array([side[a] * unit[a] + i * unit[b] + j * unit[c] for i, j in ((0, 0), (1, 0), (1, 1), (0, 1))])
        faces.append((exposed, view(quad) - view(np.zeros((1, 3)))))
    order = np.argsort((cells + 0.5) @ view.to_camera, kind="stable")  # far first
    origin = view(cells)
    outline = view.scale >= 14  # edges help on big cubes, clutter small ones
    for i in order:
        colour = np.array(colours[int(keys[i])])
        for a, (exposed, quad) in enumerate(faces):
            if exposed[i]:
                fill = tuple((colour * FACE_SHADE[a]).astype(int))
                edge = tuple((colour * FACE_SHADE[a] * 0.7).astype(int)) if outline else None
                draw.polygon([tuple(p) for p in origin[i] + quad], fill=fill, outline=edge)


def _content_box(vocab: Vocab, ids: np.ndarray, grasps: list[Block]) -> np.ndarray:
    """(2,3) cell-unit box to frame: cells and grasp points plus a margin, from the table up."""
    pts = [vocab.cells_of(ids)] if len(ids) else []
    for g in grasps:
        c = g.cells[(g.cells >= vocab.voxel_base) & (g.cells < vocab.size)]
        if len(c):
            pts.append(vocab.cells_of(c))
    dims = np.array(vocab.dims)
    if not pts:
        return np.stack([np.zeros(3), dims])
    pts = np.concatenate(pts)
    margin = np.maximum(1, dims // 12)
    lo = np.maximum(0, pts.min(0) - margin)
    hi = np.minimum(dims, pts.max(0) + 1 + margin)
    lo[2] = 0
    return np.stack([lo, hi]).astype(float)


def _draw_floor(draw: ImageDraw.ImageDraw, view: _View, dims) -> None:
    X, Y, Z = dims
    floor = view(np.array([[0, 0, 0], [X, 0, 0], [X, Y, 0], [0, Y, 0]]))
    draw.polygon([tuple(p) for p in floor], fill=(236, 232, 222), outline=(170, 165, 150))
    step = max(1, round(max(X, Y) / 12))
    for x in range(step, X, step):
        draw.line([tuple(p) for p in view(np.array([[x, 0, 0], [x, Y, 0]]))], fill=(222, 217, 205), width=SUPERSAMPLE)
    for y in range(step, Y, step):
        draw.line([tuple(p) for p in view(np.array([[0, y, 0], [X, y, 0]]))], fill=(222, 217, 205), width=SUPERSAMPLE)
    # The back edges of the workspace box give the height a scale.
    for a, b in (((0, Y, 0), (0, Y, Z)), ((X, Y, 0), (X, Y, Z)), ((0, Y, Z), (X, Y, Z))):
        draw.line([tuple(p) for p in view(np.array([a, b]))], fill=(200, 200, 205), width=SUPERSAMPLE)


def _grasp_points(g: Block, vocab: Vocab, workspace: Workspace, grasp_cells: str) -> np.ndarray:
    """(k, 3) grasp points in scene-cell units (voxel c spans [c, c + 1)), so they sit on the cubes."""
    cells = g.cells[(g.cells >= vocab.voxel_base) & (g.cells < vocab.size)]
    metres = workspace.grasp_point(vocab.cells_of(cells), grasp_cells)
    return (metres - np.asarray(workspace.bbox_min)) / workspace.voxel_size


def _gripper_lines(points: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Segments drawing a grasp: a U-shaped gripper from its pose (fingers from the contact points back
    along the approach to the base's level, the palm between them, a short stem), or, without a pose,
    the finger line and the line from its middle to the base."""
    from ..grasp_pose import pose_from_points  # the pose module builds on data/, not the reverse

    pose = pose_from_points(points)
    if pose.problem is None:
        half, back = pose.width / 2 * pose.closing, pose.depth * pose.approach
        tips = [pose.centre - half, pose.centre + half]
        roots = [t - back for t in tips]
        base = pose.centre - back
        return [(tips[0], roots[0]), (tips[1], roots[1]), (roots[0], roots[1]), (base, base - back / 3)]
    lines = [(points[0], points[1])] if len(points) >= 2 else []
    if len(points) == 3:
        lines.append(((points[0] + points[1]) / 2, points[2]))
    return lines


def _draw_grasps(draw: ImageDraw.ImageDraw, view: _View, grasps: list[Block], vocab: Vocab, workspace: Workspace,
                 grasp_cells: str, colour_of, width: int, dots: bool) -> None:
    for g in grasps:
        pts = _grasp_points(g, vocab, workspace, grasp_cells)
        if len(pts) < 2:
            continue
        fill = colour_of(g.tag)
        for a, b in _gripper_lines(pts):
            draw.line([tuple(view(a[None])[0]), tuple(view(b[None])[0])], fill=fill, width=width)
        if dots:
            r = 1.6 * width
            for q in view(pts[:2]):
                draw.ellipse([q[0] - r, q[1] - r, q[0] + r, q[1] + r], fill=fill)


def _legend(sample: Sample, vocab: Vocab, keys: np.ndarray, predicted, colours) -> list[tuple[tuple, str, str]]:
    """(colour, kind, text) rows; kind is "box" for cells and "line" for grasps."""
    rows = []
    tags, counts = np.unique(keys, return_counts=True)
    for t, n in sorted(zip(tags.tolist(), counts.tolist()), key=lambda tn: (tn[0] < 0, tn[0])):
        name = "amodal only" if t == AMODAL_ONLY else str(vocab.token_of(t))
        rows.append((colours[t], "box", f"{name}  {n} cells"))
    if sample.grasps is not None:
        rows.append(((60, 60, 60), "line", f"grasps  {len(sample.grasps)}"))
    if predicted is not None:
        rows.append((PREDICTED, "line", f"predicted  {len(predicted)}"))
    return rows


def cell_workspace(vocab: Vocab) -> Workspace:
    """A workspace whose metres are scene-cell units: for pictures of data whose box is not known."""
    return Workspace((0.0, 0.0, 0.0), tuple(float(d) for d in vocab.dims), 1.0)


def render_sample(sample: Sample, vocab: Vocab, path: str | Path, title: str | None = None,
                  predicted: list[Block] | None = None, workspace: Workspace | None = None,
                  grasp_cells: str = SCENE_GRID, predicted_cells: str | None = None) -> None:
    """Write a PNG of the sample's voxels and grasps (and `predicted` grasps, in red) as grippers.

    Grasp cells are placed with their convention: `grasp_cells` for the sample's grasps, `predicted_cells`
    (default the same) for the predicted ones, on `workspace` (needed for `upstream` cells)."""
    workspace = workspace or cell_workspace(vocab)
    S = SUPERSAMPLE
    W, H = SIZE[0] * S, SIZE[1] * S
    img = Image.new("RGB", (W, H), BACKGROUND)
    draw = ImageDraw.Draw(img)
    ids, keys = _cell_colours(sample)
    font = _font(13 * S)
    grasp_tags = [g.tag for g in (sample.grasps or []) + (predicted or [])]
    colours = tag_colours(np.concatenate([keys, grasp_tags]))
    rows = _legend(sample, vocab, keys, predicted, colours)
    items, title_h, row_h = [], 34 * S, 20 * S
    x, line = 16 * S, 0
    for colour, kind, text in rows:  # legend entries flow left to right along the bottom
        w = 26 * S + int(draw.textlength(text, font=font)) + 18 * S
        if x + w > W - 16 * S and x > 16 * S:
            x, line = 16 * S, line + 1
        items.append((x, line, colour, kind, text))
        x += w
    legend_h = (line + 1) * row_h + 10 * S
    # Frame the objects and grasps (the whole table would leave them small).
    frame = _content_box(vocab, ids, (sample.grasps or []) + (predicted or []))
    view = _View(frame, (16 * S, title_h + 8 * S, W - 16 * S, H - legend_h - 8 * S))
    _draw_floor(draw, view, vocab.dims)
    if len(ids):
        _draw_cubes(draw, view, vocab.cells_of(ids), keys, vocab.dims, colours)

    # Grasps on a translucent layer, so dense grasp sets do not hide the objects.
    layer = Image.new("RGBA", (W, H), (0, 0, 0, 0))
    ldraw = ImageDraw.Draw(layer)

    def dark(tag):
        return tuple(int(v * 0.45) for v in colours[tag]) + (150,)

    _draw_grasps(ldraw, view, sample.grasps or [], vocab, workspace, grasp_cells, dark, width=S, dots=False)
    if predicted is not None:
        _draw_grasps(ldraw, view, predicted, vocab, workspace, predicted_cells or grasp_cells,
                     lambda _: PREDICTED + (235,), width=2 * S, dots=True)
    img = Image.alpha_composite(img.convert("RGBA"), layer).convert("RGB")
    draw = ImageDraw.Draw(img)

    # Title and legend on plain bands, over whatever of the table reaches them.
    draw.rectangle([0, 0, W, title_h], fill=BACKGROUND)
    draw.rectangle([0, H - legend_h, W, H], fill=BACKGROUND)
    layout = "amodal" if sample.amodal is not None else "unseg" if sample.unseg is not None else "scene"
    heading = title or f"{layout}: {len(sample.scene)} blocks, {len(ids)} cells, {len(sample.grasps or [])} grasps"
    draw.text((16 * S, 9 * S), heading, fill=(30, 30, 30), font=_font(17 * S))
    y0 = H - legend_h + 4 * S
    for x, line, colour, kind, text in items:
        y = y0 + line * row_h
        if kind == "box":
            draw.rectangle([x, y + 2 * S, x + 14 * S, y + 14 * S], fill=colour, outline=(90, 90, 90))
        else:
            draw.line([x, y + 8 * S, x + 16 * S, y + 8 * S], fill=colour, width=3 * S)
        draw.text((x + 22 * S, y), text, fill=(40, 40, 40), font=font)
    img.resize(SIZE, Image.LANCZOS).save(path, format="PNG")


def render_tokens(ids: np.ndarray, vocab: Vocab, path: str | Path, **kw) -> None:
    """Parse (non-strict) a whole token sequence and render it; see `render_sample`."""
    render_sample(parse(np.asarray(ids), vocab, strict=False), vocab, path, **kw)
