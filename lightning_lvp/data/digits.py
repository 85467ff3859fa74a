"""Embedded real-image dataset: grids of scikit-learn's handwritten digits, in LLaVA JSON + PNG format.

Each image is a ``grid_size x grid_size`` grid of 8x8 digits from ``sklearn.datasets.load_digits()``
(1,797 real scans, shipped inside scikit-learn, so nothing is downloaded). Questions point at a part
of the image, so the answer cannot be read off the image without the question:

- ``cell``: "What digit is in r3c5?" -> "r3c5 7" (the cell in row 3, column 5; 1 patch matters).
- ``row_count``: "How many 7s are in row2?" -> "7s row2 1" (the ``grid_size`` patches of row 2 matter).
- ``col_count``: "How many 7s are in column4?" -> "7s column4 0" (the patches of column 4 matter).
- ``colour``: "What digit is red?" -> "7". With this type every cell has a background colour of
  :data:`COLOURS`; the asked colour appears exactly once in the image (the other cells use the
  other colours), so ONE patch decides the answer and the question names its CONTENT, as in real
  VQA ("what is the dog doing?"): the patch that matters is found by what it shows, not by where
  it is (docs/RESULTS.md: a content-only decision module cannot find a cell by its name when the
  vision features carry no position; it can find a colour).

A cell, row or column is named by ONE token (``r3c5``, ``row2``) and the short reply restates it
right before the answer, because a tiny LLaVA trained from scratch behind the vicuna_v1 template
only learns the position look-up quickly that way (measurements in ``docs/DATA.md``). Train and validation images are built from disjoint digit samples.
Every entry carries ``question_type`` and ``relevant_patches`` (indices of the vision patches that
decide the answer, row-major like CLIP's patch order); ``{split}_grids.json`` keeps the scikit-learn
index of every digit of every image so answers can be checked against the original labels.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

QUESTION_TYPES = ("cell", "row_count", "col_count", "colour")
# Cell colours of the ``colour`` question type (name -> RGB). A coloured cell is a white digit on a
# background of that colour at BACKGROUND_LEVEL: the strokes show in every channel (with digits drawn
# in pure colours the tiny CLIP had to learn each shape once per channel) and the colour is the same
# over the whole patch whatever the digit's ink (with tinted digits the LLM did not learn to select
# between two shown patches by colour in 1,200 steps).
COLOURS = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 96, 255),
    "yellow": (255, 255, 0),
    "cyan": (0, 255, 255),
    "magenta": (255, 0, 255),
    "white": (255, 255, 255),
    "orange": (255, 128, 0),
}
MAX_GRID_SIZE = 16
_FORMAT_VERSION = 4
# The reply restates the named part right before the answer ("r3c5 7"): the token that predicts the
# answer then names the cell itself, so the look-up is one attention step (docs/DATA.md, measured).
_CELL = ("What digit is in {cell}?", "{cell} {digit}")
_ROW = ("How many {digit}s are in row{line}?", "{digit}s row{line} {count}")
_COL = ("How many {digit}s are in column{line}?", "{digit}s column{line} {count}")
# No restatement: the token that predicts the answer must first read the colour from the question,
# then find the patch (the look-up cannot finish inside the first decoder layer at that token).
_COLOUR = ("What digit is {colour}?", "{digit}")
_COLOUR_RESTATED = ("What digit is {colour}?", "{colour} {digit}")


@dataclass
class DigitsConfig:
    """Shape and size of the digits-grid dataset.

    Args:
        grid_size: cells per side of an image (grid_size^2 digits per image, at most 16).
        cell_px: side of one cell in pixels (the 8x8 digit is scaled up with nearest neighbour).
        patch_size: vision-tower patch side in pixels; only used to compute ``relevant_patches``.
        train_images: number of training images.
        val_images: number of validation images.
        questions_per_type: questions asked about each image for each question type.
        question_types: which question types to generate (subset of ``cell``, ``row_count``, ``col_count``,
            ``colour``); the count types learn far slower from scratch (docs/DATA.md), so the default is
            ``["cell"]``. With ``colour`` in the list every image is drawn in colour.
        val_digit_fraction: fraction of the 1,797 scikit-learn digits kept for validation images only.
        seed: seed of everything random (digit split, grids, questions).
        colour_restate: the ``colour`` reply restates the colour before the digit ("red 7"), which lets the
            answer token find the patch in the first decoder layer; False (default) replies "7", so the
            look-up needs the question read first.
    """

    grid_size: int = 6
    cell_px: int = 8
    patch_size: int = 8
    train_images: int = 8000
    val_images: int = 250
    questions_per_type: int = 2
    question_types: list[str] = field(default_factory=lambda: ["cell"])
    val_digit_fraction: float = 0.2
    seed: int = 0
    colour_restate: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.grid_size <= MAX_GRID_SIZE:
            raise ValueError(f"digits.grid_size must be in [1, {MAX_GRID_SIZE}], got {self.grid_size}")
        if self.cell_px < 8:
            raise ValueError(f"digits.cell_px must be >= 8 (one 8x8 digit per cell), got {self.cell_px}")
        if self.patch_size < 1 or self.image_size % self.patch_size:
            raise ValueError(
                f"digits.patch_size must divide the image side grid_size*cell_px={self.image_size}, got {self.patch_size}"
            )
        unknown = sorted(set(self.question_types) - set(QUESTION_TYPES))
        if unknown or not self.question_types:
            raise ValueError(f"digits.question_types must be a non-empty subset of {QUESTION_TYPES}, got {unknown}")
        if self.questions_per_type < 1:
            raise ValueError(f"digits.questions_per_type must be >= 1, got {self.questions_per_type}")
        if self.coloured and self.questions_per_type > len(COLOURS) - 2:
            raise ValueError(
                f"digits.questions_per_type must be <= {len(COLOURS) - 2} with the colour question type "
                f"(each asked colour appears once, at least two colours are left for the other digits), "
                f"got {self.questions_per_type}"
            )
        if min(self.train_images, self.val_images) < 1:
            raise ValueError("digits.train_images and digits.val_images must be >= 1")
        if not 0.0 < self.val_digit_fraction < 1.0:
            raise ValueError(f"digits.val_digit_fraction must be in (0, 1), got {self.val_digit_fraction}")

    @property
    def coloured(self) -> bool:
        """Digits are drawn in colour (the ``colour`` question type is asked)."""
        return "colour" in self.question_types

    @property
    def image_size(self) -> int:
        """Side of an image in pixels."""
        return self.grid_size * self.cell_px

    @property
    def patches_per_side(self) -> int:
        """Vision patches per image side."""
        return self.image_size // self.patch_size

    def cache_name(self) -> str:
        """Folder name unique to this configuration (and the format version)."""
        digest = hashlib.sha1(json.dumps({**asdict(self), "v": _FORMAT_VERSION}, sort_keys=True).encode())
        return f"digits_g{self.grid_size}_px{self.cell_px}_p{self.patch_size}_s{self.seed}_{digest.hexdigest()[:8]}"


def cell_token(row: int, col: int) -> str:
    """The one-token name of a cell, 1-based: ``cell_token(3, 5) == "r3c5"``."""
    return f"r{row}c{col}"


def digits_vocabulary(max_grid: int = MAX_GRID_SIZE) -> list[str]:
    """Every word the question templates and answers use (for the word-level demo tokenizer)."""
    words = ["What", "digit", "is", "in", "How", "many", "are", "?", *COLOURS]
    words += [str(i) for i in range(max_grid * max_grid + 1)]
    words += [f"{d}s" for d in range(10)]
    words += [f"{axis}{i}" for axis in ("row", "column") for i in range(1, max_grid + 1)]
    words += [cell_token(r, c) for r in range(1, max_grid + 1) for c in range(1, max_grid + 1)]
    return words


def load_digit_pool(seed: int, val_fraction: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Splits scikit-learn's digits into disjoint train/val pools.

    Returns:
        images: (1797, 8, 8) uint8 in [0, 255]; labels: (1797,) int; train_idx, val_idx: disjoint index arrays.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # values 0..16 -> 0..255
    order = np.random.default_rng(seed).permutation(len(images))
    n_val = round(len(images) * val_fraction)
    return images, digits.target.astype(np.int64), np.sort(order[n_val:]), np.sort(order[:n_val])


BACKGROUND_LEVEL = 0.5


def colour_backgrounds() -> np.ndarray:
    """(len(COLOURS), 3) background RGB of a coloured cell, in [0, 255]."""
    return BACKGROUND_LEVEL * np.asarray(list(COLOURS.values()), dtype=np.float64)


def render_grid(
    images: np.ndarray, grid_indices: np.ndarray, cell_px: int, colours: np.ndarray | None = None
) -> Image.Image:
    """Draws digits into a grid image.

    Args:
        images: (N, 8, 8) uint8 digit bitmaps.
        grid_indices: (G, G) indices into ``images``.
        cell_px: cell side in pixels.
        colours: optional (G, G) indices into :data:`COLOURS`: the cell's background colour.

    Returns:
        A mode "L" image of side G * cell_px (white digits on black, as in scikit-learn), or mode
        "RGB" with ``colours``.
    """
    g = grid_indices.shape[0]
    canvas = np.zeros((g * 8, g * 8), dtype=np.uint8)
    for r in range(g):
        for c in range(g):
            canvas[r * 8 : (r + 1) * 8, c * 8 : (c + 1) * 8] = images[grid_indices[r, c]]
    if colours is None:
        image = Image.fromarray(canvas, mode="L")
    else:
        bg = colour_backgrounds()[colours].repeat(8, 0).repeat(8, 1)  # (8G, 8G, 3) per pixel
        ink = canvas[..., None] / 255.0
        image = Image.fromarray(np.round(bg + (255.0 - bg) * ink).astype(np.uint8), mode="RGB")  # white strokes
    if cell_px != 8:
        image = image.resize((g * cell_px, g * cell_px), Image.Resampling.NEAREST)
    return image


def cell_patches(rows: list[int], cols: list[int], cfg: DigitsConfig) -> list[int]:
    """Row-major indices of the vision patches that overlap any of the cells ``(rows[i], cols[i])`` (0-based)."""
    p, n = cfg.patch_size, cfg.patches_per_side
    found: set[int] = set()
    for r, c in zip(rows, cols, strict=True):
        pr = range(r * cfg.cell_px // p, ((r + 1) * cfg.cell_px - 1) // p + 1)
        pc = range(c * cfg.cell_px // p, ((c + 1) * cfg.cell_px - 1) // p + 1)
        found.update(i * n + j for i in pr for j in pc)
    return sorted(found)


def _cell_questions(labels: np.ndarray, k: int, rng: np.random.Generator, cfg: DigitsConfig) -> list[dict]:
    """Up to ``k`` cell questions whose answers (digits) differ from each other. labels: (G, G)."""
    g = cfg.grid_size
    out, used = [], set()
    for flat in rng.permutation(g * g):
        r, c = divmod(int(flat), g)
        if len(out) == k:
            break
        if int(labels[r, c]) in used:
            continue
        used.add(int(labels[r, c]))
        question, answer = (t.format(cell=cell_token(r + 1, c + 1), digit=labels[r, c]) for t in _CELL)
        out.append(dict(type="cell", question=question, answer=answer, rows=[r], cols=[c]))
    return out


def _count_questions(labels: np.ndarray, k: int, axis: str, rng: np.random.Generator, cfg: DigitsConfig) -> list[dict]:
    """Up to ``k`` row/column count questions with different answers; half ask about a digit that is absent.

    labels: (G, G) digit classes of the grid.
    """
    g = cfg.grid_size
    out, used = [], set()
    for _ in range(50 * k):
        if len(out) == k:
            break
        line = int(rng.integers(g))
        values = labels[line] if axis == "row" else labels[:, line]
        present = sorted(set(values.tolist()))
        pool = present if rng.random() < 0.5 or len(present) == 10 else sorted(set(range(10)) - set(present))
        digit = int(pool[rng.integers(len(pool))])
        count = int((values == digit).sum())
        if count in used:
            continue
        used.add(count)
        question, answer = (
            t.format(digit=digit, line=line + 1, count=count) for t in (_ROW if axis == "row" else _COL)
        )
        rows, cols = ([line] * g, list(range(g))) if axis == "row" else (list(range(g)), [line] * g)
        out.append(dict(type=f"{axis}_count", question=question, answer=answer, rows=rows, cols=cols))
    return out


def draw_colours(g: int, k: int, rng: np.random.Generator) -> tuple[np.ndarray, list[int]]:
    """Colours of a G x G grid: ``k`` colours that appear exactly once, the other cells in the rest.

    Returns:
        colours: (G, G) indices into :data:`COLOURS`; unique: the ``k`` colour indices that appear once.
    """
    order = rng.permutation(len(COLOURS))
    unique, others = order[:k], order[k:]
    flat = others[rng.integers(len(others), size=g * g)]
    flat[rng.choice(g * g, size=k, replace=False)] = unique
    return flat.reshape(g, g), [int(c) for c in unique]


def _colour_questions(labels: np.ndarray, colours: np.ndarray, unique: list[int], restate: bool) -> list[dict]:
    """One question per once-only colour: "What digit is red?" -> the digit drawn in red."""
    names = list(COLOURS)
    out = []
    for c in unique:
        (r,), (col,) = np.nonzero(colours == c)
        template = _COLOUR_RESTATED if restate else _COLOUR
        question, answer = (t.format(colour=names[c], digit=labels[r, col]) for t in template)
        out.append(dict(type="colour", question=question, answer=answer, rows=[int(r)], cols=[int(col)]))
    return out


def make_questions(
    labels: np.ndarray,
    rng: np.random.Generator,
    cfg: DigitsConfig,
    colours: np.ndarray | None = None,
    unique: list[int] | None = None,
) -> list[dict]:
    """All questions about one grid: ``questions_per_type`` per type, answers distinct within a type.

    Args:
        labels: (G, G) digit classes of the grid.
        colours, unique: the grid's colours and once-only colours (:func:`draw_colours`), for ``colour``.

    Returns:
        dicts with ``type``, ``question``, ``answer`` and the 0-based ``rows``/``cols`` of the cells that matter.
    """
    k = cfg.questions_per_type
    out: list[dict] = []
    for qtype in cfg.question_types:
        if qtype == "cell":
            out += _cell_questions(labels, k, rng, cfg)
        elif qtype == "colour":
            out += _colour_questions(labels, colours, unique, cfg.colour_restate)
        else:
            out += _count_questions(labels, k, qtype.removesuffix("_count"), rng, cfg)
    return out


def _build_split(split: str, n_images: int, pool: np.ndarray, images: np.ndarray, labels: np.ndarray,
                 rng: np.random.Generator, cfg: DigitsConfig, root: Path) -> tuple[list[dict], dict, dict]:  # fmt: skip
    """Writes the PNGs of one split under ``root/split``; returns its entries, grids and colours (or {})."""
    (root / split).mkdir(parents=True, exist_ok=True)
    g = cfg.grid_size
    entries, grids, colour_of = [], {}, {}
    for i in range(n_images):
        grid = pool[rng.integers(len(pool), size=(g, g))]  # (G, G) indices into the scikit-learn digits
        colours, unique = draw_colours(g, cfg.questions_per_type, rng) if cfg.coloured else (None, None)
        rel = f"{split}/{i:06d}.png"
        render_grid(images, grid, cfg.cell_px, colours).save(root / rel, optimize=False)
        grids[rel] = grid.reshape(-1).tolist()
        if colours is not None:
            colour_of[rel] = colours.reshape(-1).tolist()
        for j, q in enumerate(make_questions(labels[grid], rng, cfg, colours, unique)):
            entries.append(
                {
                    "id": f"digits-{split}-{i:06d}-{j}",
                    "image": rel,
                    "conversations": [
                        {"from": "human", "value": "<image>\n" + q["question"]},
                        {"from": "gpt", "value": q["answer"]},
                    ],
                    "question_type": q["type"],
                    "relevant_patches": cell_patches(q["rows"], q["cols"], cfg),
                }
            )
    return entries, grids, colour_of


def build_digits_dataset(cfg: DigitsConfig, root: str | os.PathLike) -> None:
    """Writes ``train.json``, ``val.json``, ``{split}_grids.json``, ``meta.json`` and the PNGs into ``root``
    (and ``{split}_colours.json``, the :data:`COLOURS` index of every cell, for coloured grids).

    Deterministic for ``cfg`` (same bytes for the same config). Train and validation grids are drawn
    from disjoint digit samples.
    """
    root = Path(root)
    images, labels, train_pool, val_pool = load_digit_pool(cfg.seed, cfg.val_digit_fraction)
    seeds = np.random.SeedSequence(cfg.seed).spawn(2)
    for split, n, pool, seq in (
        ("train", cfg.train_images, train_pool, seeds[0]),
        ("val", cfg.val_images, val_pool, seeds[1]),
    ):
        entries, grids, colours = _build_split(split, n, pool, images, labels, np.random.default_rng(seq), cfg, root)
        (root / f"{split}.json").write_text(json.dumps(entries, indent=0))
        (root / f"{split}_grids.json").write_text(json.dumps(grids))
        if colours:
            (root / f"{split}_colours.json").write_text(json.dumps(colours))
    meta = {"config": asdict(cfg), "format_version": _FORMAT_VERSION, "sklearn_digits": len(images)}
    (root / "meta.json").write_text(json.dumps(meta, indent=2))


def ensure_digits_dataset(cfg: DigitsConfig, cache_dir: str | os.PathLike) -> Path:
    """Builds the dataset into ``cache_dir/<cfg.cache_name()>`` unless it is already there; returns that folder.

    Writes into a temporary sibling folder first and renames it, so an interrupted build leaves no
    half-written dataset behind and concurrent builders do not collide.
    """
    final = Path(cache_dir).expanduser() / cfg.cache_name()
    if (final / "meta.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    log.info("building the digits dataset into %s", final)
    build_digits_dataset(cfg, tmp)
    try:
        os.replace(tmp, final)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
        if not (final / "meta.json").is_file():
            raise
    return final
