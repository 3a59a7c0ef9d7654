"""The retrieval benchmarks run end to end on tiny inputs (their figures are not checked here:
benchmarks are scripts, never timed tests)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hat import create_model

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model, tokenizer = create_model("hat-tiny")
    return model.eval().save_pretrained(tmp_path_factory.mktemp("ckpt") / "tiny", tokenizer)


def run_benchmark(name: str, *args) -> dict:
    out = Path(args[args.index("--out") + 1])
    subprocess.run(
        [sys.executable, str(BENCHMARKS / f"{name}.py"), *map(str, args)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.read_text())


def test_retrieval_quality_reports_recall_and_precisions(
    tiny_checkpoint, synthetic_dataset, tmp_path
):
    json_path, image_root = synthetic_dataset
    report = run_benchmark(
        "retrieval_quality",
        *("--checkpoint", tiny_checkpoint, "--data", json_path, "--image-root", image_root),
        *("--split", "train", "--captions", "1", "--out", tmp_path / "q.json"),
    )
    assert (report["images"], report["captions"]) == (48, 48)
    assert set(report["precisions"]) == {"fp32", "fp16", "int8"}
    recall = report["candidate_recall_of_exact_top10"]
    assert set(recall["text_to_image"]) == {"K=10", "K=20"}  # K above 48 images is left out
    assert all(0 < v <= 1 for d in recall.values() for v in d.values())
    assert 0 <= report["first_stage_alone_metrics"]["rsum"] <= 600


def test_query_latency_runs_on_a_synthetic_gallery(tiny_checkpoint, tmp_path):
    report = run_benchmark(
        "query_latency",
        *("--checkpoint", tiny_checkpoint, "--sizes", 300, "--queries", 3, "--threads", 1),
        *("--candidates", 20, "--out", tmp_path / "l.json"),
    )
    (size,) = report["sizes"]
    assert size["images"] == 300 and size["runs"][0]["two_stage"]["p50_ms"] > 0
    assert size["first_stage"]["hnsw_recall_of_flat_topk"] > 0


def test_gallery_encoding_compares_the_build_with_the_forward(tiny_checkpoint, tmp_path):
    report = run_benchmark(
        "gallery_encoding",
        *("--checkpoint", tiny_checkpoint, "--images", 8, "--batch-size", 4, "--repeats", 1),
        *("--threads", 1, "--out", tmp_path / "e.json"),
    )
    assert report["machine"]["torch_threads"] == 1 and report["images"] == 8
    assert report["build_images_per_s"] > 0 and report["forward_alone_images_per_s"] > 0
    assert set(report["bytes_per_image"]) == {"fp32", "fp16", "int8"}


def test_exact_scoring_matches_the_reference_loop(tmp_path):
    report = run_benchmark(
        "exact_scoring",
        *("--images", 4, "--captions", 5, "--regions", 6, "--dim", 8, "--repeats", 1),
        *("--threads", 1, "--out", tmp_path / "s.json"),
    )
    assert report["max_abs_diff_vs_reference"] < 1e-4
    assert report["runs"][0]["speedup"] > 0
