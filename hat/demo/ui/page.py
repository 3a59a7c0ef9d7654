"""The whole page: a header, the gallery choice and four tabs over one :class:`DemoEngine`, the
state they share, and the named API endpoints (``/info`` here, the others with their tabs)."""

from __future__ import annotations

import html

import gradio as gr

from hat.demo.engine import BUILTIN, MINE, DemoEngine, SessionGallery
from hat.demo.ui.alignment_maps import (
    alignment_maps_tab,
    open_clicked_results,
    wire_alignment_maps,
)
from hat.demo.ui.image_to_text import image_to_text_tab, wire_image_to_text
from hat.demo.ui.shared import ApiSlots, Page
from hat.demo.ui.text_to_image import text_to_image_tab, wire_text_to_image
from hat.demo.ui.your_gallery import wire_your_gallery, your_gallery_tab

SESSION_SECONDS = 2 * 3600  # an uploaded gallery is removed this long after its last change
EXAMPLES = 6


def remove_session(mine: SessionGallery | None) -> None:
    if mine is not None:
        mine.remove()


def header(engine: DemoEngine) -> None:
    info = engine.describe()
    gr.Markdown(
        f"# HAT: hierarchical alignment image ↔ text retrieval\n"
        f"Model `{html.escape(info['model'])}` on **{info['device']}** "
        f"({info['encode_precision']} encoding) · built-in gallery: "
        f"{info['gallery_images']} images, {info['gallery_captions']} captions. "
        f"Scores are sums of one cross-attention score per level:\n\n{engine.legend()}"
    )


def gallery_choice(engine: DemoEngine) -> gr.Radio:
    return gr.Radio(
        [(f"Built-in ({engine.gallery.num_images} images)", BUILTIN), ("Your gallery", MINE)],
        value=BUILTIN,
        label="Search in",
    )


def build_ui(engine: DemoEngine) -> gr.Blocks:
    """The four tabs and the named API endpoints over ``engine``.

    The page's searches fill a gallery and tables; API clients get lean twins of them that answer
    JSON, with links to the result images instead of files their client would download one by
    one.
    """
    examples, example_images = engine.examples(EXAMPLES)
    # Built-in images are served where they lie (no hashing and copying per answer). Nothing else
    # of this server is: a person's gallery only as copies in Gradio's cache of the images that an
    # answer to that person names.
    gr.set_static_paths([engine.gallery_root])
    with gr.Blocks(
        title="HAT image–text retrieval",
        analytics_enabled=False,
        delete_cache=(3600, SESSION_SECONDS),  # hourly, drop uploads and pictures over 2 h old
    ) as demo:
        mine = gr.State(None, time_to_live=SESSION_SECONDS, delete_callback=remove_session)
        last = gr.State(None)
        header(engine)
        choice = gallery_choice(engine)
        with gr.Tabs() as tabs:
            text_to_image = text_to_image_tab(engine, examples)
            image_to_text = image_to_text_tab(engine, example_images)
            maps = alignment_maps_tab()
            yours = your_gallery_tab()
        page = Page(engine, demo, tabs, choice, mine, last, ApiSlots.create())
        wire_text_to_image(text_to_image, page)
        wire_image_to_text(image_to_text, page)
        wire_alignment_maps(maps, page)
        open_clicked_results(maps, [text_to_image.hits, image_to_text.scores], page)
        wire_your_gallery(yours, page)
        gr.api(engine.describe, api_name="info")
    return demo
