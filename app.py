"""HAT retrieval demo (Gradio): caption → images, image → captions, layer-wise alignment maps.

    python app.py [--checkpoint DIR] [--gallery DIR] [--cache DIR] [--host H] [--port N]

Defaults come from HAT_CHECKPOINT, HAT_GALLERY and HAT_CACHE, else checkpoints/hat-tuxpaint,
assets/gallery and the retrieval engine's cache. The checkpoint may be official-f30k or
official-coco (the paper's models, fetched and converted on first use: `hat fetch`); the gallery
may be karpathy:JSON:IMAGE_ROOT:SPLIT (a Karpathy split with its captions). The logic lives in
hat/demo/; this file wires it to components and names the API endpoints (see docs/app.md).
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import functools
import html
import os
import signal
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import faiss
import gradio as gr
import torch
from fastapi.middleware import Middleware
from gradio import route_utils
from gradio_client.utils import encode_file_path

from hat.demo import InputError
from hat.demo.engine import BUILTIN, MAX_K, MINE, DemoEngine, Maps, SessionGallery
from hat.demo.pairmaps import region_view, word_view
from hat.demo.visitor_files import VisitorFiles
from hat.fetch import FetchError, resolve_checkpoint
from hat.runtime import keep_freed_memory

try:  # Hugging Face ZeroGPU: model work runs under @spaces.GPU; elsewhere it is a no-op.
    import spaces

    gpu = spaces.GPU
except ImportError:

    def gpu(fn: Callable) -> Callable:
        return fn


ROOT = Path(__file__).resolve().parent
SESSION_SECONDS = 2 * 3600  # an uploaded gallery is removed this long after its last change
CONCURRENCY = 2  # model calls at once; more only split the same cores
MODEL_THREADS = ThreadPoolExecutor(CONCURRENCY, thread_name_prefix="model")
# Requests in progress: twice the model calls, so that one's pre- and post-processing in the event
# loop overlaps another's model call.
IN_PROGRESS = 2 * CONCURRENCY
QUEUE_SIZE = 64  # waiting requests before new ones are turned away with "queue full"
MAX_UPLOAD = "300mb"
MAX_BODY = 1 << 20  # bytes of any other request: a caption of 10,000 characters needs < 0.2 MB
EXAMPLES = 6
TRACK_PROGRESS = gr.Progress(track_tqdm=True)  # shows the gallery build's tqdm bars in the page
# System fonts only: the page must not fetch web fonts (nothing is downloaded at run time).
THEME = gr.themes.Default(
    font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"]
)
# Word chips of [CLS], [SEP], punctuation and stop words end in a thin space (pairmaps.MINOR_MARK).
CSS = '#word-chips label[data-testid$="\\2009-radio-label"] { opacity: 0.55; }'


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


def on_model_threads(fn: Callable) -> Callable:
    """Run ``fn`` on one of :data:`MODEL_THREADS`, handed over by the event loop directly.

    Gradio would run it on any of its ~40 worker threads, and glibc may keep the freed memory of
    a query's large tensors in an arena per thread that ran one; two long-lived threads keep it
    twice at most.
    """

    @functools.wraps(fn)
    async def on_a_model_thread(*args, **kwargs):
        call = functools.partial(contextvars.copy_context().run, fn, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(MODEL_THREADS, call)

    return on_a_model_thread


def root_url(request: gr.Request, demo: gr.Blocks) -> str:
    """The app's public URL, worked out as Gradio does for its own file links (proxies too)."""
    http = request.request
    return route_utils.get_root_url(http, route_utils.get_api_call_path(http), demo.root_path)


