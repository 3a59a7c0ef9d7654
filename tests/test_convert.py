"""``hat convert`` on a Lightning checkpoint built from the official HAT-B state_dict manifest."""

import datetime
import itertools
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from hat.cli.convert import main
from hat.convert import ConversionError, convert_state_dict, extract_state_dict
from hat.factory import load_model
from hat.safe_load import CheckpointReadError, read_checkpoint
from hat.tokenization import tokenize

MANIFEST = (
    Path(__file__).resolve().parents[2] / "shared/reference/hat_official_state_dict_manifest.json"
)
WINDOW = 7
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "dog", "runs", "on", "the", "grass"]


def _relative_position_index(window: int) -> torch.Tensor:
    """Swin's index of (Δrow, Δcol) between two tokens of a window into the bias table."""
    grid = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    coords = torch.stack(grid).flatten(1)
    delta = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return delta[..., 0] * (2 * window - 1) + delta[..., 1]


def _shifted_window_mask(side: int, window: int) -> torch.Tensor:
    """Swin's -100 mask between tokens of a shifted window that come from different regions."""
    shift = window // 2
    bands = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    regions = torch.zeros(side, side)
    for region, (rows, cols) in enumerate(itertools.product(bands, bands)):
        regions[rows, cols] = region
    n = side // window
    windows = regions.view(n, window, n, window).permute(0, 2, 1, 3).reshape(-1, window * window)
    differ = windows[:, None, :] != windows[:, :, None]
    return torch.where(differ, -100.0, 0.0)


def official_tensor(
    key: str, shape: list[int], generator: torch.Generator, small: bool = False
) -> torch.Tensor:
    """Random fp16 weights (the converter must cast), or with ``small`` one random value
    broadcast to the shape (stored as one element, so the file is small); the buffers the
    official model computes."""
    if key.endswith("relative_position_index"):
        return _relative_position_index(WINDOW)
    if key.endswith("attn_mask"):
        return _shifted_window_mask(WINDOW * math.isqrt(shape[0]), WINDOW)
    if small:
        return torch.randn(1, generator=generator).expand(shape)
    return torch.empty(shape, dtype=torch.float16).normal_(0, 0.02, generator=generator)


class _Payload:
    """Unpickling this creates ``marker``: proof that code from the file ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from transformers import BertTokenizer

    root = tmp_path_factory.mktemp("tokenizer")
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(VOCAB) + "\n")
    out = root / "bert"
    BertTokenizer(vocab=str(vocab), do_lower_case=True).save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """A Lightning-style .ckpt of random tensors with the official keys and shapes."""
    if not MANIFEST.is_file():
        pytest.skip(f"{MANIFEST} not available")
    manifest = json.loads(MANIFEST.read_text())["state_dict"]
    generator = torch.Generator().manual_seed(0)
    state = {k: official_tensor(k, shape, generator) for k, shape in manifest.items()}
    path = tmp_path_factory.mktemp("official") / "hat_f30k.ckpt"
    envelope = {
        "state_dict": state,
        "epoch": 29,
        "global_step": 14880,
        "pytorch-lightning_version": "1.3.2",
        "hyper_parameters": {"config": {"vit": "swin_base_patch4_window7_224_in22k", "lr": 1e-4}},
        "optimizer_states": [],
        "lr_schedulers": [{"step_size": 10, "gamma": 0.1}],
    }
    torch.save(envelope, path)
    return path, state


@pytest.fixture(scope="module")
def converted(official, tokenizer_dir, tmp_path_factory):
    path, _ = official
    out = tmp_path_factory.mktemp("converted") / "hat-b"
    report = main([str(path), str(out), "--tokenizer", str(tokenizer_dir)])
    model, tokenizer = load_model(out)
    return report, model.eval(), tokenizer, out


def test_every_official_tensor_lands_unchanged(official, converted):
    _, state = official
    report, model, _, out = converted
    ours = model.state_dict()
    assert sorted(report.mapped.values()) == sorted(ours)  # every tensor of ours, exactly once
    assert len(report.mapped) + len(report.dropped) == len(state)
    assert len(report.cast) == len(report.mapped)  # fp16 in, our fp32 out
    for key, target in report.mapped.items():
        assert ours[target].dtype == torch.float32
        assert torch.equal(ours[target], state[key].float()), key
    dropped = sorted(report.dropped)
    assert sum(k.endswith("relative_position_index") for k in dropped) == 2 + 2 + 18 + 2
    assert sum(k.endswith("attn_mask") for k in dropped) == 1 + 1 + 9
    assert [k for k in dropped if "norm_0" in k] == [
        "vit_model.norm_0.bias",
        "vit_model.norm_0.weight",
    ]
    expected = {
        "vit_model.layers.0.downsample.reduction.weight": (
            "image_tower.backbone.layers.1.downsample.reduction.weight"
        ),
        "vit_model.layers.2.downsample.norm.bias": (
            "image_tower.backbone.layers.3.downsample.norm.bias"
        ),
        "vit_model.norm_1.weight": "image_tower.level_norms.0.weight",
        "vit_model.norm_2.bias": "image_tower.level_norms.1.bias",
        "vit_model.norm.weight": "image_tower.backbone.norm.weight",
        "cross_modal_image_transform_1.weight": "image_proj.0.weight",
        "cross_modal_image_transform_2.weight": "image_proj.1.weight",
        "cross_modal_image_transform.weight": "image_proj.2.weight",
        "cross_modal_text_transform_1.bias": "text_proj.0.bias",
        "cross_modal_text_transform_2.bias": "text_proj.1.bias",
        "cross_modal_text_transform.bias": "text_proj.2.bias",
        "text_transformer.encoder.layer.11.output.dense.weight": (
            "text_tower.backbone.encoder.layer.11.output.dense.weight"
        ),
    }
    assert {k: report.mapped[k] for k in expected} == expected
    assert model.config.name == "hat-b" and "hat_f30k.ckpt" in model.config.notes
    assert not [p for p in out.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl")]


def _record(modules, inputs: bool) -> tuple[list[torch.Tensor], list]:
    """Hooks that record each module's first input (or its output) during one forward pass."""
    seen: list[torch.Tensor] = []

    def hook(_module, args, out):
        seen.append(args[0] if inputs else out)

    return seen, [m.register_forward_hook(hook) for m in modules]


