"""``hat fetch`` against a local HTTP server (resumed, refused, offline) and the allow-list reader
of Lightning checkpoints (a Lightning 1.3-shaped file is read, a malicious one refused)."""

import argparse
import contextlib
import hashlib
import json
import os
import re
import socket
import sys
import threading
import time
import types
from collections import OrderedDict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from hat import cli
from hat.config import HATConfig
from hat.download import DownloadError, download, partial_files
from hat.fetch import OFFICIAL, SOURCE_NAME, FetchError, cached, fetch, resolve_checkpoint
from hat.safe_load import CallbackStandIn, CheckpointReadError, read_checkpoint
from tests.test_convert import MANIFEST, official_tensor

F30K = OFFICIAL["official-f30k"]
CALLBACK_MODULE, CALLBACK_NAME = "pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint"


# ---------------------------------------------------------------- a file server on 127.0.0.1
class FileServer(ThreadingHTTPServer):
    """Serves ``files`` (path -> bytes) with byte ranges; the first full transfer of a path in
    ``cut`` stops after that many bytes, as a dropped connection would. ``log`` keeps (path,
    Range header) of every request."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), RangeHandler)
        self.files: dict[str, bytes] = {}
        self.cut: dict[str, int] = {}
        self.log: list[tuple[str, str | None]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class RangeHandler(BaseHTTPRequestHandler):
    def do_GET(self):
        server: FileServer = self.server
        wanted = self.headers.get("Range")
        server.log.append((self.path, wanted))
        body = server.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        match = re.fullmatch(r"bytes=(\d+)-", wanted or "")
        start = int(match[1]) if match else 0
        self.send_response(206 if match else 200)
        if match:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.send_header("Content-Length", str(len(body) - start))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        stop = None if match else server.cut.pop(self.path, None)
        # The client may stop reading: gdown closes a response that a ranged one replaces.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.wfile.write(body[start:stop])

    def log_message(self, *args):
        pass


@pytest.fixture()
def server():
    httpd = FileServer()
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def closed_port_url() -> str:
    """A URL on 127.0.0.1 where nothing listens: connecting is refused at once (offline)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


# ---------------------------------------------------------------- Lightning 1.3-shaped files
@contextlib.contextmanager
def fake_lightning():
    """Lightning's ModelCheckpoint class, in stand-in modules that exist only inside the block
    (so that files can refer to it by name; Lightning itself is never needed)."""
    with pytest.MonkeyPatch.context() as patch:
        parts = CALLBACK_MODULE.split(".")
        for n in range(1, len(parts) + 1):
            name = ".".join(parts[:n])
            patch.setitem(sys.modules, name, types.ModuleType(name))
        callback = type(CALLBACK_NAME, (), {"__module__": CALLBACK_MODULE})
        setattr(sys.modules[CALLBACK_MODULE], CALLBACK_NAME, callback)
        yield callback
    assert CALLBACK_MODULE not in sys.modules


def save_lightning_1_3(path, state_dict, extra=None):
    """``torch.save`` a checkpoint laid out as Lightning 1.3 writes one (callback states keyed by
    the callback's class, optimizer, schedulers, AMP scaler, hyper-parameters)."""
    with fake_lightning() as callback:
        checkpoint = {
            "epoch": 29,
            "global_step": 14880,
            "pytorch-lightning_version": "1.3.2",
            "callbacks": {
                callback: {
                    "monitor": "best_irtr",
                    "best_model_score": torch.tensor(512.25),
                    "best_model_path": "runs/i2t_freeze/epoch=29-step=14879.ckpt",
                    "current_score": torch.tensor(510.9),
                    "dirpath": "runs/i2t_freeze",
                }
            },
            "optimizer_states": [
                {
                    "state": {0: {"step": 14880, "exp_avg": torch.zeros(4)}},
                    "param_groups": [{"lr": 1e-5, "weight_decay": 0.01, "params": [0]}],
                }
            ],
            "lr_schedulers": [{"base_lrs": [1e-4], "last_epoch": 29, "lr_lambdas": [None]}],
            "native_amp_scaling_state": {"scale": 32768.0, "growth_factor": 2.0},
            "hparams_name": "kwargs",
            "hyper_parameters": {
                "config": {"exp_name": "finetune_irtr_f30k", "max_text_len": 32, "precision": 16},
                "args": argparse.Namespace(lr=1e-4),
            },
            "state_dict": OrderedDict(state_dict),
            **(extra or {}),
        }
        torch.save(checkpoint, path)
    return path


