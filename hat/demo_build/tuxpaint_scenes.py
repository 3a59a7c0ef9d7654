"""Tux Paint Scenes: a deterministic image-caption dataset built from Tux Paint stamps.

The Debian package ``tuxpaint-stamps-default`` (GPL-2+) ships several hundred cut-out
photos and drawings (PNG with alpha) whose ``<stem>.txt`` starts with an English
description ("A brown hen."). Real captioned photo data (Flickr30K, COCO) cannot be
downloaded here, so we composite these cut-outs onto procedural backgrounds and derive
captions, object boxes and phrase groundings from the layout. Everything is written in
the Karpathy split format so a Karpathy reader consumes it unchanged; the extra keys
(``objects``, ``groundings``, ``background``) are ignored by such readers.

Layout of the output folder::

    OUT/dataset_tuxpaint_scenes.json   splits train / val / test / test_unseen
    OUT/dataset_tuxpaint_stamps.json   one image per clean stamp, split test
    OUT/images/<split>/<index>.jpg     scene images (256x256 RGB JPEG)
    OUT/images/stamps/<stamp id>.jpg   single-stamp images
    OUT/LICENSE_STAMPS.txt             the package's copyright file
"""

from __future__ import annotations

import gzip
import json
import math
import random
import re
import shutil
import time
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from hat.demo_build.karpathy_files import karpathy_image, save_jpeg, write_json
from hat.demo_build.packages import fetch_deb

PACKAGE = "tuxpaint-stamps-default"
LICENSE = "GPL-2+"
STAMPS_SUBDIR = Path("usr/share/tuxpaint/stamps")
DOC_SUBDIR = Path("usr/share/doc") / PACKAGE
SCENES_JSON = "dataset_tuxpaint_scenes.json"
STAMPS_JSON = "dataset_tuxpaint_stamps.json"
GALLERY_JSON = "dataset_tuxpaint_gallery.json"
LICENSE_FILE = "LICENSE_STAMPS.txt"

DEFAULT_SIZES: dict[str, int] = {"train": 6000, "val": 500, "test": 1000, "test_unseen": 1000}
SEEN_SPLITS = ("train", "val", "test")
UNSEEN_SPLIT = "test_unseen"
DEFAULT_CACHE = Path.home() / ".cache" / "hat" / "tuxpaint"

# Folders whose stamps all share one caption pattern ("The letter a.", "Zero.",
# "A European coin of 2 cents."): they teach nothing about grounding and make retrieval
# ambiguous.
EXCLUDED_PREFIXES = ("symbols/alphabets/", "symbols/math/", "symbols/money/")
# A first sentence containing one of these words is a remark about the object, not a
# noun phrase that can be dropped into a caption ("A stethoscope lets your doctor ...").
NON_PHRASE_WORDS = frozenset(
    {
        *("is", "are", "was", "were", "be", "can", "means", "lets", "let", "carries"),
        *("carry", "stands", "gets", "makes", "make", "put", "give", "enter", "eat"),
        *("remember", "resembles", "this", "these", "it", "it's", "its", "you", "your", "we"),
    }
)
MAX_DESCRIPTION_WORDS = 8
# Alpha below this is invisible after JPEG compression; such fringes would inflate the
# boxes, so they are cleared before boxes are measured.
ALPHA_MIN = 16
STAMP_MAX_SIDE = 256
# Tiny icons (a 12x36 music rest) turn to blur when blown up further than this.
MAX_UPSCALE = 3.0
STAMP_SET_BACKGROUND = (230, 230, 230)
STAMP_SET_FILL = 0.8
# Longest side of a pasted stamp as a fraction of the image side, by object count.
SIZE_RANGES = {1: (0.30, 0.60), 2: (0.22, 0.42), 3: (0.18, 0.35)}
OBJECT_COUNT_WEIGHTS = {1: 0.3, 2: 0.4, 3: 0.3}
# Two objects may share at most this fraction of the smaller one's box.
MAX_OVERLAP = 0.15
PLACEMENT_TRIES = 40
CAPTIONS_PER_IMAGE = 5

