"""Choose the demo page's examples: queries the shipped model answers correctly, by a fixed rule.

``python -m hat.demo.examples --checkpoint checkpoints/hat-tuxpaint --gallery assets/gallery``
writes ``examples.json`` into the gallery folder. For each kind of gallery image (a path prefix:
the real photos, the scenes) it keeps the captions whose own image the two-stage search ranks
first, and the images whose first caption is one of their own, then takes a few spread evenly
over that list (so they come from across the gallery, not from its first folder). It prints how
many of each kind passed, which is also a quick check of the model on its own gallery.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from hat.encoder import Encoder
from hat.gallery import build_gallery
from hat.gallery.collection import collection_from_spec
from hat.search import Searcher

DEFAULT_KINDS = ("photos/", "test/")


def spread(items: Sequence, count: int) -> list:
    """``count`` items spread evenly over ``items`` (all of them if there are fewer)."""
    if len(items) <= count:
        return list(items)
    step = len(items) / count
    return [items[int(i * step)] for i in range(count)]


def choose_examples(searcher: Searcher, per_kind: int = 3, kinds: Sequence[str] = DEFAULT_KINDS):
    """``({"captions": [...], "images": [...]}, {kind: counts})``: per kind, ``per_kind``
    captions found first and images whose best caption is theirs (first caption of each image
    only, so that one image does not fill the list)."""
    gallery = searcher.gallery
    first_caption: dict[int, int] = {}
    for j, image in enumerate(gallery.caption_image):
        first_caption.setdefault(int(image), j)
    chosen: dict[str, list[str]] = {"captions": [], "images": []}
    counts = {}
    for kind in kinds:
        mine = [i for i in sorted(first_caption) if gallery.paths[i].startswith(kind)]
        captions = [
            gallery.captions[first_caption[i]]
            for i in mine
            if searcher.text_to_image(gallery.captions[first_caption[i]], 1).hits[0].index == i
        ]
        images = [
            gallery.paths[i]
            for i in mine
            if gallery.caption_image[searcher.image_to_text(gallery.image_path(i), 1).hits[0].index]
            == i
        ]
        counts[kind] = {
            "images": len(mine),
            "text_to_image": len(captions),
            "image_to_text": len(images),
        }
        chosen["captions"] += spread(captions, per_kind)
        chosen["images"] += spread(images, per_kind)
    return chosen, counts


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m hat.demo.examples", description=__doc__)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--gallery", required=True, help="a gallery folder (images/, captions)")
    parser.add_argument("--cache", default=None, help="gallery cache folder")
    parser.add_argument("--per-kind", type=int, default=3)
    parser.add_argument("--kinds", nargs="+", default=list(DEFAULT_KINDS))
    args = parser.parse_args(argv)
    encoder = Encoder.from_pretrained(args.checkpoint)
    collection = collection_from_spec(args.gallery)
    gallery = build_gallery(args.checkpoint, collection, args.cache, encoder=encoder, progress=True)
    searcher = Searcher(gallery, encoder)
    chosen, counts = choose_examples(searcher, args.per_kind, args.kinds)
    out = Path(args.gallery) / "examples.json"
    out.write_text(json.dumps(chosen, indent=1) + "\n", encoding="utf-8")
    for kind, count in counts.items():
        print(
            f"{kind}: {count['text_to_image']} of {count['images']} captions find their image "
            f"first, {count['image_to_text']} images their caption"
        )
    print(f"wrote {out}")
    return {"chosen": chosen, "counts": counts}


if __name__ == "__main__":
    main()
