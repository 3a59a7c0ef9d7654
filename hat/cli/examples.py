"""``python -m hat.cli.examples``: write a demo gallery's ``examples.json``.

How they are chosen: :mod:`hat.demo_build.examples`.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from hat.demo_build import examples
from hat.demo_build.examples import DEFAULT_KINDS, choose_examples
from hat.encoder import Encoder
from hat.gallery import build_gallery
from hat.gallery.collection import collection_from_spec
from hat.search import Searcher


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m hat.cli.examples", description=examples.__doc__
    )
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
