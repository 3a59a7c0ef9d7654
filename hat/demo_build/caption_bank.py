"""Captions without images for the demo's caption bank: what the model can name in a visitor's
photo (the concept level's 1,000 ImageNet classes, the objects it was trained on), so that image →
text can answer "a photo of a tabby cat" although no gallery image shows one."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from hat.demo_build.names import article, concept
from hat.gallery.collection import CAPTIONS_WITHOUT_IMAGES

# A WordNet lemma that adds one of these to a class name says nothing a caption would
# ("television system", "pizza pie"): the name stays as it is.
GENERIC_HEADS = {"system", "building", "house", "pie"}


def imagenet_names() -> list[str]:
    """The 1,000 ImageNet class names as a caption would say them: torchvision's names, with a
    bare modifier completed by its WordNet lemma ("tabby" → "tabby cat", "laptop" → "laptop
    computer")."""
    from timm.data import ImageNetInfo
    from torchvision.models._meta import _IMAGENET_CATEGORIES as NAMES

    info = ImageNetInfo()
    names = []
    for index, name in enumerate(NAMES):
        lemmas = [lemma.strip() for lemma in info.index_to_description(index).split(",")]
        longer = [
            lemma
            for lemma in lemmas[1:]
            if lemma.startswith(f"{name} ")
            and len(lemma.split()) == len(name.split()) + 1
            and lemma.split()[-1] not in GENERIC_HEADS
        ]
        names.append(longer[0] if longer else name)
    return names


def concept_captions(names: Iterable[str], taken: Iterable[str] = ()) -> list[str]:
    """``a photo of a {name}`` for every distinct name (by :func:`concept`) that no ``taken``
    caption names already, in the order given."""
    seen = {concept(caption.removeprefix("a photo of ")) for caption in taken}
    out = []
    for name in names:
        key = concept(name)
        if key and key not in seen:
            seen.add(key)
            out.append(f"a photo of {article(name)}")
    return out


def write_caption_bank(gallery: Path, names: Iterable[str]) -> int:
    """Write the gallery folder's captions without images: ``names`` (the trained objects), then
    the ImageNet classes, less those its images' captions name. Returns how many."""
    gallery = Path(gallery)
    captions_file = gallery / "captions.json"
    taken = [
        c for caps in json.loads(captions_file.read_text(encoding="utf-8")).values() for c in caps
    ]
    captions = concept_captions([*names, *imagenet_names()], taken)
    (gallery / CAPTIONS_WITHOUT_IMAGES).write_text("\n".join(captions) + "\n", encoding="utf-8")
    return len(captions)