Box = tuple[int, int, int, int]
Part = str | int  # caption pieces: literal text, or the index of an object to name

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (200, 40, 40),
    "orange": (240, 140, 30),
    "yellow": (240, 220, 50),
    "green": (60, 160, 60),
    "blue": (50, 90, 200),
    "purple": (130, 60, 170),
    "pink": (240, 150, 190),
    "brown": (130, 85, 45),
    "black": (25, 25, 25),
    "white": (245, 245, 245),
    "gray": (128, 128, 128),
}
BACKGROUND_KINDS = {"plain": 0.25, "gradient": 0.25, "noise": 0.2, "stripes": 0.15, "checks": 0.15}
COUNT_WORDS = {2: "two", 3: "three"}


@dataclass(frozen=True, eq=False)
class Stamp:
    """A clean stamp: its id (path below the stamps root, no suffix), caption phrase and
    RGBA cut-out cropped to its visible pixels."""

    id: str
    description: str
    image: Image.Image


@dataclass
class StampScan:
    """What `scan_stamps` kept, and why it left the rest out (reason -> stamp ids)."""

    kept: list[Stamp]
    dropped: dict[str, list[str]] = field(default_factory=dict)
    svg_total: int = 0
    svg_without_png: int = 0
    version: str = "unknown"


@dataclass(frozen=True)
class Background:
    """Everything needed to redraw a background, so rendering needs no RNG state."""

    kind: str
    colors: tuple[str, ...]
    rgb: tuple[tuple[int, int, int], ...]
    angle: float
    period: int
    noise_seed: int


@dataclass(frozen=True)
class Placed:
    """A scaled cut-out, its paste position and the tight box of its visible pixels."""

    stamp: Stamp
    cutout: Image.Image
    xy: tuple[int, int]
    box: Box


@dataclass(frozen=True)
class Scene:
    """A composited image and its Karpathy fields before ids and filename are known."""

    image: Image.Image
    record: dict


# --------------------------------------------------------------------------- source


def fetch_stamps_package(cache_dir: Path) -> Path:
    """Download and unpack the Debian package once (no root rights needed); return its stamps
    root."""
    return fetch_deb(PACKAGE, cache_dir) / STAMPS_SUBDIR


def resolve_stamps_root(path: Path) -> Path:
    """Accept either the stamps folder itself or the folder the .deb was unpacked into."""
    path = Path(path)
    return path / STAMPS_SUBDIR if (path / STAMPS_SUBDIR).is_dir() else path


def _package_root(stamps_root: Path) -> Path:
    return stamps_root.parents[len(STAMPS_SUBDIR.parts) - 1]


def package_version(stamps_root: Path) -> str:
    """Read the Debian version from the unpacked changelog (the .deb may be gone)."""
    changelog = _package_root(stamps_root) / DOC_SUBDIR / "changelog.Debian.gz"
    if not changelog.is_file():
        return "unknown"
    with gzip.open(changelog, "rt", encoding="utf-8") as fh:
        match = re.match(r"\S+ \(([^)]+)\)", fh.readline())
    return match.group(1) if match else "unknown"


# ----------------------------------------------------------------------- stamps


def clean_description(first_line: str) -> str | None:
    """Turn a stamp's English line into a lower-case noun phrase, or None if it is not one.

    Keeps the head phrase: text before a dash, without parentheses and quotes, up to the
    first sentence end ("A chocolate easter egg. Yum!" -> "a chocolate easter egg").
    A line that only quotes a road sign's wording ("“Hospital”.") names the sign.
    """
    sign = re.fullmatch(r"\u201c([^\u201d]+)\u201d\.?", first_line.strip())
    if sign:
        wording = sign.group(1).lower()
        return f"{_article(wording)} {wording} sign"
    text = re.sub(r"[\u201c\u201d\"]", "", first_line).replace("\u2019", "'").replace("\u2018", "'")
    text = re.sub(r"(^|\s)'([^']*)'", r"\1\2", text)
    text = re.split(r"\s*[\u2014\u2013]|\s-\s", text, maxsplit=1)[0]
    text = re.sub(r"\s*\([^)]*\)", "", text)
    head, *end = re.split(r"([.!?]+)(?:\s|$)", text.strip(), maxsplit=1)
    words = head.strip(" .!?").lower().split()
    if not words or len(words) > MAX_DESCRIPTION_WORDS or re.search(r"[,;:]", head):
        return None
    if NON_PHRASE_WORDS.intersection(words) or (len(words) == 1 and "!" in "".join(end)):
        return None  # a remark ("A stethoscope lets ...") or an exclamation ("Boom!!!")
    return " ".join(words)