def test_lightning_1_3_checkpoint_reads_without_lightning(tmp_path):
    path = save_lightning_1_3(tmp_path / "epoch=29.ckpt", {"w": torch.arange(3.0)})
    checkpoint = read_checkpoint(path)
    assert torch.equal(checkpoint["state_dict"]["w"], torch.arange(3.0))
    ((key, state),) = checkpoint["callbacks"].items()
    assert issubclass(key, CallbackStandIn)
    assert (key.__module__, key.__qualname__) == (CALLBACK_MODULE, CALLBACK_NAME)
    assert state["monitor"] == "best_irtr" and float(state["best_model_score"]) == 512.25
    assert checkpoint["hyper_parameters"]["args"].lr == 1e-4
    assert not any(name.startswith("pytorch_lightning") for name in sys.modules)
    with pytest.raises(TypeError):
        key("anything")  # a stand-in cannot be used to do something


class _System:
    """Unpickling this runs a shell command (writes ``marker``)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _CallsLightningName:
    """Unpickling this calls the Lightning callback class (a stand-in here) with arguments."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return sys.modules[CALLBACK_MODULE].ModelCheckpoint, (f"touch {self.marker}",)


def test_malicious_checkpoints_are_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    path = save_lightning_1_3(tmp_path / "evil.ckpt", {"w": torch.zeros(1)}, {"x": _System(marker)})
    with pytest.raises(CheckpointReadError, match=r"refers to (posix|os)\.system.*--trust"):
        read_checkpoint(path)
    with fake_lightning():
        torch.save({"state_dict": {}, "x": _CallsLightningName(marker)}, tmp_path / "call.ckpt")
    with pytest.raises(CheckpointReadError, match="takes no arguments"):
        read_checkpoint(tmp_path / "call.ckpt")
    assert not marker.exists()


# ---------------------------------------------------------------- downloads
def test_a_cut_transfer_resumes_with_a_range_request(server, tmp_path):
    payload = os.urandom(3 << 20)
    server.files["/big.bin"] = payload
    server.cut["/big.bin"] = 1 << 20  # gdown writes 512 KiB pieces: at least one is on disk
    target = download(f"{server.url}/big.bin", tmp_path / "big.bin", progress=False, retries=1)
    assert target.read_bytes() == payload and not partial_files(target)
    ranges = [wanted for _, wanted in server.log if wanted]
    assert len(ranges) == 1 and 0 < int(re.fullmatch(r"bytes=(\d+)-", ranges[0])[1]) <= 1 << 20


def test_unreachable_host_fails_at_once(tmp_path):
    start = time.perf_counter()
    with pytest.raises(DownloadError, match="not reachable"):
        download(f"{closed_port_url()}/x.ckpt", tmp_path / "x.ckpt", progress=False)
    assert time.perf_counter() - start < 5


# ---------------------------------------------------------------- hat fetch
@pytest.fixture(scope="module")
def official_bytes(tmp_path_factory):
    """A Lightning 1.3 checkpoint with every official key and shape (~1.7 MB)."""
    if not MANIFEST.is_file():
        pytest.skip(f"{MANIFEST} not available")
    manifest = json.loads(MANIFEST.read_text())["state_dict"]
    generator = torch.Generator().manual_seed(0)
    state = {k: official_tensor(k, shape, generator, small=True) for k, shape in manifest.items()}
    path = tmp_path_factory.mktemp("official") / F30K.filename
    return save_lightning_1_3(path, state).read_bytes()


