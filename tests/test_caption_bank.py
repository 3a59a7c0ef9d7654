"""The demo's captions without images: ImageNet names as a caption says them, no repeats."""

import json

from PIL import Image

from hat.demo_build.caption_bank import concept_captions, imagenet_names, write_caption_bank
from hat.gallery import collection_from_spec


def test_imagenet_names_complete_bare_modifiers_only():
    names = imagenet_names()
    assert len(names) == 1000
    assert names[281] == "tabby cat" and names[620] == "laptop computer"  # "tabby", "laptop"
    assert names[851] == "television" and names[963] == "pizza"  # not "... system", "... pie"
    assert names[967] == "espresso" and names[968] == "cup"


def test_concept_captions_skip_names_already_captioned():
    taken = ["a photo of a hammer", "a photo of apples"]
    got = concept_captions(["hammer", "owl", "Owls", "apple", "cup", "cups"], taken)
    assert got == ["a photo of an owl", "a photo of a cup"]


def test_the_gallery_folder_gets_captions_its_images_lack(tmp_path):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (8, 8), "red").save(tmp_path / "images" / "x.png")
    captions = {"photos/cat.jpg": ["a photo of a tabby cat"], "x.png": ["a red square"]}
    (tmp_path / "captions.json").write_text(json.dumps(captions))
    count = write_caption_bank(tmp_path, ["armchair", "tabby cat"])
    lines = (tmp_path / "captions_without_images.txt").read_text().splitlines()
    imagenet = concept_captions(imagenet_names(), ["a photo of a tabby cat"])
    assert count == len(lines) == 1 + len(imagenet) and len(imagenet) > 990
    assert lines[0] == "a photo of an armchair" and "a photo of a tabby cat" not in lines
    assert collection_from_spec(tmp_path).captions_without_images == tuple(lines)
