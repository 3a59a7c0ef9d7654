"""The Image → Text tab: an image finds captions; ``/search_image`` is its JSON twin."""

from __future__ import annotations

import gradio as gr

from hat.demo.engine import MAX_K, DemoEngine
from hat.demo.ui.handlers import API_EVENT, PAGE_EVENT, gpu, on_model_threads, table, user_errors
from hat.demo.ui.shared import Page, SearchTab


def image_to_text_tab(engine: DemoEngine, example_images: list[str]) -> SearchTab:
    with gr.Tab("Image → Text", id="i2t"):
        with gr.Row():
            query = gr.Image(
                label="Query image", type="filepath", image_mode=None, elem_id="i2t-query"
            )
            with gr.Column():
                k = gr.Slider(1, MAX_K, value=8, step=1, label="top-k")
                search = gr.Button("Search captions", variant="primary")
        with gr.Column(elem_id="i2t-examples"):
            gr.Examples(example_images, inputs=[query], label="Gallery images")
        scores = gr.Dataframe(
            headers=engine.caption_headers(),
            label="Best captions (click a row for its alignment maps)",
            interactive=False,
            elem_id="caption-table",
        )
        status = gr.Textbox(label="Status", interactive=False)
    return SearchTab(query, k, search, scores, status)


def wire_image_to_text(tab: SearchTab, page: Page) -> None:
    engine = page.engine

    @gpu
    @user_errors
    def captions_for(image, k, gallery, mine):
        return engine.search_image(image, k, gallery, mine)

    @on_model_threads
    def page_search_image(image, k, gallery, mine):
        results = captions_for(image, k, gallery, mine)
        last = {"image": engine.input_path(image), "captions": [h.caption for h in results.hits]}
        return table(results), results.status, last

    @on_model_threads
    def search_image(image, k, gallery, mine):
        results = captions_for(image, k, gallery, mine)
        return table(results), results.status

    inputs = tab.inputs(page)
    tab.search.click(page_search_image, inputs, [tab.scores, tab.status, page.last], **PAGE_EVENT)
    api = page.api
    answer = [api.table, api.status]
    api.search_image.click(search_image, inputs, answer, api_name="search_image", **API_EVENT)
