"""The Text → Image tab: a caption finds images; ``/search_text`` is its JSON twin, whose images
are links instead of files that a client would download one by one."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gradio as gr
from gradio import route_utils
from gradio_client.utils import encode_file_path

from hat.demo.engine import MAX_K, DemoEngine
from hat.demo.ui.handlers import API_EVENT, PAGE_EVENT, gpu, on_model_threads, table, user_errors
from hat.demo.ui.shared import Page, SearchTab


@dataclass
class TextToImage(SearchTab):
    hits: gr.Gallery


def text_to_image_tab(engine: DemoEngine, examples: list[str]) -> TextToImage:
    with gr.Tab("Text → Image", id="t2i"):
        with gr.Row():
            caption = gr.Textbox(label="Caption", placeholder="a red car", scale=4)
            k = gr.Slider(1, MAX_K, value=8, step=1, label="top-k", scale=1)
        search = gr.Button("Search images", variant="primary")
        gr.Examples(examples, inputs=[caption])
        hits = gr.Gallery(
            label="Best images (click one for its alignment maps)",
            columns=4,
            height=420,
            elem_id="hits",
        )
        scores = gr.Dataframe(
            headers=engine.image_headers(), label="Scores per level", interactive=False
        )
        status = gr.Textbox(label="Status", interactive=False)
    return TextToImage(caption, k, search, scores, status, hits)


def root_url(request: gr.Request, demo: gr.Blocks) -> str:
    """The app's public URL, worked out as Gradio does for its own file links (proxies too)."""
    http = request.request
    return route_utils.get_root_url(http, route_utils.get_api_call_path(http), demo.root_path)


def wire_text_to_image(tab: TextToImage, page: Page) -> None:
    engine = page.engine

    @gpu
    @user_errors
    def images_for(caption, k, gallery, mine):
        return engine.search_text(caption, k, gallery, mine)

    def link(path: Path, root: str) -> str:
        """A URL of a result image: a built-in one where it lies (a static path), one of a
        person's gallery through a copy in Gradio's cache (their folder is never served)."""
        if not path.is_relative_to(engine.gallery_root):
            path = Path(tab.hits.move_resource_to_block_cache(path))
        return f"{root}{route_utils.API_PREFIX}/file={encode_file_path(path)}"

    @on_model_threads
    def page_search_text(caption, k, gallery, mine):
        results = images_for(caption, k, gallery, mine)
        last = {"gallery": gallery, "ids": [h.index for h in results.hits], "caption": caption}
        return results.pictures, table(results), results.status, last

    @on_model_threads
    def search_text(caption, k, gallery, mine, request: gr.Request):
        results = images_for(caption, k, gallery, mine)
        root = root_url(request, page.demo)
        images = [{"image": link(path, root), "caption": text} for path, text in results.pictures]
        return images, table(results), results.status

    inputs = tab.inputs(page)
    shown = [tab.hits, tab.scores, tab.status, page.last]
    tab.search.click(page_search_text, inputs, shown, **PAGE_EVENT)
    tab.query.submit(page_search_text, inputs, shown, **PAGE_EVENT)
    api = page.api
    answer = [api.images, api.table, api.status]
    api.search_text.click(search_text, inputs, answer, api_name="search_text", **API_EVENT)