def _cutout(path: Path) -> Image.Image | None:
    """RGBA cut-out cropped to visible pixels and shrunk to at most STAMP_MAX_SIDE."""
    with Image.open(path) as img:
        rgba = img.convert("RGBA")
    rgba = _clear_faint_alpha(rgba)
    bbox = rgba.getchannel("A").getbbox()
    if bbox is None:
        return None
    rgba = rgba.crop(bbox)
    rgba.thumbnail((STAMP_MAX_SIDE, STAMP_MAX_SIDE), Image.Resampling.LANCZOS)
    return _clear_faint_alpha(rgba)


def _clear_faint_alpha(rgba: Image.Image) -> Image.Image:
    alpha = np.asarray(rgba.getchannel("A"))
    faint = (alpha > 0) & (alpha < ALPHA_MIN)
    if not faint.any():
        return rgba
    out = rgba.copy()
    out.putalpha(Image.fromarray(np.where(faint, 0, alpha).astype(np.uint8)))
    return out


def scan_stamps(stamps_root: Path, exclude: Sequence[str] = EXCLUDED_PREFIXES) -> StampScan:
    """Read every PNG stamp with a description and sort it into kept or dropped.

    Dropped reasons: excluded folder (one repeated caption pattern), no description
    (``*_mirror.png`` variants), description that is not a short noun phrase, empty
    image, and duplicate description (the first stamp id in sorted order is kept, since
    identical captions make retrieval ambiguous).
    """
    root = resolve_stamps_root(stamps_root)
    if not root.is_dir():
        raise FileNotFoundError(f"stamps folder not found: {root}")
    dropped: dict[str, list[str]] = {}
    kept: list[Stamp] = []
    seen: set[str] = set()
    # Sort on the posix string: Path ordering differs between Python versions.
    for png in sorted(root.rglob("*.png"), key=lambda p: p.relative_to(root).as_posix()):
        stamp_id = png.relative_to(root).with_suffix("").as_posix()
        reason, description = _judge(png, stamp_id, exclude, seen)
        cutout = _cutout(png) if reason is None else None
        if reason is None and cutout is None:
            reason = "empty image"
        if reason is not None:
            dropped.setdefault(reason, []).append(stamp_id)
            continue
        assert description is not None and cutout is not None
        seen.add(description)
        kept.append(Stamp(stamp_id, description, cutout))
    svgs = sorted(root.rglob("*.svg"))
    return StampScan(
        kept=kept,
        dropped=dropped,
        svg_total=len(svgs),
        svg_without_png=sum(not s.with_suffix(".png").exists() for s in svgs),
        version=package_version(root),
    )


def _judge(
    png: Path, stamp_id: str, exclude: Sequence[str], seen: set[str]
) -> tuple[str | None, str | None]:
    if any(f"{stamp_id}/".startswith(prefix) for prefix in exclude):
        return "excluded folder", None
    txt = png.with_suffix(".txt")
    if not txt.is_file():
        return "no description", None
    lines = txt.read_text(encoding="utf-8", errors="replace").splitlines()
    description = clean_description(lines[0]) if lines else None
    if description is None:
        return "not a noun phrase", None
    if description in seen:
        return "duplicate description", None
    return None, description


def load_stamps(stamps_root: Path) -> list[Stamp]:
    """The clean stamps, sorted by id."""
    return scan_stamps(stamps_root).kept


def split_stamps(
    stamps: Sequence[Stamp], seed: int, heldout_fraction: float
) -> tuple[list[Stamp], list[Stamp]]:
    """(seen, held out): held-out stamps appear only in test_unseen."""
    if len(stamps) < 2:
        raise ValueError(f"need at least 2 clean stamps, found {len(stamps)}")
    order = list(stamps)
    random.Random(f"{seed}:heldout").shuffle(order)
    n_out = min(len(order) - 1, max(1, round(heldout_fraction * len(order))))
    held = sorted(order[:n_out], key=lambda s: s.id)
    seen = sorted(order[n_out:], key=lambda s: s.id)
    return seen, held


