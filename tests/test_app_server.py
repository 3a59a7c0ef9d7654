"""The demo as people and programs meet it: `python app.py` on localhost, every named endpoint
through gradio_client, the bad inputs of issue 5, 20 users at once, and a headless Chromium."""

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from tests.test_app_logic import make_zip, png_bytes, write_demo_assets

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
]
APP_DIRS = ("cache", "tmp", "gradio")  # where the app may write
USERS = 20
TIMEOUT = {"timeout": 60}  # seconds, for each request of a test's client


@dataclass
class Server:
    url: str
    root: Path
    process: subprocess.Popen
    gallery: Path
    inputs: Path

    def client(self) -> Client:
        # (httpx's default of 5 s a request is short for a loaded two-core runner)
        downloads = str(self.root / "downloads")
        return Client(self.url, verbose=False, download_files=downloads, httpx_kwargs=TIMEOUT)

    def files_outside_app_dirs(self) -> set[str]:
        skip = {*APP_DIRS, "downloads", "inputs"}
        return {
            p.relative_to(self.root).as_posix()
            for p in self.root.rglob("*")
            if p.relative_to(self.root).parts[0] not in skip
        }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, process: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the app exited with {process.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"the app did not answer within {timeout} s:\n{log.read_text()}")


def launch(root: Path, checkpoint: Path, gallery: Path) -> Server:
    """``python app.py`` on a free port, writing only below ``root`` (cache, tmp, gradio). Its
    temp folder is named through a symlink, as on macOS (``/var/folders`` → ``/private/var``)."""
    (root / "tmp").mkdir(exist_ok=True)
    if not (root / "link").is_symlink():
        (root / "link").symlink_to(root)
    env = {
        **os.environ,
        "HAT_CACHE": str(root / "cache"),
        "TMPDIR": str(root / "link" / "tmp"),
        "GRADIO_TEMP_DIR": str(root / "gradio"),
        "GRADIO_ANALYTICS_ENABLED": "False",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "2",
        "GRADIO_HEARTBEAT_INTERVAL": "1",  # a closed page is noticed within seconds
    }
    (root / "inputs").mkdir(exist_ok=True)
    port = free_port()
    log = root / "server.log"
    command = [sys.executable, "app.py", "--checkpoint", str(checkpoint), "--gallery", str(gallery)]
    with log.open("a") as out:
        process = subprocess.Popen(
            [*command, "--port", str(port)], cwd=ROOT, env=env, stdout=out, stderr=out
        )
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_until_up(url, process, log)
    except BaseException:
        process.kill()
        raise
    return Server(url, root, process, gallery, root / "inputs")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("app")
    app = launch(root, *write_demo_assets(root))
    try:
        yield app
    finally:
        app.process.terminate()
        app.process.wait(timeout=30)


@pytest.fixture(scope="module")
def client(server):
    return server.client()


@pytest.fixture(scope="module")
def before(server):
    """Files outside the app's own folders, and in the repository, before the bad inputs."""
    return server.files_outside_app_dirs(), set(os.listdir(ROOT))


# ---------------------------------------------------------------- inputs
def image_file(folder: Path, name: str, data: bytes) -> str:
    path = folder / name
    path.write_bytes(data)
    return str(path)


def encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def odd_but_valid_images() -> dict[str, bytes]:
    ramp = (np.arange(64 * 48, dtype=np.uint16).reshape(48, 64) * 20).astype(np.uint16)
    frames = [Image.new("RGB", (40, 40), c) for c in ((255, 0, 0), (0, 0, 255))]
    return {
        "16-bit.png": encoded(Image.fromarray(ramp), "PNG"),
        "cmyk.jpg": encoded(Image.new("CMYK", (50, 40), (0, 200, 200, 0)), "JPEG"),
        "animated.gif": encoded(frames[0], "GIF", save_all=True, append_images=frames[1:]),
        "transparent.png": encoded(Image.new("RGBA", (30, 30), (0, 255, 0, 100)), "PNG"),
    }