def build_ui(engine: DemoEngine) -> gr.Blocks:
    """The four tabs and the named API endpoints over ``engine``.

    The page's searches fill a gallery and tables; API clients get lean twins of them that answer
    JSON, with links to the result images instead of files their client would download one by
    one.
    """
    builtin = engine.gallery
    examples, example_images = engine.examples(EXAMPLES)
    # Built-in images are served where they lie (no hashing and copying per answer). Nothing else
    # of this server is: a person's gallery only as copies in Gradio's cache of the images that an
    # answer to that person names.
    gr.set_static_paths([engine.gallery_root])

    @gpu
    @user_errors
    def images_for(caption, k, gallery, mine):
        return engine.search_text(caption, k, gallery, mine)

    @gpu
    @user_errors
    def captions_for(image, k, gallery, mine):
        return engine.search_image(image, k, gallery, mine)

    def link(path: Path, root: str) -> str:
        """A URL of a result image: a built-in one where it lies (a static path), one of a
        person's gallery through a copy in Gradio's cache (their folder is never served)."""
        if not path.is_relative_to(engine.gallery_root):
            path = Path(hits.move_resource_to_block_cache(path))
        return f"{root}{route_utils.API_PREFIX}/file={encode_file_path(path)}"

    @on_model_threads
    def page_search_text(caption, k, gallery, mine):
        results = images_for(caption, k, gallery, mine)
        last = {"gallery": gallery, "ids": [h.index for h in results.hits], "caption": caption}
        return results.pictures, table(results), results.status, last

    @on_model_threads
    def search_text(caption, k, gallery, mine, request: gr.Request):
        results = images_for(caption, k, gallery, mine)
        root = root_url(request, demo)
        images = [{"image": link(path, root), "caption": text} for path, text in results.pictures]
        return images, table(results), results.status

    @on_model_threads
    def page_search_image(image, k, gallery, mine):
        results = captions_for(image, k, gallery, mine)
        last = {"image": engine.input_path(image), "captions": [h.caption for h in results.hits]}
        return table(results), results.status, last

    @on_model_threads
    def search_image(image, k, gallery, mine):
        results = captions_for(image, k, gallery, mine)
        return table(results), results.status

    @on_model_threads
    @gpu
    @user_errors
    def show_maps(image, caption):
        maps = engine.maps_for_image(image, caption)
        return maps.picture, maps.legend, maps.details

    def page_of(maps: Maps, per_level, skip_outliers) -> tuple:
        """Everything the maps tab shows of a new pair, its first content word chosen."""
        pair = maps.pair
        first = pair.first_content_word()
        picture, note = word_view(pair, first, per_level, skip_outliers)
        chips = gr.Radio(choices=pair.chips(), value=first)
        return (maps.picture, maps.legend, maps.details, pair, chips, picture, note, pair.view)

    @on_model_threads
    @gpu
    @user_errors
    def page_show_maps(image, caption, per_level, skip_outliers):
        return page_of(engine.maps_for_image(image, caption), per_level, skip_outliers)

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

    @gpu
    @user_errors
    def build_gallery(files, captions, mine, progress=TRACK_PROGRESS):
        """``files`` and ``captions`` come as uploaded (not preprocessed): any file is accepted
        here, and what is no image or zip is left out and listed with why."""
        progress(0, desc="copying the upload")
        mine, status = engine.build_session_gallery(files, captions, mine)
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
            with gr.Tab("Your gallery", id="mine"):
                files = gr.File(label="Images, or a zip of images", file_count="multiple")
                captions_file = gr.File(
                    label="Captions (optional): JSON {image: [captions]} or CSV image,caption",
                    file_types=[".json", ".csv"],
                )
                build = gr.Button("Build my gallery", variant="primary")
                build_status = gr.Textbox(label="Status", interactive=False, lines=4)

        # Inputs reach the handlers as sent (no per-component preprocessing thread hops); images
        # unprocessed also let load_image give every refusal its reason. The page's events are
        # private; the named API endpoints are their JSON twins on hidden triggers.
        lean = dict(preprocess=False, api_visibility="private")
        t2i_in = [caption, k_images, choice, mine]
        t2i_out = [hits, image_scores, t2i_status, last]
        find_images.click(page_search_text, t2i_in, t2i_out, **lean)
        caption.submit(page_search_text, t2i_in, t2i_out, **lean)
        i2t_in = [query, k_captions, choice, mine]
        find_captions.click(page_search_image, i2t_in, [caption_scores, i2t_status, last], **lean)
        with gr.Group(visible=False):
            api_images, api_table, api_status = gr.JSON(), gr.JSON(), gr.Textbox()
            api_t2i, api_i2t = gr.Button(), gr.Button()
            api_word, api_x, api_y = gr.Textbox(), gr.Number(), gr.Number()
            api_maps, api_words_of, api_region_of = gr.Button(), gr.Button(), gr.Button()
            api_picture, api_note, api_numbers = gr.Image(format="webp"), gr.Markdown(), gr.JSON()
        api = dict(preprocess=False, postprocess=False)
        outputs = [api_images, api_table, api_status]
        api_t2i.click(search_text, t2i_in, outputs, api_name="search_text", **api)
        api_i2t.click(search_image, i2t_in, outputs[1:], api_name="search_image", **api)
        maps_page = [grid, legend, details, pair, word, word_maps, word_note, region_picker]
        draw.click(
            page_show_maps, [map_image, map_caption, per_level, skip_outliers], maps_page, **lean
        )
        api_maps.click(
            show_maps,
            [map_image, map_caption],
            [grid, legend, details],
            api_name="alignment_maps",
            preprocess=False,
        )
        api_words_of.click(
            api_word_maps,
            [map_image, map_caption, api_word, per_level, skip_outliers],
            [api_picture, api_note],
            api_name="word_maps",
            preprocess=False,
        )
        api_region_of.click(
            api_region_words,
            [map_image, map_caption, api_x, api_y],
            [api_picture, api_note, api_numbers],
            api_name="region_words",
            preprocess=False,
        )
        word_view_in = [pair, word, per_level, skip_outliers]
        for control in (word, per_level, skip_outliers):
            control.input(page_word, word_view_in, [word_maps, word_note], **lean)
        region_picker.select(
            page_region, [pair], [region_picker, region_words, region_note], **lean
        )
        to_maps = [map_image, map_caption, *maps_page, tabs]
        for results in (hits, caption_scores):
            results.select(
                maps_of_result,
                [last, mine, per_level, skip_outliers],
                to_maps,
                api_visibility="private",
            )
        build.click(
            build_gallery,
            [files, captions_file, mine],
            [build_status, mine, last],
            api_name="build_gallery",
            concurrency_limit=1,
            concurrency_id="build",
            preprocess=False,
        )
        gr.api(engine.describe, api_name="info")
    return demo


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
    says otherwise): each with every core, their threads would spin against each other."""
    if "OMP_NUM_THREADS" not in os.environ:
        threads = max(1, (os.cpu_count() or 1) // CONCURRENCY)
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