# ------------------------------------------------------------------ backgrounds


def random_background(rng: random.Random) -> Background:
    """Colours are named palette entries with a small jitter, so captions can name them."""
    kind = rng.choices(list(BACKGROUND_KINDS), weights=list(BACKGROUND_KINDS.values()))[0]
    names = tuple(rng.sample(sorted(PALETTE), 1 if kind in ("plain", "noise") else 2))
    rgb = tuple(_jitter(PALETTE[name], rng) for name in names)
    return Background(
        kind=kind,
        colors=names,
        rgb=rgb,
        angle=rng.choice((0.0, 45.0, 90.0, 135.0)) + rng.uniform(-10.0, 10.0),
        period=rng.randint(12, 48),
        noise_seed=rng.getrandbits(63),
    )


def _jitter(rgb: tuple[int, int, int], rng: random.Random) -> tuple[int, int, int]:
    r, g, b = (min(255, max(0, c + rng.randint(-15, 15))) for c in rgb)
    return r, g, b


def render_background(bg: Background, size: int) -> np.ndarray:
    """HxWx3 uint8 array of the background."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    theta = math.radians(bg.angle)
    proj = (xx - size / 2) * math.cos(theta) + (yy - size / 2) * math.sin(theta)
    first = np.array(bg.rgb[0], dtype=np.float64)
    if bg.kind == "plain":
        out = np.broadcast_to(first, (size, size, 3))
    elif bg.kind == "gradient":
        t = ((proj - proj.min()) / max(np.ptp(proj), 1e-9))[..., None]
        out = first * (1 - t) + np.array(bg.rgb[1], dtype=np.float64) * t
    elif bg.kind == "noise":
        gen = np.random.default_rng(bg.noise_seed)
        coarse = gen.normal(0.0, 35.0, size=(8, 8)).astype(np.float32)
        smooth = np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC))
        fine = gen.normal(0.0, 6.0, size=(size, size))
        out = first + (smooth + fine)[..., None]
    else:
        if bg.kind == "stripes":
            band = np.floor(proj / bg.period) % 2
        else:
            band = (np.floor(xx / bg.period) + np.floor(yy / bg.period)) % 2
        out = np.where(band[..., None] == 0, first, np.array(bg.rgb[1], dtype=np.float64))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def background_name(bg: Background) -> str:
    """Short label stored in the JSON, e.g. ``gradient blue-white``."""
    return f"{bg.kind} {'-'.join(bg.colors)}"


def background_phrase(bg: Background) -> str:
    """Caption phrase, e.g. ``a blue and white striped background``."""
    pair = " and ".join(bg.colors)
    adjective = {
        "plain": bg.colors[0],
        "noise": f"mottled {bg.colors[0]}",
        "gradient": f"{pair} gradient",
        "stripes": f"{pair} striped",
        "checks": f"{pair} checkered",
    }[bg.kind]
    return f"{_article(adjective)} {adjective} background"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


# ---------------------------------------------------------------------- layout


def scale_cutout(stamp: Stamp, longest: int) -> Image.Image:
    """The stamp resized so its longer side is ``longest`` pixels (at most MAX_UPSCALE
    times its own), faint fringe cleared."""
    w, h = stamp.image.size
    scale = min(longest / max(w, h), MAX_UPSCALE)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return _clear_faint_alpha(stamp.image.resize(size, Image.Resampling.LANCZOS))


def _overlap(a: Box, b: Box) -> float:
    """Intersection as a fraction of the smaller box: small objects must stay visible."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return iw * ih / smaller


