"""What the tabs share: the engine, the session's state, the API's hidden slots, a search tab's
parts."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from hat.demo.engine import DemoEngine


@dataclass
class ApiSlots:
    """The named API endpoints' triggers, extra inputs and outputs, in a group the page hides."""

    images: gr.JSON
    table: gr.JSON
    status: gr.Textbox
    search_text: gr.Button
    search_image: gr.Button
    word: gr.Textbox
    x: gr.Number
    y: gr.Number
    maps: gr.Button
    word_maps: gr.Button
    region_words: gr.Button
    picture: gr.Image
    note: gr.Markdown
    numbers: gr.JSON

    @classmethod
    def create(cls) -> ApiSlots:
        with gr.Group(visible=False):
            return cls(
                images=gr.JSON(),
                table=gr.JSON(),
                status=gr.Textbox(),
                search_text=gr.Button(),
                search_image=gr.Button(),
                word=gr.Textbox(),
                x=gr.Number(),
                y=gr.Number(),
                maps=gr.Button(),
                word_maps=gr.Button(),
                region_words=gr.Button(),
                picture=gr.Image(format="webp"),
                note=gr.Markdown(),
                numbers=gr.JSON(),
            )


@dataclass
class SearchTab:
    """A search tab's query (a caption or an image), top-k, button, score table and status."""

    query: gr.components.Component
    k: gr.Slider
    search: gr.Button
    scores: gr.Dataframe
    status: gr.Textbox

    def inputs(self, page: Page) -> list[gr.components.Component]:
        """What a search takes: the query, k, which gallery, the person's own gallery."""
        return [self.query, self.k, page.choice, page.mine]


@dataclass
class Page:
    """The page as every tab's events see it.

    ``last`` holds the latest page search, for opening a clicked result's maps: ``gallery``,
    result ``ids`` and ``caption`` of a text search, or the query ``image`` and result
    ``captions`` of an image search.
    """

    engine: DemoEngine
    demo: gr.Blocks
    tabs: gr.Tabs
    choice: gr.Radio  # which gallery to search: built-in or the person's own
    mine: gr.State  # the person's gallery (a SessionGallery), or None
    last: gr.State
    api: ApiSlots
