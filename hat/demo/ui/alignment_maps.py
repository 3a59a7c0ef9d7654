"""The Alignment maps tab: a pair's maps word by word and region by region, drawn for an image
and a caption or for a clicked search result; ``/alignment_maps``, ``/word_maps`` and
``/region_words`` are its API."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from hat.demo import InputError
from hat.demo.engine import Maps
from hat.demo.pairmaps import region_view, word_view
from hat.demo.ui.handlers import PAGE_EVENT, gpu, on_model_threads, user_errors
from hat.demo.ui.shared import Page


@dataclass
class AlignmentMaps:
    image: gr.Image
    caption: gr.Textbox
    draw: gr.Button
    pair: gr.State  # the shown pair's PairMaps: another word or region only redraws
    word: gr.Radio
    per_level: gr.Checkbox
    skip_outliers: gr.Checkbox
    word_maps: gr.Image
    word_note: gr.Markdown
    region_picker: gr.Image
    region_words: gr.Image
    region_note: gr.Markdown
    legend: gr.Markdown
    grid: gr.Image
    details: gr.JSON

    @property
    def of_a_new_pair(self) -> list[gr.components.Component]:
        """What :func:`page_of` fills."""
        return [
            self.grid,
            self.legend,
            self.details,
            self.pair,
            self.word,
            self.word_maps,
            self.word_note,
            self.region_picker,
        ]


def alignment_maps_tab() -> AlignmentMaps:
    with gr.Tab("Alignment maps", id="maps"):
        with gr.Row():
            image = gr.Image(label="Image", type="filepath", image_mode=None)
            with gr.Column():
                caption = gr.Textbox(label="Caption", elem_id="map-caption")
                draw = gr.Button("Show alignment maps", variant="primary")
        pair = gr.State(None)
        word = gr.Radio(
            [],
            label="Word (grey: [CLS], [SEP], punctuation and stop words)",
            elem_id="word-chips",
        )
        with gr.Row():
            per_level = gr.Checkbox(False, label="Scale each level to its own range")
            skip_outliers = gr.Checkbox(
                False, label="Leave outlined (outlier-norm) regions out of the colour range"
            )
        word_maps = gr.Image(
            label="The word's map at every level",
            show_label=False,
            buttons=["fullscreen", "download"],
            type="pil",
            format="webp",
            elem_id="word-maps",
        )
        word_note = gr.Markdown(elem_id="word-note")
        with gr.Row():
            region_picker = gr.Image(
                label="Click a region: which words does it attend to?",
                type="pil",
                interactive=False,
                buttons=[],
                elem_id="region-picker",
                scale=1,
            )
            region_words = gr.Image(
                label="The region's attention over the words, per level",
                show_label=False,  # the picture names its levels
                type="pil",
                format="webp",
                buttons=["fullscreen", "download"],
                elem_id="region-words",
                scale=2,
            )
        region_note = gr.Markdown()
        legend = gr.Markdown(label="Legend")
        with gr.Accordion("Overview: every word piece at every level", open=False):
            grid = gr.Image(
                label="Alignment maps",
                show_label=False,  # the picture's own header names the columns
                buttons=["fullscreen", "download"],
                type="pil",
                format="webp",
                elem_id="maps-grid",
            )
        with gr.Accordion("Scores and word pieces", open=False):
            details = gr.JSON(label="Scores and word pieces")
    return AlignmentMaps(
        image,
        caption,
        draw,
        pair,
        word,
        per_level,
        skip_outliers,
        word_maps,
        word_note,
        region_picker,
        region_words,
        region_note,
        legend,
        grid,
        details,
    )


def page_of(maps: Maps, per_level, skip_outliers) -> tuple:
    """Everything the maps tab shows of a new pair, its first content word chosen."""
    pair = maps.pair
    first = pair.first_content_word()
    picture, note = word_view(pair, first, per_level, skip_outliers)
    chips = gr.Radio(choices=pair.chips(), value=first)
    return (maps.picture, maps.legend, maps.details, pair, chips, picture, note, pair.view)


def wire_alignment_maps(tab: AlignmentMaps, page: Page) -> None:
    """Drawing a pair's maps, picking a word or a region; the tab's API endpoints."""
    engine = page.engine

    @on_model_threads
    @gpu
    @user_errors
    def show_maps(image, caption):
        maps = engine.maps_for_image(image, caption)
        return maps.picture, maps.legend, maps.details

    @on_model_threads
    @gpu
    @user_errors
    def page_show_maps(image, caption, per_level, skip_outliers):
        return page_of(engine.maps_for_image(image, caption), per_level, skip_outliers)

    @user_errors
    def page_word(pair, word, per_level, skip_outliers):
        if pair is None:  # a scale toggled before any maps: nothing to redraw yet
            return gr.skip(), gr.skip()
        return word_view(pair, word, per_level, skip_outliers)

    @user_errors
    def page_region(pair, evt: gr.SelectData):
        marked, picture, note, _ = region_view(pair, *evt.index)
        return marked, picture, note

    @on_model_threads
    @gpu
    @user_errors
    def api_word_maps(image, caption, word, per_level, skip_outliers):
        pair = engine.maps_for_image(image, caption).pair
        return word_view(pair, pair.find(word), bool(per_level), bool(skip_outliers))

    @on_model_threads
    @gpu
    @user_errors
    def api_region_words(image, caption, x, y):
        _, picture, note, numbers = region_view(engine.maps_for_image(image, caption).pair, x, y)
        return picture, note, numbers

    api = page.api
    scales = [tab.per_level, tab.skip_outliers]
    tab.draw.click(
        page_show_maps, [tab.image, tab.caption, *scales], tab.of_a_new_pair, **PAGE_EVENT
    )
    api.maps.click(
        show_maps,
        [tab.image, tab.caption],
        [tab.grid, tab.legend, tab.details],
        api_name="alignment_maps",
        preprocess=False,
    )
    api.word_maps.click(
        api_word_maps,
        [tab.image, tab.caption, api.word, *scales],
        [api.picture, api.note],
        api_name="word_maps",
        preprocess=False,
    )
    api.region_words.click(
        api_region_words,
        [tab.image, tab.caption, api.x, api.y],
        [api.picture, api.note, api.numbers],
        api_name="region_words",
        preprocess=False,
    )
    for control in (tab.word, *scales):
        control.input(
            page_word, [tab.pair, tab.word, *scales], [tab.word_maps, tab.word_note], **PAGE_EVENT
        )
    tab.region_picker.select(
        page_region,
        [tab.pair],
        [tab.region_picker, tab.region_words, tab.region_note],
        **PAGE_EVENT,
    )


def open_clicked_results(
    tab: AlignmentMaps, results: list[gr.components.Component], page: Page
) -> None:
    """A click on a search result (an image of ``results``, or a caption row) opens its maps."""
    engine = page.engine

    @on_model_threads
    @gpu
    @user_errors
    def maps_of_result(last, mine, per_level, skip_outliers, evt: gr.SelectData):
        """A click on a search result: its maps, in the maps tab."""
        if last is None:
            raise InputError("Search first, then click a result.")
        if "ids" in last:
            source = engine.pick(last["gallery"], mine)
            index, caption = last["ids"][evt.index], last["caption"]
            maps = engine.maps_for_gallery_image(source, index, caption)
            image = str(source.image_path(index))
        else:
            rank = int(evt.row_value[0])  # not the row: a sorted table shows rows in another order
            image, caption = last["image"], last["captions"][rank - 1]
            maps = engine.maps_for_image(Path(image), caption)
        selected = gr.Tabs(selected="maps")
        return image, caption, *page_of(maps, per_level, skip_outliers), selected

    inputs = [page.last, page.mine, tab.per_level, tab.skip_outliers]
    shown = [tab.image, tab.caption, *tab.of_a_new_pair, page.tabs]
    for clicked in results:
        clicked.select(maps_of_result, inputs, shown, api_visibility="private")