def place_stamps(rng: random.Random, stamps: Sequence[Stamp], size: int) -> list[Placed]:
    """Scale and position stamps so no pair overlaps by more than MAX_OVERLAP.

    Shrinks the size range after repeated failures; a stamp that still does not fit is
    left out, so the scene may hold fewer objects than requested.
    """
    lo, hi = SIZE_RANGES[len(stamps)]
    placed: list[Placed] = []
    for stamp in stamps:
        spot = _find_spot(rng, stamp, size, lo, hi, [p.box for p in placed])
        if spot is not None:
            placed.append(spot)
    return placed


def _find_spot(
    rng: random.Random, stamp: Stamp, size: int, lo: float, hi: float, boxes: list[Box]
) -> Placed | None:
    for shrink in (1.0, 0.8, 0.6):
        for _ in range(PLACEMENT_TRIES):
            cutout = scale_cutout(stamp, max(8, round(rng.uniform(lo, hi) * shrink * size)))
            x = rng.randint(0, size - cutout.width)
            y = rng.randint(0, size - cutout.height)
            bx0, by0, bx1, by1 = cutout.getchannel("A").getbbox() or (0, 0, 1, 1)
            box = (x + bx0, y + by0, x + bx1, y + by1)
            if all(_overlap(box, other) <= MAX_OVERLAP for other in boxes):
                return Placed(stamp, cutout, (x, y), box)
    return None


def compose(background: np.ndarray, placed: Sequence[Placed]) -> Image.Image:
    """Alpha-composite the cut-outs, in order, onto the background."""
    canvas = Image.fromarray(background)
    for item in placed:
        canvas.paste(item.cutout, item.xy, item.cutout)
    return canvas


# -------------------------------------------------------------------- captions


def relation(a: Box, b: Box) -> str:
    """Where ``a`` is relative to ``b``; 'next to' when neither axis clearly separates them."""
    dx = (b[0] + b[2] - a[0] - a[2]) / 2
    dy = (b[1] + b[3] - a[1] - a[3]) / 2
    if abs(dx) >= abs(dy) and abs(dx) > (a[2] - a[0] + b[2] - b[0]) / 4:
        return "to the left of" if dx > 0 else "to the right of"
    if abs(dy) > abs(dx) and abs(dy) > (a[3] - a[1] + b[3] - b[1]) / 4:
        return "above" if dy > 0 else "below"
    return "next to"


REGIONS = {
    (0, 0): "in the top left corner",
    (0, 1): "at the top",
    (0, 2): "in the top right corner",
    (1, 0): "on the left",
    (1, 1): "in the middle",
    (1, 2): "on the right",
    (2, 0): "in the bottom left corner",
    (2, 1): "at the bottom",
    (2, 2): "in the bottom right corner",
}


def region(box: Box, size: int) -> str:
    """Which ninth of the image holds the box centre, as a prepositional phrase."""
    col = min(2, int(3 * (box[0] + box[2]) / 2 / size))
    row = min(2, int(3 * (box[1] + box[3]) / 2 / size))
    return REGIONS[(row, col)]


def _listing(order: Sequence[int]) -> list[Part]:
    parts: list[Part] = []
    for pos, obj in enumerate(order):
        if pos:
            parts.append(" and " if pos == len(order) - 1 else ", ")
        parts.append(obj)
    return parts


def caption_templates(
    rng: random.Random, boxes: Sequence[Box], bg: Background, size: int
) -> list[list[Part]]:
    """All candidate captions for a layout, as parts; ints name objects by index."""
    bgp = background_phrase(bg)
    where = [region(b, size) for b in boxes]
    if len(boxes) == 1:
        templates: list[list[Part]] = [
            ["a photo of ", 0],
            ["a picture of ", 0],
            [0],
            [0, " on ", bgp],
            [0, " against ", bgp],
            [0, f" {where[0]}"],
            ["an image of ", 0, f" {where[0]} of the picture"],
            ["a photo of ", 0, " on ", bgp],
        ]
        w, h = boxes[0][2] - boxes[0][0], boxes[0][3] - boxes[0][1]
        if w * h > 0.2 * size * size:
            templates.append(["a close-up of ", 0])
        return templates
    objs = list(range(len(boxes)))
    i, j = rng.sample(objs, 2)
    rel = relation(boxes[i], boxes[j])
    shuffled = rng.sample(objs, len(objs))
    templates = [
        [i, f" {rel} ", j],
        [j, f" {relation(boxes[j], boxes[i])} ", i],
        ["a photo of ", i, f" {rel} ", j],
        _listing(shuffled),
        ["a picture of ", *_listing(rng.sample(objs, len(objs)))],
        [*_listing(rng.sample(objs, len(objs))), " on ", bgp],
        [f"{COUNT_WORDS[len(objs)]} things on ", bgp, ": ", *_listing(shuffled)],
    ]
    if rel in ("to the left of", "to the right of", "next to"):
        templates.append(["there is ", i, " next to ", j])
    else:
        templates.append(["there is ", i, f" {rel} ", j])
    if where[i] != where[j]:
        templates.append([i, f" {where[i]} and ", j, f" {where[j]}"])
    if len(objs) == 3:
        (k,) = set(objs) - {i, j}
        templates.append([i, f" {rel} ", j, ", with ", k, f" {where[k]}"])
    return templates