def test_fetch_resumes_checks_converts_and_caches(server, official_bytes, tmp_path):
    server.files[f"/{F30K.filename}"] = official_bytes
    server.cut[f"/{F30K.filename}"] = len(official_bytes) * 2 // 3
    cache = tmp_path / "checkpoints"
    with pytest.raises(FetchError, match="the same command continues from there"):
        fetch(F30K.name, cache, mirror=server.url, progress=False, retries=0)
    (part,) = partial_files(cache / "downloads" / F30K.filename)
    kept = part.stat().st_size
    assert 0 < kept < len(official_bytes) and cached(F30K.name, cache) is None

    folder = fetch(F30K.name, cache, mirror=server.url, progress=False, retries=0)
    assert (f"/{F30K.filename}", f"bytes={kept}-") in server.log  # continued, not restarted
    source = json.loads((folder / SOURCE_NAME).read_text())
    assert source["sha256"] == hashlib.sha256(official_bytes).hexdigest()
    assert (source["bytes"], source["url"]) == (len(official_bytes), server.url + "/hat_f30k.ckpt")
    download_path = cache / "downloads" / F30K.filename
    assert not download_path.exists() and not partial_files(download_path)
    config = HATConfig.load(folder / "config.json")
    assert (config.name, config.global_dim, config.first_stage_dim) == ("hat-b", 0, 3 * 768)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))  # the bundled bert-base-uncased vocab
    assert tokenizer("A dog")["input_ids"] == [101, 1037, 3899, 102]

    requests = len(server.log)
    assert fetch(F30K.name, cache, mirror=server.url) == folder  # cached: no request
    assert resolve_checkpoint(F30K.name, cache) == folder and len(server.log) == requests


@pytest.mark.parametrize("broken", ["truncated", "html"])
def test_fetch_refuses_a_file_that_is_not_the_checkpoint(server, official_bytes, tmp_path, broken):
    body = {"truncated": official_bytes[:-4096], "html": b"<html>Quota exceeded</html>"}[broken]
    server.files[f"/{F30K.filename}"] = body
    cache = tmp_path / "checkpoints"
    with pytest.raises(FetchError, match=r"not the official Flickr30K checkpoint.*deleted"):
        fetch(F30K.name, cache, mirror=server.url, progress=False)
    assert cached(F30K.name, cache) is None
    assert not list((cache / "downloads").iterdir())  # the next attempt downloads again


def test_fetch_from_a_file_downloaded_by_hand(official_bytes, tmp_path, capsys):
    path = tmp_path / "hat_f30k (1).ckpt"
    path.write_bytes(official_bytes)
    cache = tmp_path / "checkpoints"
    cli.main(["fetch", "official-f30k", "--file", str(path), "--cache", str(cache)])
    assert f"{cache / 'official-f30k'} (from hat_f30k (1).ckpt, sha256" in capsys.readouterr().out
    assert path.read_bytes() == official_bytes  # the user's file is left alone


def test_offline_fetch_names_the_manual_route_at_once(tmp_path, monkeypatch):
    monkeypatch.setenv("HAT_FETCH_MIRROR", closed_port_url())
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    start = time.perf_counter()
    with pytest.raises(SystemExit) as info:
        cli.main(["fetch", "official-f30k"])
    message = str(info.value.code)
    assert "not reachable" in message and F30K.page in message
    assert "hat fetch official-f30k --file FILE" in message and "hat convert FILE DIR" in message
    for command in (
        ["eval", "--checkpoint", "official-f30k", "--data", "x.json", "--image-root", "."],
        ["search", "--checkpoint", "official-f30k", "--gallery", "g", "--text", "x"],
        ["index", "build", "--checkpoint", "official-f30k", "--images", "."],
    ):
        with pytest.raises(SystemExit, match="hat convert FILE DIR"):
            cli.main(command)
    assert time.perf_counter() - start < 10


def test_the_app_resolves_official_names(tmp_path, monkeypatch, capsys):
    from app import main as app_main

    monkeypatch.setenv("HAT_FETCH_MIRROR", closed_port_url())
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with pytest.raises(SystemExit) as info:
        app_main(["--checkpoint", "official-coco"])
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert "app.py: cannot start: official-coco cannot be downloaded" in err
    assert OFFICIAL["official-coco"].page in err


def test_local_folders_are_not_fetched(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_checkpoint("runs/x/best") == Path("runs/x/best")
    (tmp_path / "official-f30k").mkdir()
    assert str(resolve_checkpoint("official-f30k")) == "official-f30k"  # an existing folder wins
    with pytest.raises(FetchError, match="known: official-f30k, official-coco"):
        fetch("official-nope", tmp_path)