def bad_images() -> dict[str, tuple[bytes, str]]:
    """File name → (content, what the refusal must say)."""
    photo = encoded(Image.effect_noise((64, 64), 40).convert("RGB"), "JPEG")
    bomb = encoded(Image.new("1", (9000, 9000)), "PNG")  # 81 Mpixel in 10 kB
    return {
        "not-an-image.png": (b"plain text, not pixels", "cannot identify image file"),
        "empty.jpg": (b"", "empty (0 bytes)"),
        "truncated.jpg": (photo[: len(photo) // 3], "cannot be used as an image"),
        "bomb.png": (bomb, "pixels exceeds"),
    }


def cookie_header(cookies: dict[str, str] | None) -> dict[str, str]:
    return {"Cookie": "; ".join(f"{k}={v}" for k, v in cookies.items())} if cookies else {}


def http_get(url: str, cookies: dict[str, str] | None = None) -> tuple[int, bytes]:
    try:
        request = urllib.request.Request(url, headers=cookie_header(cookies))
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def call_api(server: Server, endpoint: str, data: list, cookies: dict[str, str] | None) -> str:
    """``POST /gradio_api/call/<endpoint>`` as a plain HTTP client: the answer's event stream,
    or ``refused <status>``."""
    call = f"{server.url}gradio_api/call/{endpoint}"
    headers = {"Content-Type": "application/json", **cookie_header(cookies)}
    body = json.dumps({"data": data}).encode()
    try:
        request = urllib.request.Request(call, data=body, headers=headers)
        with urllib.request.urlopen(request, timeout=60) as response:
            event = json.load(response)["event_id"]
    except urllib.error.HTTPError as error:
        return f"refused {error.code}"
    request = urllib.request.Request(f"{call}/{event}", headers=cookie_header(cookies))
    with urllib.request.urlopen(request, timeout=120) as response:
        return response.read().decode()


def refusal(call) -> str:
    with pytest.raises(AppError) as error:
        call()
    return str(error.value)


# ---------------------------------------------------------------- endpoints
def test_info_names_the_model_the_device_and_every_level(client, before):
    info = client.predict(api_name="/info")
    assert info["model"] == "hat-tiny" and info["device"] in ("cpu", "cuda")
    assert info["encode_precision"] == "fp32"  # as tests/conftest.py asks
    assert [level["image_layer"] for level in info["levels"]] == [
        "layers.1",
        "layers.2",
        "layers.3",
    ]
    assert info["gallery_images"] == 5 and info["gallery_captions"] == 10


def test_text_to_image_returns_top_k_with_per_level_scores(client, server):
    images, table, status = client.predict(
        "a square of colour 2", 3, "built-in", api_name="/search_text"
    )
    assert len(images) == 3 and [item["caption"][:3] for item in images] == ["#1 ", "#2 ", "#3 "]
    for item, row in zip(images, table["data"], strict=True):  # links, not files to download
        code, data = http_get(item["image"])
        assert code == 200 and data == (server.gallery / "images" / row[1]).read_bytes()
    assert table["headers"] == ["rank", "image", "score", "level 1", "level 2", "level 3"]
    totals = [row[2] for row in table["data"]]
    assert totals == sorted(totals, reverse=True)
    assert all(abs(row[2] - sum(row[3:])) < 1e-3 for row in table["data"])
    assert "re-ranked exactly on cpu" in status


def test_image_to_text_ranks_the_caption_bank(client, server):
    query = handle_file(str(server.gallery / "images" / "1.png"))
    table, status = client.predict(query, 4, "built-in", api_name="/search_image")
    assert table["headers"][:4] == ["rank", "caption", "image", "score"]
    assert len(table["data"]) == 4 and "10 captions" in status


def test_alignment_maps_have_a_row_per_level_and_a_column_per_word(client, server):
    query = handle_file(str(server.gallery / "images" / "2.png"))
    picture, legend, details = client.predict(query, "a red square", api_name="/alignment_maps")
    assert details["words"] == ["[CLS]", "a", "red", "square", "[SEP]"]
    assert [level["grid"] for level in details["levels"]] == [[8, 8], [4, 4], [2, 2]]
    with Image.open(picture) as grid:
        assert grid.width == 190 + 8 + 64 + (len(details["words"]) + 1) * 128
    assert "level 1" in legend and "layers.1" in legend and "layer 1" in legend
    assert [w["text"] for w in details["whole_words"] if not w["minor"]] == ["red", "square"]
    assert all("norm_outliers" in level for level in details["levels"])


def test_word_maps_show_one_word_at_every_level_large(client, server):
    query = handle_file(str(server.gallery / "images" / "2.png"))
    picture, note = client.predict(
        query, "a red square", "Square", False, False, api_name="/word_maps"
    )
    with Image.open(picture) as maps:
        assert maps.width >= 3 * 320 and maps.height >= 320
    assert "**square**" in note and "softmax over the words for every region" in note
    assert "One colour range for all levels" in note
    _, note = client.predict(query, "a red square", "red", True, True, api_name="/word_maps")
    assert "Each level on its own colour range" in note and "left out of the colour range" in note


def test_region_words_are_the_regions_attention_over_the_words(client, server):
    query = handle_file(str(server.gallery / "images" / "2.png"))
    picture, note, numbers = client.predict(query, "a red square", 447, 0, api_name="/region_words")
    assert Image.open(picture).width > 0 and "sum to 1" in note
    assert [entry["region"] for entry in numbers.values()] == [[0, 7], [0, 3], [0, 1]]
    for entry in numbers.values():
        assert [w for w, _ in entry["words"]] == ["[CLS]", "a", "red", "square", "[SEP]"]
        assert sum(v for _, v in entry["words"]) == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize(
    ("endpoint", "args", "message"),
    [
        ("/word_maps", ("zebra", False, False), "'zebra' is not a word of the caption"),
        ("/region_words", (500, 10), "must lie in the 448-pixel view"),
        ("/region_words", (-1, 10), "must lie in the 448-pixel view"),
    ],
    ids=["unknown-word", "outside", "negative"],
)
def test_bad_words_and_points_get_a_clear_message(client, server, endpoint, args, message, before):
    query = handle_file(str(server.gallery / "images" / "2.png"))
    assert message in refusal(
        lambda: client.predict(query, "a red square", *args, api_name=endpoint)
    )


@pytest.mark.parametrize("name", sorted(odd_but_valid_images()))
def test_odd_but_valid_images_work(client, server, name):
    path = image_file(server.inputs, name, odd_but_valid_images()[name])
    table, _ = client.predict(handle_file(path), 2, "built-in", api_name="/search_image")
    assert len(table["data"]) == 2
    _, _, details = client.predict(handle_file(path), "a square", api_name="/alignment_maps")
    assert len(details["levels"]) == 3


# ---------------------------------------------------------------- bad captions
@pytest.mark.parametrize(
    "caption", ["", "   \t\n ", "\x00\x07\x1b"], ids=["empty", "blank", "ctrl"]
)
def test_empty_captions_get_a_clear_message(client, caption, before):
    message = refusal(lambda: client.predict(caption, 3, "built-in", api_name="/search_text"))
    assert "The caption is empty" in message


def test_a_long_caption_is_searched_by_its_first_word_pieces(client):
    _, table, status = client.predict("red " * 2_000, 2, "built-in", api_name="/search_text")
    assert len(table["data"]) == 2 and "The model read the first 30 of" in status


def test_a_100k_character_caption_is_refused_with_a_message(client):
    caption = "red " * 25_000
    message = refusal(lambda: client.predict(caption, 2, "built-in", api_name="/search_text"))
    assert "The caption is 100,000 characters long; at most 10,000 are accepted" in message


def test_html_and_control_characters_in_a_caption_stay_plain_text(client, server):
    query = handle_file(str(server.gallery / "images" / "0.png"))
    caption = "<img src=x onerror=alert(1)>\x00 red"
    _, _, details = client.predict(query, caption, api_name="/alignment_maps")
    assert details["words"][-2:] == ["red", "[SEP]"] and "\x00" not in "".join(details["words"])
    _, table, _ = client.predict(caption, 2, "built-in", api_name="/search_text")
    assert len(table["data"]) == 2


def test_a_gallery_that_does_not_exist_is_refused(client):
    message = refusal(lambda: client.predict("red", 3, "mine", api_name="/search_text"))
    assert "no gallery yet" in message


# ---------------------------------------------------------------- bad images
@pytest.mark.parametrize("name", sorted(bad_images()))
@pytest.mark.parametrize("endpoint", ["/search_image", "/alignment_maps"])
def test_bad_query_images_get_a_clear_message(client, server, name, endpoint, before):
    data, expected = bad_images()[name]
    query = handle_file(image_file(server.inputs, name, data))
    second = 3 if endpoint == "/search_image" else "a red square"
    args = (query, second, "built-in") if endpoint == "/search_image" else (query, second)
    message = refusal(lambda: client.predict(*args, api_name=endpoint))
    assert expected in message and name in message and str(server.root) not in message


# ---------------------------------------------------------------- your own gallery
def test_an_uploaded_gallery_is_built_and_searched(server, before):
    client = server.client()  # a fresh session
    bad = {name: data for name, (data, _) in bad_images().items()}
    upload = make_zip(
        server.inputs / "mine.zip",
        {
            "photos/red.png": png_bytes((220, 20, 20)),
            "photos/blue.png": png_bytes((20, 20, 220)),
            "../../../escaped.png": png_bytes(),
            "/absolute.png": png_bytes(),
            "bomb-member.png": bytes(40 << 20),  # 40 MB of zeros in ~40 kB
            "readme.txt": b"not an image",
            **bad,
        },
    )
    loose = image_file(server.inputs, "green.png", png_bytes((20, 220, 20)))
    captions = server.inputs / "captions.json"
    captions.write_text(json.dumps({"red.png": ["a red <b>square</b>"], "green.png": "green"}))
    status = client.predict(
        [handle_file(str(upload)), handle_file(loose)],
        handle_file(str(captions)),
        api_name="/build_gallery",
    )
    assert status.startswith("Your gallery: 3 images, 2 captions")
    reasons = dict(line.strip().split(": ", 1) for line in status.splitlines()[1:])
    assert reasons == {
        "../../../escaped.png": "unsafe path: it would be written outside the upload folder",
        "/absolute.png": "unsafe path: it would be written outside the upload folder",
        "bomb-member.png": "over the limit of 32 MB per image",
        "readme.txt": "not an image file type",
        "not-an-image.png": "cannot identify image file 'not-an-image.png'",
        "empty.jpg": "empty (0 bytes)",
        "truncated.jpg": reasons["truncated.jpg"],
        "bomb.png": "9000x9000 pixels exceeds 64000000",
    }
    images, _, _ = client.predict("a red square", 3, "mine", api_name="/search_text")
    assert len(images) == 3
    table, _ = client.predict(handle_file(loose), 5, "mine", api_name="/search_image")
    assert sorted(row[1] for row in table["data"]) == ["a red <b>square</b>", "green"]


@pytest.mark.parametrize(
    ("members", "message"),
    [
        ({f"{i}.png": b"" for i in range(20_000)}, "refused.zip: holds 20,000 files"),
        ({f"{i}.png": bytes(30 << 20) for i in range(9)}, "refused.zip: unpacks to 270 MB"),
        ({"readme.txt": b"hello"}, "readme.txt: not an image file type"),
        (None, "refused.zip: not a readable zip file"),
    ],
    ids=["20000-files", "zip-bomb", "no-image", "no-zip"],
)
def test_a_bad_zip_is_left_out_and_the_rest_built(server, client, members, message, before):
    upload = server.inputs / "refused.zip"
    if members is None:
        upload.write_bytes(b"not a zip at all")
    else:
        make_zip(upload, members)
    alone = [handle_file(str(upload))]
    refused = refusal(lambda: client.predict(alone, None, api_name="/build_gallery"))
    assert "None of the uploaded files is an image" in refused and message in refused
    good = image_file(server.inputs, "good.png", png_bytes())
    status = client.predict([*alone, handle_file(good)], None, api_name="/build_gallery")
    assert status.startswith("Your gallery: 1 images") and f"\n  {message}" in status


def test_a_bad_captions_file_is_refused(server, client, before):
    good = image_file(server.inputs, "ok.png", png_bytes())
    captions = image_file(server.inputs, "captions.json", b"{broken")
    message = refusal(
        lambda: client.predict(
            [handle_file(good)], handle_file(captions), api_name="/build_gallery"
        )
    )
    assert "captions file could not be read" in message


def test_files_that_are_no_images_are_left_out_and_named(server, before):
    client = server.client()
    good = image_file(server.inputs, "good.png", png_bytes())
    weights = image_file(server.inputs, "model.ckpt", b"\x80\x02 a pickle, not pixels")
    notes = image_file(server.inputs, "notes.json", b"{}")
    files = [handle_file(good), handle_file(weights), handle_file(notes)]
    status = client.predict(files, None, api_name="/build_gallery")
    assert status.startswith("Your gallery: 1 images")
    assert "model.ckpt: not an image file type" in status
    assert "notes.json: not an image file type" in status
    captions = image_file(server.inputs, "captions.txt", b"good.png,a caption")
    upload = [handle_file(good)], handle_file(captions)
    message = refusal(lambda: client.predict(*upload, api_name="/build_gallery"))
    assert "The captions file must be .json or .csv" in message


def served_copies(server: Server, name: str) -> list[Path]:
    """Where the app keeps a visitor's file ``name`` (their session folder, Gradio's folder)."""
    return [p for p in server.root.rglob(name) if not {"inputs", "downloads"} & set(p.parts)]


def a_visitor_with_files(server: Server, name: str) -> tuple[Client, list[dict], bytes]:
    """A client (its own visitor) that built a gallery of one photo ``name``, searched it and
    drew maps of it; the photo and the two answers' file payloads (``path``, ``url``)."""
    visitor = Client(server.url, verbose=False, download_files=False, httpx_kwargs=TIMEOUT)
    photo = png_bytes((10, 200, len(name)))
    upload = image_file(server.inputs, name, photo)
    visitor.predict([handle_file(upload)], None, api_name="/build_gallery")
    images, _, _ = visitor.predict("green", 1, "mine", api_name="/search_text")
    link = images[0]["image"]
    found = {"path": link.split("/file=", 1)[1], "url": link}
    maps, _, _ = visitor.predict(handle_file(upload), "a green square", api_name="/alignment_maps")
    return visitor, [found, maps], photo


def test_a_visitors_files_are_theirs_alone(server, before):
    """Visitor A's upload, and the pictures made from it, reach A only: another visitor cannot
    fetch them or use them as an input, and no answer shows a path of the server."""
    a, (found, maps), photo = a_visitor_with_files(server, "private-7f3a.png")
    other = server.client().cookies
    assert str(server.root) not in json.dumps([found, maps])
    assert http_get(found["url"], a.cookies) == (200, photo)
    assert http_get(maps["url"], a.cookies)[0] == 200
    assert "event: complete" in call_api(server, "alignment_maps", [found, "green"], a.cookies)
    for url in (found["url"], maps["url"]):
        assert http_get(url)[0] == 404 and http_get(url, other)[0] == 404
    stored = served_copies(server, "private-7f3a.png")
    assert len(stored) >= 2  # the session folder's copy and Gradio's
    for path in stored:
        assert http_get(f"{server.url}gradio_api/file={path}", a.cookies)[0] != 200
    for name in (found["path"], maps["path"], *map(str, stored)):
        as_file = {"path": name, "meta": {"_type": "gradio.FileData"}}
        for cookies in (other, None):
            answer = call_api(server, "alignment_maps", [as_file, "a green square"], cookies)
            assert "event: complete" not in answer
        answer = call_api(server, "alignment_maps", [name, "a green square"], other)
        assert "event: complete" not in answer
    info = a.predict(api_name="/info")
    assert info["checkpoint"] == "checkpoint" and str(server.root) not in json.dumps(info)


def spellings(server: Server, path: Path) -> list[str]:
    """Ways to name ``path`` that Gradio or ``open`` read as it: through a symlink (absolute, and
    relative to the app's working directory), with ``..`` after a symlink (Gradio drops the
    ``..`` first, ``open`` follows the link first), padded past 4096 characters with ``/.``, with
    a doubled slash, with a trailing one (pathlib drops it)."""
    through = server.inputs / "through-a-link"
    if not through.is_symlink():
        through.symlink_to(server.root)
    below = path.relative_to(server.root)
    return [
        str(through / below),
        os.path.relpath(through / below, ROOT),
        f"{through}/../../{below}",
        f"{through}/../{server.root.name}/{below}",
        "/." * 2100 + str(path),
        f"/{path}",
        f"{path}/",
    ]


def test_no_spelling_of_a_path_reaches_another_visitors_file(server, before):
    a_visitor_with_files(server, "private-spelt.png")
    (stored,) = [p for p in served_copies(server, "private-spelt.png") if "gradio" in p.parts]
    other = server.client().cookies
    for name in spellings(server, stored):
        url = f"{server.url}gradio_api/file={urllib.parse.quote(name, safe='')}"
        assert http_get(url, other)[0] != 200, name
        as_file = {"path": name, "meta": {"_type": "gradio.FileData"}}
        answer = call_api(server, "alignment_maps", [as_file, "a green square"], other)
        assert "event: complete" not in answer, name


def test_the_visitor_cookie_is_found_among_other_cookies(server, before):
    """A site's other cookies (an analytics one with a space or JSON in it) do not hide it."""
    a, (found, _), photo = a_visitor_with_files(server, "private-cookies.png")
    for junk in ("a b", '{"id":1}', '"unclosed'):
        assert http_get(found["url"], {"tracker": junk, **a.cookies}) == (200, photo), junk


def test_a_link_to_a_file_gone_from_disk_answers_404_without_a_path(server, before):
    """Gradio's sweep may delete a file whose alias is still held: Gradio's own refusal would
    name its path."""
    a, (found, _), _ = a_visitor_with_files(server, "private-gone.png")
    for path in served_copies(server, "private-gone.png"):
        if "gradio" in path.parts:
            path.unlink()
    code, body = http_get(found["url"], a.cookies)
    assert code == 404 and str(server.root) not in body.decode()


def test_a_visitors_files_go_when_their_session_closes(server, before):
    """A page, and gradio_client, hold a heartbeat stream open; when the visitor's last one
    closes, their files are deleted and their links answer 404."""
    a, (found, maps), _ = a_visitor_with_files(server, "private-closes.png")
    in_gradio = [p for p in served_copies(server, "private-closes.png") if "gradio" in p.parts]
    assert in_gradio and http_get(found["url"], a.cookies)[0] == 200
    a.close()  # ends its heartbeat, as closing the page does
    deadline = time.monotonic() + 30  # the server notices the disconnect at its next heartbeat
    while http_get(found["url"], a.cookies)[0] == 200 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert [http_get(f["url"], a.cookies)[0] for f in (found, maps)] == [404, 404]
    assert not any(p.exists() for p in in_gradio)


def test_request_bodies_are_capped(server):
    caption = "x" * (2 << 20)
    answer = call_api(server, "search_text", [caption, 3, "built-in"], None)
    assert answer == "refused 413"


# ---------------------------------------------------------------- load
def test_twenty_simultaneous_users_are_all_served(server):
    users = [server.client() for _ in range(USERS)]  # connected; then all search at once

    def one_user(n: int):
        query = f"a square of colour {n % 5}"
        return users[n].predict(query, 3, "built-in", api_name="/search_text")

    with ThreadPoolExecutor(USERS) as pool:
        answers = list(pool.map(one_user, range(USERS)))
    assert all(len(images) == 3 and len(table["data"]) == 3 for images, table, _ in answers)


# ---------------------------------------------------------------- browser
def browser():
    """Playwright driving Debian's chromium (never a downloaded browser)."""
    playwright = pytest.importorskip("playwright.sync_api")
    if not CHROMIUM.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing: `make test` installs it")
        pytest.skip(f"{CHROMIUM} is missing (make test installs it)")
    return playwright.sync_playwright()


def test_a_person_searches_and_sees_the_alignment_maps(server):
    ARTIFACTS.mkdir(exist_ok=True)
    with browser() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = chromium.new_page(viewport={"width": 1280, "height": 1000})
        outside = []
        page.on("request", lambda r: outside.append(r.url) if server.url not in r.url else None)
        page.goto(server.url)
        page.get_by_label("Caption").first.fill("<b>bold</b> a square of colour 2")
        page.get_by_role("button", name="Search images").click()
        thumbnails = page.locator("#hits img")
        thumbnails.first.wait_for(timeout=60_000)
        assert thumbnails.count() == 5
        page.screenshot(path=ARTIFACTS / "app-text-to-image.png", full_page=True)
        thumbnails.first.click()  # opens the pair in the maps tab, its first content word shown
        large = page.locator("#word-maps img")
        large.wait_for(timeout=60_000)
        loaded = "([img, width]) => img.complete && img.naturalWidth >= width"
        page.wait_for_function(loaded, arg=[large.element_handle(), 3 * 320])
        chips = page.locator("#word-chips label")
        assert "square" in chips.all_inner_texts()
        first_src = large.get_attribute("src")
        chips.filter(has_text="square").click()
        page.wait_for_function(
            "([img, old]) => img.src !== old && img.complete && img.naturalWidth >= 960",
            arg=[large.element_handle(), first_src],
            timeout=60_000,
        )
        assert "**square**" not in page.locator("#word-note").inner_text()  # rendered, not raw
        assert "square" in page.locator("#word-note strong").inner_text()
        shown = large.bounding_box()  # three levels at a readable size on the page
        assert shown["width"] >= 3 * 320 * 0.9
        page.screenshot(path=ARTIFACTS / "app-alignment-maps.png", full_page=True)
        picker = page.locator("#region-picker img")
        box = picker.bounding_box()
        picker.click(position={"x": box["width"] * 0.9, "y": box["height"] * 0.1})
        bars = page.locator("#region-words img")
        bars.wait_for(timeout=60_000)
        page.wait_for_function(
            "img => img.complete && img.naturalWidth > 300", arg=bars.element_handle()
        )
        page.screenshot(path=ARTIFACTS / "app-region-words.png", full_page=True)
        page.get_by_text("Overview: every word piece at every level").click()
        grid = page.locator("#maps-grid img")
        grid.wait_for(timeout=60_000)
        page.wait_for_function(
            "img => img.complete && img.naturalWidth > 1000", arg=grid.element_handle()
        )

        page.get_by_role("tab", name="Image → Text").click()
        assert page.locator("#i2t-query img").count() == 0  # (the wait below means something)
        page.locator("#i2t-examples img").first.click()
        # the example reaches the query box by a round trip to the server: a search sent
        # before it arrives has no image
        page.locator("#i2t-query img").wait_for(timeout=60_000)
        page.get_by_role("button", name="Search captions").click()
        shown = "document.querySelector('#caption-table').innerText.includes('<b>picture</b>')"
        page.wait_for_function(shown, timeout=60_000)  # the caption shows as typed
        assert page.locator("#caption-table b").count() == 0  # the caption stayed text
        page.screenshot(path=ARTIFACTS / "app-image-to-text.png", full_page=True)
        first = page.locator("#caption-table").get_by_test_id("cell-0-1")  # row 1, caption
        chosen = first.inner_text()
        first.click()  # opens the maps of that pair
        caption = page.locator("#map-caption textarea").element_handle()
        page.wait_for_function("([t, want]) => t.value === want", arg=[caption, chosen])
        chromium.close()
    assert outside == []  # nothing fetched from anywhere but the app


def test_the_server_stayed_up_and_wrote_only_to_its_own_folders(server, before):
    assert server.process.poll() is None
    files, repository = before
    assert server.files_outside_app_dirs() == files
    assert set(os.listdir(ROOT)) - repository <= {"test-artifacts"}
    assert not list(server.root.rglob("escaped.png")) and not list(
        server.root.rglob("absolute.png")
    )


# ---------------------------------------------------------------- stopping
def test_uploads_are_removed_on_sigterm_and_after_a_kill_at_the_next_start(tmp_path):
    """SIGTERM (systemd, Docker, Kubernetes, Spaces) cleans up like Ctrl-C; what a SIGKILLed app
    could not remove, the next start of the app does."""
    checkpoint, gallery = write_demo_assets(tmp_path)
    upload = image_file(tmp_path, "mine.png", png_bytes())
    temp = tmp_path / "tmp"
    left_by_killed: list[Path] = []
    for stop in (signal.SIGKILL, signal.SIGTERM):
        app = launch(tmp_path, checkpoint, gallery)
        try:
            assert not any(p.exists() for p in left_by_killed)  # removed at start-up
            app.client().predict([handle_file(upload)], None, api_name="/build_gallery")
            left_by_killed = list(temp.glob("hat-demo-*/session-*"))
            assert len(left_by_killed) == 1
            app.process.send_signal(stop)
            app.process.wait(timeout=60)
        finally:
            app.process.kill()
    assert app.process.returncode == 0
    assert list(temp.iterdir()) == []


def test_a_missing_checkpoint_stops_the_app_with_a_message(tmp_path, capsys):
    import app

    with pytest.raises(SystemExit) as stop:
        app.main(["--checkpoint", str(tmp_path), "--gallery", str(tmp_path)])
    assert stop.value.code == 1
    assert "cannot start" in capsys.readouterr().err


def test_weights_that_are_no_safetensors_stop_the_app_with_what_they_are(tmp_path, capsys):
    import app

    checkpoint, gallery = write_demo_assets(tmp_path)
    torch.save({"weight": torch.zeros(2)}, checkpoint / "model.safetensors")  # a renamed .pt
    with pytest.raises(SystemExit) as stop:
        app.main(["--checkpoint", str(checkpoint), "--gallery", str(gallery)])
    assert stop.value.code == 1
    message = capsys.readouterr().err
    assert "model.safetensors is not a safetensors file: it is a zip archive" in message
    assert "config.json" in message and "Traceback" not in message