def render_caption(parts: Sequence[Part], descriptions: Sequence[str]) -> tuple[str, list[dict]]:
    """Join parts into the raw caption and the character span of each named object."""
    raw = ""
    groundings = []
    for part in parts:
        if isinstance(part, int):
            start = len(raw)
            raw += descriptions[part]
            groundings.append({"object": part, "span": [start, len(raw)]})
        else:
            raw += part
    return raw, groundings


def pick_captions(
    rng: random.Random,
    templates: list[list[Part]],
    descriptions: Sequence[str],
    avoid: Collection[str] = (),
) -> list[tuple[str, list[dict]]]:
    """CAPTIONS_PER_IMAGE distinct captions, templates taken in random order (every layout
    has at least eight templates that render differently).

    Captions in ``avoid`` (used earlier in the split) come last: a caption shared by two
    images of one split has no single correct image in retrieval.
    """
    rendered: dict[str, list[dict]] = {}
    for parts in rng.sample(templates, len(templates)):
        raw, groundings = render_caption(parts, descriptions)
        rendered.setdefault(raw, groundings)
    ranked = sorted(rendered.items(), key=lambda item: item[0] in avoid)
    return ranked[:CAPTIONS_PER_IMAGE]


# ---------------------------------------------------------------------- scenes


def _deck(rng: random.Random, stamps: Sequence[Stamp]) -> Iterator[Stamp]:
    """Endless draws that use every stamp once per round, so stamps appear evenly."""
    while True:
        yield from rng.sample(list(stamps), len(stamps))


def make_scene(
    rng: random.Random,
    deck: Iterator[Stamp],
    pool_size: int,
    size: int,
    avoid: Collection[str] = (),
) -> Scene:
    """One composited image with its objects and captions (without ids or filename);
    captions in ``avoid`` are used only when a layout has no fresh ones."""
    count = rng.choices(list(OBJECT_COUNT_WEIGHTS), weights=list(OBJECT_COUNT_WEIGHTS.values()))[0]
    count = min(count, pool_size)
    chosen: list[Stamp] = []
    while len(chosen) < count:
        stamp = next(deck)
        if all(stamp.description != c.description for c in chosen):
            chosen.append(stamp)
    bg = random_background(rng)
    placed = place_stamps(rng, chosen, size)
    image = compose(render_background(bg, size), placed)
    boxes = [p.box for p in placed]
    descriptions = [p.stamp.description for p in placed]
    captions = pick_captions(rng, caption_templates(rng, boxes, bg, size), descriptions, avoid)
    record = {
        "objects": [
            {"stamp": p.stamp.id, "description": p.stamp.description, "box": list(p.box)}
            for p in placed
        ],
        "background": background_name(bg),
        "captions": captions,
    }
    return Scene(image, record)


def _source_info(scan: StampScan, seen: Sequence[Stamp], held: Sequence[Stamp]) -> dict:
    return {
        "package": PACKAGE,
        "version": scan.version,
        "license": LICENSE,
        "license_file": LICENSE_FILE,
        "stamps_kept": len(scan.kept),
        "stamps_seen": len(seen),
        "stamps_heldout": [s.id for s in held],
        "stamps_dropped": {reason: ids for reason, ids in sorted(scan.dropped.items())},
        "svg_skipped": scan.svg_without_png,
    }