def test_converted_model_has_the_official_level_shapes(official, converted):
    _, state = official
    _, model, tokenizer, _ = converted
    pixels = torch.randn(1, 3, 224, 224)
    batch = tokenize(tokenizer, ["a dog runs on the grass"], model.config.max_text_len)
    image_levels, image_hooks = _record(model.image_proj, inputs=True)
    text_levels, text_hooks = _record(model.text_proj, inputs=True)
    stage1, stage_hooks = _record([model.image_tower.backbone.layers[1]], inputs=False)
    with torch.no_grad():
        out = model(pixels, batch["input_ids"], batch["attention_mask"])
    scores = out.hat
    for hook in image_hooks + text_hooks + stage_hooks:
        hook.remove()
    assert scores.shape == (1, 1) and torch.isfinite(scores).all()
    assert out.first_stage is None  # official checkpoints have no global head: search pools
    # Before projection: the official image_embeds_all[1], [2], [-1] and BERT layers 4, 10, 12.
    assert [tuple(x.shape) for x in image_levels] == [(1, 784, 256), (1, 196, 512), (1, 49, 1024)]
    assert [tuple(x.shape) for x in text_levels] == [(1, 8, 768)] * 3
    # Level 1 (index 0) is the official norm_1 on Swin stage 1 (28×28×256, before patch merging).
    norm_1 = [state[f"vit_model.norm_1.{p}"].float() for p in ("weight", "bias")]
    expected = F.layer_norm(stage1[0].reshape(1, 784, 256), (256,), *norm_1)
    torch.testing.assert_close(image_levels[0], expected)


def test_non_hat_state_dict_lists_every_problem(official, converted):
    _, state = official
    _, model, _, _ = converted
    broken = dict(state)
    del broken["vit_model.norm_2.bias"]
    broken["vit_model.head.weight"] = torch.zeros(1000, 1024)
    broken["queue"] = torch.zeros(3)
    broken["text_transformer.pooler.dense.bias"] = torch.zeros(512)
    broken["vit_model.layers.0.blocks.1.attn_mask"] = torch.zeros(64, 49, 49)
    with pytest.raises(ConversionError) as info:
        convert_state_dict(broken, model)
    message = str(info.value)
    for fragment in (
        "missing (ours, not in the checkpoint) (1)",
        "image_tower.level_norms.1.bias",
        "unexpected (in the checkpoint, no place in ours) (2)",
        "vit_model.head.weight (no image_tower.backbone.head.weight in our model)",
        "queue",
        "mismatched (2)",
        "text_transformer.pooler.dense.bias 512 ≠ text_tower.backbone.pooler.dense.bias 768",
        "vit_model.layers.0.blocks.1.attn_mask: values differ",
    ):
        assert fragment in message
    assert "vit_model.norm_2.bias" in state  # the input is left as it was


def test_malicious_pickle_is_refused_without_running(tmp_path, tokenizer_dir):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "callbacks": _Payload(marker)}, path)
    assert not marker.exists()
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as info:
        main([str(path), str(out), "--tokenizer", str(tokenizer_dir)])
    assert "--trust-checkpoint" in str(info.value.code)
    assert "open" in str(info.value.code)  # names what the file would have called
    assert not marker.exists() and not out.exists()


def test_trust_checkpoint_allows_python_objects(tmp_path):
    path = tmp_path / "dated.ckpt"
    state = {"w": torch.arange(3.0)}
    torch.save({"state_dict": state, "hyper_parameters": {"day": datetime.date(2021, 5, 1)}}, path)
    with pytest.raises(CheckpointReadError, match=r"datetime\.date.*--trust-checkpoint"):
        read_checkpoint(path)
    loaded = extract_state_dict(read_checkpoint(path, trust=True))
    assert torch.equal(loaded["w"], state["w"])


def test_bare_state_dict_and_bad_envelopes():
    state = {"w": torch.ones(1)}
    assert extract_state_dict(state) == state
    assert extract_state_dict({"state_dict": state, "epoch": 3}) == state
    with pytest.raises(ConversionError, match="no state_dict"):
        extract_state_dict([state])
    with pytest.raises(ConversionError, match="epoch"):
        extract_state_dict({"w": torch.ones(1), "epoch": 3})


def test_offline_tokenizer_from_the_hub_fails_at_once(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the default, the bundled vocabulary, needs no hub
    with pytest.raises(SystemExit, match="--tokenizer"):
        main([str(tmp_path / "x.ckpt"), str(tmp_path / "out"), "--tokenizer", "bert-base-uncased"])
