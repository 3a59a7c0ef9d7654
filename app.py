"""HAT retrieval demo (Gradio): caption → images, image → captions, layer-wise alignment maps.

    python app.py [--checkpoint DIR] [--gallery DIR] [--cache DIR] [--host H] [--port N]

Defaults come from HAT_CHECKPOINT, HAT_GALLERY and HAT_CACHE, else checkpoints/hat-tuxpaint,
assets/gallery and the retrieval engine's cache. The logic lives in hat/demo/; this file wires it
to components and names the API endpoints (see README, "The demo app").
"""

from __future__ import annotations

import argparse
import functools
import html
import os
import time
from collections.abc import Callable
from pathlib import Path

import gradio as gr

from hat.demo import InputError
from hat.demo.engine import BUILTIN, MAX_K, MINE, DemoEngine, SessionGallery, payload_path

try:  # Hugging Face ZeroGPU: model work runs under @spaces.GPU; elsewhere it is a no-op.
    import spaces

    gpu = spaces.GPU
except ImportError:

    def gpu(fn: Callable) -> Callable:
        return fn


ROOT = Path(__file__).resolve().parent
SESSION_SECONDS = 2 * 3600  # an uploaded gallery is removed this long after its last change
CONCURRENCY = 2  # model calls at once; more only split the same cores
QUEUE_SIZE = 64  # waiting requests before new ones are turned away with "queue full"
MAX_UPLOAD = "300mb"
EXAMPLES = 6
TRACK_PROGRESS = gr.Progress(track_tqdm=True)  # shows the gallery build's tqdm bars in the page
# System fonts only: the page must not fetch web fonts (nothing is downloaded at run time).
THEME = gr.themes.Default(
    font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"]
)


