"""HAT retrieval demo (Gradio): caption → images, image → captions, layer-wise alignment maps.

    python app.py [--checkpoint DIR] [--gallery DIR] [--cache DIR] [--host H] [--port N]

Defaults come from HAT_CHECKPOINT, HAT_GALLERY and HAT_CACHE, else checkpoints/hat-tuxpaint,
assets/gallery and the retrieval engine's cache. The checkpoint may be official-f30k or
official-coco (the paper's models, fetched and converted on first use: `hat fetch`); the gallery
may be karpathy:JSON:IMAGE_ROOT:SPLIT (a Karpathy split with its captions). The logic lives in
hat/demo/, the page and its API endpoints in hat/demo/ui/; this file serves them (see
docs/app.md).
"""

from __future__ import annotations

import argparse
import os
import signal
import time
from pathlib import Path

import faiss
import gradio as gr
import torch
from fastapi.middleware import Middleware

from hat.demo.engine import DemoEngine
from hat.demo.ui.handlers import CONCURRENCY
from hat.demo.ui.page import SESSION_SECONDS, build_ui
from hat.demo.visitor_files import VisitorFiles
from hat.fetch import FetchError, resolve_checkpoint
from hat.runtime import keep_freed_memory, usable_cores

ROOT = Path(__file__).resolve().parent
# Requests in progress: twice the model calls, so that one's pre- and post-processing in the event
# loop overlaps another's model call.
IN_PROGRESS = 2 * CONCURRENCY
QUEUE_SIZE = 64  # waiting requests before new ones are turned away with "queue full"
MAX_UPLOAD = "300mb"
MAX_BODY = 1 << 20  # bytes of any other request: a caption of 10,000 characters needs < 0.2 MB
# System fonts only: the page must not fetch web fonts (nothing is downloaded at run time).
THEME = gr.themes.Default(
    font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"]
)
# Word chips of [CLS], [SEP], punctuation and stop words end in a thin space (pairmaps.MINOR_MARK).
CSS = '#word-chips label[data-testid$="\\2009-radio-label"] { opacity: 0.55; }'


def private_files(uploads: Path) -> Middleware:
    """Each visitor's uploads and answer pictures served to that visitor only, under aliases
    (hat/demo/visitor_files.py); request bodies capped at :data:`MAX_BODY`."""
    return Middleware(
        VisitorFiles, upload_dir=uploads, max_body=MAX_BODY, idle_seconds=SESSION_SECONDS
    )


def parser() -> argparse.ArgumentParser:
    env = os.environ.get
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--checkpoint",
        default=env("HAT_CHECKPOINT", str(ROOT / "checkpoints" / "hat-tuxpaint")),
        help="checkpoint folder, or official-f30k / official-coco",
    )
    parser.add_argument(
        "--gallery",
        default=env("HAT_GALLERY", str(ROOT / "assets" / "gallery")),
        help="folder (images/ and captions.json or .csv), or karpathy:JSON:IMAGE_ROOT:SPLIT",
    )
    parser.add_argument("--cache", default=env("HAT_CACHE"), help="gallery cache directory")
    parser.add_argument("--host", default=env("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(env("GRADIO_SERVER_PORT", "7860")))
    return parser


def share_the_cores() -> None:
    """Split the CPU cores between the :data:`CONCURRENCY` model calls (unless OMP_NUM_THREADS
    says otherwise): each with every core, their threads would spin against each other. The
    cores are those this process may run on, as the encoder counts them for its side thread."""
    if "OMP_NUM_THREADS" not in os.environ:
        threads = max(1, usable_cores() // CONCURRENCY)
        torch.set_num_threads(threads)
        faiss.omp_set_num_threads(threads)


def main(argv: list[str] | None = None) -> None:
    start = time.perf_counter()
    keep_freed_memory()
    # systemd, Docker, Kubernetes and Spaces stop a process with SIGTERM: clean up as for Ctrl-C.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    cli = parser()
    args = cli.parse_args(argv)
    try:
        engine = DemoEngine(resolve_checkpoint(args.checkpoint), args.gallery, args.cache)
    except (OSError, ValueError, FetchError) as exc:  # no checkpoint or gallery, bad captions
        cli.exit(1, f"app.py: cannot start: {exc}\n")
    share_the_cores()  # after start-up, whose gallery build may use every core
    # Gradio's uploads and answer pictures go into the app's own temp folder: removed when the app
    # stops, and by the next start when it was killed.
    os.environ["GRADIO_TEMP_DIR"] = str(engine.upload_dir)
    demo = build_ui(engine)
    info = engine.describe()
    print(
        f"HAT demo: {info['model']} on {info['device']}; gallery of {info['gallery_images']} "
        f"images ({'cache hit' if engine.startup['cache_hit'] else 'built'}); "
        f"ready in {time.perf_counter() - start:.1f} s",
        flush=True,
    )
    try:
        demo.queue(default_concurrency_limit=IN_PROGRESS, max_size=QUEUE_SIZE).launch(
            server_name=args.host,
            server_port=args.port,
            max_file_size=MAX_UPLOAD,
            theme=THEME,
            css=CSS,
            app_kwargs={"middleware": [private_files(engine.upload_dir)]},
        )
    finally:
        engine.close()


if __name__ == "__main__":
    main()
