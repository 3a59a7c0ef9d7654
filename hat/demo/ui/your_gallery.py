"""The Your gallery tab: a person's own images (files or zips) and captions, built into a private
gallery that "Search in: Your gallery" searches; ``/build_gallery`` is the same for a client."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from hat.demo.ui.handlers import gpu, user_errors
from hat.demo.ui.shared import Page

TRACK_PROGRESS = gr.Progress(track_tqdm=True)  # shows the gallery build's tqdm bars in the page


@dataclass
class YourGallery:
    files: gr.File
    captions: gr.File
    build: gr.Button
    status: gr.Textbox


def your_gallery_tab() -> YourGallery:
    with gr.Tab("Your gallery", id="mine"):
        files = gr.File(label="Images, or a zip of images", file_count="multiple")
        captions = gr.File(
            label="Captions (optional): JSON {image: [captions]} or CSV image,caption",
            file_types=[".json", ".csv"],
        )
        build = gr.Button("Build my gallery", variant="primary")
        status = gr.Textbox(label="Status", interactive=False, lines=4)
    return YourGallery(files, captions, build, status)


def wire_your_gallery(tab: YourGallery, page: Page) -> None:
    engine = page.engine

    @gpu
    @user_errors
    def build_gallery(files, captions, mine, progress=TRACK_PROGRESS):
        """``files`` and ``captions`` come as uploaded (not preprocessed): any file is accepted
        here, and what is no image or zip is left out and listed with why."""
        progress(0, desc="copying the upload")
        mine, status = engine.build_session_gallery(files, captions, mine)
        return status, mine, None  # results shown so far may point into the old gallery

    tab.build.click(
        build_gallery,
        [tab.files, tab.captions, page.mine],
        [tab.status, page.mine, page.last],
        api_name="build_gallery",
        concurrency_limit=1,
        concurrency_id="build",
        preprocess=False,
    )