def _copy_license(stamps_root: Path, out_dir: Path) -> None:
    src = _package_root(resolve_stamps_root(stamps_root)) / DOC_SUBDIR / "copyright"
    dst = out_dir / LICENSE_FILE
    out_dir.mkdir(parents=True, exist_ok=True)
    if src.is_file():
        shutil.copyfile(src, dst)
    else:
        dst.write_text(
            f"Images contain stamps from the Debian package {PACKAGE} (Tux Paint stamps,\n"
            f"Copyright Bill Kendrick and contributors), licensed {LICENSE}.\n",
            encoding="utf-8",
        )


def build_scenes(
    stamps_root: Path,
    out_dir: Path,
    seed: int = 0,
    sizes: dict[str, int] | None = None,
    heldout_fraction: float = 0.15,
    image_size: int = 256,
    scan: StampScan | None = None,
) -> Path:
    """Write the scene images and ``dataset_tuxpaint_scenes.json``; return the JSON path.

    Each split draws from its own RNG seeded by (seed, split), so a split's first N
    images do not depend on the other splits' sizes.
    """
    scan = scan or scan_stamps(stamps_root)
    unknown = set(sizes or {}) - set(DEFAULT_SIZES)
    if unknown:
        raise ValueError(f"unknown splits {sorted(unknown)}; expected {list(DEFAULT_SIZES)}")
    sizes = {**DEFAULT_SIZES, **(sizes or {})}
    out_dir = Path(out_dir)
    seen, held = split_stamps(scan.kept, seed, heldout_fraction)
    images: list[dict] = []
    sentid = 0
    for split in (*SEEN_SPLITS, UNSEEN_SPLIT):
        pool = held if split == UNSEEN_SPLIT else seen
        rng = random.Random(f"{seed}:{split}")
        deck = _deck(rng, pool)
        used: set[str] = set()
        for index in range(sizes[split]):
            scene = make_scene(rng, deck, len(pool), image_size, used)
            used.update(raw for raw, _ in scene.record["captions"])
            filename = f"{split}/{index:06d}.jpg"
            save_jpeg(scene.image, out_dir / "images" / filename)
            entry = karpathy_image(scene.record, filename, split, len(images), sentid)
            sentid += len(entry["sentids"])
            images.append(entry)
    _copy_license(stamps_root, out_dir)
    info = {"seed": seed, "image_size": image_size, "source": _source_info(scan, seen, held)}
    return _write_dataset("tuxpaint_scenes", info, images, out_dir / SCENES_JSON)


def build_stamp_set(
    stamps_root: Path,
    out_dir: Path,
    seed: int = 0,
    heldout_fraction: float = 0.15,
    image_size: int = 256,
    scan: StampScan | None = None,
) -> Path:
    """One centred image per clean stamp on a light background, captioned by its own
    description; ``unseen`` marks the stamps held out of the scene training splits."""
    scan = scan or scan_stamps(stamps_root)
    out_dir = Path(out_dir)
    seen, held = split_stamps(scan.kept, seed, heldout_fraction)
    heldout_ids = {s.id for s in held}
    background = np.broadcast_to(
        np.array(STAMP_SET_BACKGROUND, dtype=np.uint8), (image_size, image_size, 3)
    )
    images = []
    for imgid, stamp in enumerate(scan.kept):
        cutout = scale_cutout(stamp, round(STAMP_SET_FILL * image_size))
        x, y = (image_size - cutout.width) // 2, (image_size - cutout.height) // 2
        bx0, by0, bx1, by1 = cutout.getchannel("A").getbbox() or (0, 0, 1, 1)
        placed = Placed(stamp, cutout, (x, y), (x + bx0, y + by0, x + bx1, y + by1))
        filename = f"stamps/{stamp.id}.jpg"
        save_jpeg(
            compose(np.ascontiguousarray(background), [placed]), out_dir / "images" / filename
        )
        caption = render_caption([0], [stamp.description])
        record = {
            "captions": [caption],
            "objects": [
                {"stamp": stamp.id, "description": stamp.description, "box": list(placed.box)}
            ],
            "background": "plain light-gray",
            "unseen": stamp.id in heldout_ids,
        }
        images.append(karpathy_image(record, filename, "test", imgid, imgid))
    _copy_license(stamps_root, out_dir)
    info = {"seed": seed, "image_size": image_size, "source": _source_info(scan, seen, held)}
    return _write_dataset("tuxpaint_stamps", info, images, out_dir / STAMPS_JSON)