def user_errors(fn: Callable) -> Callable:
    """Show an :class:`InputError` as a Gradio error; escaped, since toasts render HTML."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except InputError as exc:
            raise gr.Error(html.escape(str(exc), quote=False)) from None

    return wrapper


def table(results) -> dict:
    return {"headers": results.headers, "data": results.rows}


def remove_session(mine: SessionGallery | None) -> None:
    if mine is not None:
        mine.remove()


def build_ui(engine: DemoEngine) -> gr.Blocks:
    """The four tabs and the named API endpoints over ``engine``."""
    builtin = engine.gallery
    examples = builtin.captions[:: max(1, builtin.num_captions // EXAMPLES)][:EXAMPLES]
    every = max(1, builtin.num_images // EXAMPLES)
    example_images = [str(builtin.image_path(i)) for i in range(0, builtin.num_images, every)]

    @gpu
    @user_errors
    def search_text(caption, k, gallery, mine):
        results = engine.search_text(caption, k, gallery, mine)
        last = {"gallery": gallery, "ids": [h.index for h in results.hits], "caption": caption}
        return results.pictures, table(results), results.status, last

    @gpu
    @user_errors
    def search_image(image, k, gallery, mine):
        results = engine.search_image(image, k, gallery, mine)
        last = {"image": payload_path(image), "captions": [h.caption for h in results.hits]}
        return table(results), results.status, last

    @gpu
    @user_errors
    def show_maps(image, caption):
        maps = engine.maps_for_image(image, caption)
        return maps.picture, maps.legend, maps.details

    @gpu
    @user_errors
    def maps_of_result(last, mine, evt: gr.SelectData):
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
            maps = engine.maps_for_image(image, caption)
        selected = gr.Tabs(selected="maps")
        return image, caption, maps.picture, maps.legend, maps.details, selected

    @gpu
    @user_errors
    def build_gallery(files, captions, mine, progress=TRACK_PROGRESS):
        progress(0, desc="copying the upload")
        mine, status = engine.build_session_gallery(files, captions, previous=mine)
        return status, mine, None  # results shown so far may point into the old gallery

    with gr.Blocks(
        title="HAT image–text retrieval",
        analytics_enabled=False,
        delete_cache=(3600, SESSION_SECONDS),  # hourly, drop uploads and pictures over 2 h old
    ) as demo:
        mine = gr.State(None, time_to_live=SESSION_SECONDS, delete_callback=remove_session)
        last = gr.State(None)
        info = engine.describe()
        gr.Markdown(
            f"# HAT: hierarchical alignment image ↔ text retrieval\n"
            f"Model `{html.escape(info['model'])}` on **{info['device']}** · built-in gallery: "
            f"{info['gallery_images']} images, {info['gallery_captions']} captions. "
            f"Scores are sums of one cross-attention score per level:\n\n{engine.legend()}"
        )
        choice = gr.Radio(
            [(f"Built-in ({builtin.num_images} images)", BUILTIN), ("Your gallery", MINE)],
            value=BUILTIN,
            label="Search in",
        )
        with gr.Tabs() as tabs:
            with gr.Tab("Text → Image", id="t2i"):
                with gr.Row():
                    caption = gr.Textbox(label="Caption", placeholder="a red car", scale=4)
                    k_images = gr.Slider(1, MAX_K, value=8, step=1, label="top-k", scale=1)
                find_images = gr.Button("Search images", variant="primary")
                gr.Examples(examples, inputs=[caption])
                hits = gr.Gallery(
                    label="Best images (click one for its alignment maps)",
                    columns=4,
                    height=420,
                    elem_id="hits",
                )
                image_scores = gr.Dataframe(
                    headers=engine.image_headers(), label="Scores per level", interactive=False
                )
                t2i_status = gr.Textbox(label="Status", interactive=False)
            with gr.Tab("Image → Text", id="i2t"):
                with gr.Row():
                    query = gr.Image(label="Query image", type="filepath", image_mode=None)
                    with gr.Column():
                        k_captions = gr.Slider(1, MAX_K, value=8, step=1, label="top-k")
                        find_captions = gr.Button("Search captions", variant="primary")
                with gr.Column(elem_id="i2t-examples"):
                    gr.Examples(example_images, inputs=[query], label="Gallery images")
                caption_scores = gr.Dataframe(
                    headers=engine.caption_headers(),
                    label="Best captions (click a row for its alignment maps)",
                    interactive=False,
                    elem_id="caption-table",
                )
                i2t_status = gr.Textbox(label="Status", interactive=False)
            with gr.Tab("Alignment maps", id="maps"):
                with gr.Row():
                    map_image = gr.Image(label="Image", type="filepath", image_mode=None)
                    with gr.Column():
                        map_caption = gr.Textbox(label="Caption", elem_id="map-caption")
                        draw = gr.Button("Show alignment maps", variant="primary")
                grid = gr.Image(
                    label="Alignment maps",
                    show_label=False,  # the picture's own header names the columns
                    buttons=["fullscreen", "download"],
                    type="pil",
                    format="webp",
                    elem_id="maps-grid",
                )
                legend = gr.Markdown(label="Legend")
                with gr.Accordion("Scores and word pieces", open=False):
                    details = gr.JSON(label="Scores and word pieces")
            with gr.Tab("Your gallery", id="mine"):
                files = gr.File(
                    label="Images, or a zip of images",
                    file_count="multiple",
                    file_types=["image", ".zip"],
                )
                captions_file = gr.File(
                    label="Captions (optional): JSON {image: [captions]} or CSV image,caption",
                    file_types=[".json", ".csv"],
                )
                build = gr.Button("Build my gallery", variant="primary")
                build_status = gr.Textbox(label="Status", interactive=False, lines=4)

        t2i = dict(fn=search_text, inputs=[caption, k_images, choice, mine])
        t2i_out = [hits, image_scores, t2i_status, last]
        find_images.click(**t2i, outputs=t2i_out, api_name="search_text")
        caption.submit(**t2i, outputs=t2i_out, api_visibility="private")
        # Images go to the handlers unprocessed, so that load_image gives every refusal its reason.
        find_captions.click(
            search_image,
            [query, k_captions, choice, mine],
            [caption_scores, i2t_status, last],
            api_name="search_image",
            preprocess=False,
        )
        draw.click(
            show_maps,
            [map_image, map_caption],
            [grid, legend, details],
            api_name="alignment_maps",
            preprocess=False,
        )
        to_maps = [map_image, map_caption, grid, legend, details, tabs]
        for results in (hits, caption_scores):
            results.select(maps_of_result, [last, mine], to_maps, api_visibility="private")
        build.click(
            build_gallery,
            [files, captions_file, mine],
            [build_status, mine, last],
            api_name="build_gallery",
            concurrency_limit=1,
            concurrency_id="build",
        )
        gr.api(engine.describe, api_name="info")
    return demo


def parser() -> argparse.ArgumentParser:
    env = os.environ.get
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--checkpoint", default=env("HAT_CHECKPOINT", str(ROOT / "checkpoints" / "hat-tuxpaint"))
    )
    parser.add_argument("--gallery", default=env("HAT_GALLERY", str(ROOT / "assets" / "gallery")))
    parser.add_argument("--cache", default=env("HAT_CACHE"), help="gallery cache directory")
    parser.add_argument("--host", default=env("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(env("GRADIO_SERVER_PORT", "7860")))
    return parser


def main(argv: list[str] | None = None) -> None:
    start = time.perf_counter()
    cli = parser()
    args = cli.parse_args(argv)
    try:
        engine = DemoEngine(args.checkpoint, args.gallery, args.cache)
    except (OSError, ValueError) as exc:  # no checkpoint, no gallery, unreadable captions
        cli.exit(1, f"app.py: cannot start: {exc}\n")
    demo = build_ui(engine)
    info = engine.describe()
    print(
        f"HAT demo: {info['model']} on {info['device']}; gallery of {info['gallery_images']} "
        f"images ({'cache hit' if engine.startup['cache_hit'] else 'built'}); "
        f"ready in {time.perf_counter() - start:.1f} s",
        flush=True,
    )
    try:
        demo.queue(default_concurrency_limit=CONCURRENCY, max_size=QUEUE_SIZE).launch(
            server_name=args.host,
            server_port=args.port,
            allowed_paths=[str(engine.gallery_root), str(engine.temp_dir)],
            max_file_size=MAX_UPLOAD,
            theme=THEME,
        )
    finally:
        engine.close()


if __name__ == "__main__":
    main()
