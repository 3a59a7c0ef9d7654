import numpy as np
import pytest

from hat.metrics import candidate_recall, fold_metrics, format_table, retrieval_metrics


def test_hand_made_similarity_matrix_gives_exact_recalls_and_ranks():
    # 3 images, 2 captions each: captions 0,1 -> image 0; 2,3 -> image 1; 4,5 -> image 2
    c2i = np.array([0, 0, 1, 1, 2, 2])
    sims = np.array(
        [
            # image 0: its caption 1 ranked first -> rank 0
            [0.5, 0.9, 0.1, 0.2, 0.3, 0.0],
            # image 1: best own caption (3) ranked 2nd behind caption 5 -> rank 1
            [0.1, 0.2, 0.3, 0.8, 0.0, 0.9],
            # image 2: own captions 4,5 rank 5th/6th -> best rank 4
            [0.9, 0.8, 0.7, 0.6, 0.2, 0.1],
        ]
    )
    m = retrieval_metrics(sims, c2i)
    assert m["i2t_r1"] == pytest.approx(100 / 3)
    assert m["i2t_r5"] == pytest.approx(100.0)
    assert m["i2t_r10"] == 100.0
    assert m["i2t_medr"] == 2.0  # ranks 1, 2, 5 (1-based)
    assert m["i2t_meanr"] == pytest.approx((1 + 2 + 5) / 3)
    # text->image: column-wise rank of the right image
    # c0: [0.5,0.1,0.9] -> img0 2nd; c1: [0.9,0.2,0.8] -> 1st; c2: [0.1,0.3,0.7] -> img1 2nd
    # c3: [0.2,0.8,0.6] -> 1st; c4: [0.3,0.0,0.2] -> img2 2nd; c5: [0.0,0.9,0.1] -> img2 2nd
    assert m["t2i_r1"] == pytest.approx(200 / 6)
    assert m["t2i_r5"] == 100.0
    assert m["t2i_medr"] == 2.0
    assert m["t2i_meanr"] == pytest.approx((2 + 1 + 2 + 1 + 2 + 2) / 6)
    assert m["rsum"] == pytest.approx(100 / 3 + 200 + 200 / 6 + 200)


def test_identity_is_perfect_and_reversed_is_worst():
    c2i = np.repeat(np.arange(12), 5)
    perfect = (c2i[None, :] == np.arange(12)[:, None]).astype(float)
    assert retrieval_metrics(perfect, c2i)["rsum"] == 600.0
    worst = retrieval_metrics(-perfect, c2i)
    assert worst["i2t_r10"] == 0.0 and worst["t2i_r10"] == 0.0
    assert worst["i2t_medr"] == 12 * 5 - 5 + 1


def test_five_folds_score_each_fold_on_its_own_images_and_average():
    rng = np.random.default_rng(0)
    n_img, folds = 20, 5
    c2i = np.repeat(np.arange(n_img), 5)
    sims = rng.normal(size=(n_img, n_img * 5))
    # make cross-fold pairs extremely similar: they must be ignored by the fold protocol
    fold_of_img = np.arange(n_img) // 4
    fold_of_cap = c2i // 4
    sims[fold_of_img[:, None] != fold_of_cap[None, :]] = 100.0
    got = fold_metrics(sims, c2i, folds)
    expected = [
        retrieval_metrics(
            sims[f * 4 : (f + 1) * 4, f * 20 : (f + 1) * 20], c2i[f * 20 : (f + 1) * 20] - f * 4
        )
        for f in range(folds)
    ]
    for key in got:
        assert got[key] == pytest.approx(np.mean([e[key] for e in expected]))
    assert retrieval_metrics(sims, c2i)["rsum"] < got["rsum"]
    with pytest.raises(ValueError, match="folds"):
        fold_metrics(sims, c2i, 3)


def test_shape_mismatch_and_table():
    with pytest.raises(ValueError, match="captions"):
        retrieval_metrics(np.zeros((2, 3)), np.array([0, 1]))
    c2i = np.array([0, 1])
    table = format_table({"all 2": retrieval_metrics(np.eye(2), c2i)})
    assert "rsum" in table and "600.00" in table


def test_candidate_recall_counts_the_exact_top_items_among_the_first_k():
    exact = np.array([[5.0, 4, 3, 2, 1], [1, 2, 3, 4, 5]])
    first = np.array([[5.0, 1, 4, 2, 3], [5, 4, 3, 2, 1]])
    # query 0: exact top-2 {0, 1}; first-stage top-2 {0, 2}, top-4 {0, 2, 4, 3}
    # query 1: exact top-2 {4, 3}; first-stage top-2 {0, 1}, top-4 {0, 1, 2, 3}
    got = candidate_recall(exact, first, ks=(2, 4, 6), top=2)
    assert got == {"K=2": 0.25, "K=4": 0.5}  # K=6 is more than there are items: left out
    assert candidate_recall(exact, exact, ks=(2,), top=2) == {"K=2": 1.0}


def test_format_table_lists_non_recall_entries_below_the_table():
    row = {f"{d}_r{k}": 1.0 for d in ("i2t", "t2i") for k in (1, 5, 10)} | {"rsum": 6.0}
    text = format_table({"all 5": row, "first stage": {"t2i_K=50": 0.5}})
    assert text.splitlines()[-1] == "first stage: t2i_K=50 0.5000"