def _write_dataset(name: str, info: dict, images: list[dict], path: Path) -> Path:
    """A Karpathy-style JSON: the dataset's name, how it was made (``info``), its images."""
    write_json({"dataset": name, **info, "images": images}, path)
    return path


def build_demo_gallery(
    dataset_json: Path,
    out_dir: Path,
    n_images: int = 300,
    split: str = "test",
    max_mb: float = 40.0,
) -> Path:
    """Copy the first ``n_images`` of a split, a Karpathy JSON and ``captions.json``
    (image path below ``images/`` -> its captions) into ``out_dir``; fail above ``max_mb``."""
    dataset_json = Path(dataset_json)
    out_dir = Path(out_dir)
    dataset = json.loads(dataset_json.read_text(encoding="utf-8"))
    picked = [img for img in dataset["images"] if img["split"] == split][:n_images]
    src_root = dataset_json.parent / "images"
    total = sum((src_root / img["filepath"] / img["filename"]).stat().st_size for img in picked)
    if total > max_mb * 1e6:
        raise ValueError(f"gallery would take {total / 1e6:.1f} MB > {max_mb} MB")
    images, captions, sentid = [], {}, 0
    for imgid, img in enumerate(picked):
        src = src_root / img["filepath"] / img["filename"]
        dst = out_dir / "images" / img["filepath"] / img["filename"]
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        sentences = []
        for sentence in img["sentences"]:
            sentences.append({**sentence, "imgid": imgid, "sentid": sentid})
            key = (Path(img["filepath"]) / img["filename"]).as_posix()
            captions.setdefault(key, []).append(sentence["raw"])
            sentid += 1
        images.append(
            {
                **img,
                "imgid": imgid,
                "sentids": [s["sentid"] for s in sentences],
                "sentences": sentences,
            }
        )
    license_src = dataset_json.parent / LICENSE_FILE
    if license_src.is_file():
        shutil.copyfile(license_src, out_dir / LICENSE_FILE)
    (out_dir / "captions.json").write_text(json.dumps(captions, indent=1) + "\n", encoding="utf-8")
    gallery = {**dataset, "dataset": f"{dataset['dataset']}_gallery", "images": images}
    path = out_dir / GALLERY_JSON
    write_json(gallery, path)
    return path


# ---------------------------------------------------------------- whole dataset


def _folder_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e6


def build_dataset(
    out: Path,
    seed: int = 0,
    cache: Path = DEFAULT_CACHE,
    stamps_root: Path | None = None,
    heldout_fraction: float = 0.15,
    sizes: dict[str, int] | None = None,
    gallery: Path | None = None,
) -> None:
    """What ``hat data tuxpaint`` writes: the scenes, the stamp set and, with ``gallery``, a
    small test gallery; prints what was kept and written."""
    start = time.perf_counter()
    stamps_root = stamps_root or fetch_stamps_package(cache)
    scan = scan_stamps(stamps_root)
    sizes = sizes or DEFAULT_SIZES
    scenes = build_scenes(stamps_root, out, seed, sizes, heldout_fraction, scan=scan)
    stamps = build_stamp_set(stamps_root, out, seed, heldout_fraction, scan=scan)
    if gallery:
        build_demo_gallery(scenes, gallery)
    dropped = {reason: len(ids) for reason, ids in sorted(scan.dropped.items())}
    print(
        f"stamps kept {len(scan.kept)}, dropped {sum(dropped.values())} {dropped}, "
        f"SVG-only skipped {scan.svg_without_png}\n"
        f"scenes {sizes} -> {scenes}\nstamp set {len(scan.kept)} -> {stamps}\n"
        f"{_folder_mb(Path(out)):.1f} MB in {time.perf_counter() - start:.1f} s"
    )
