import numpy as np
import pytest
from PIL import Image

from idml.evaluation import (
    plot_recall_curves,
    plot_retrieval_grid,
    plot_uncertainty_analysis,
    recall_by_uncertainty,
)
from idml.evaluation.plots import WRONG_COLOR

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path, min_kb=5):
    data = open(path, "rb").read()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > min_kb * 1024


def count_color(path, rgb):
    img = np.asarray(Image.open(path).convert("RGB")).astype(int)
    return int((np.abs(img - np.array(rgb)).sum(axis=2) < 30).sum())


def test_uncertainty_analysis_png(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 4)
    x = rng.normal(size=(10, 8))[labels] + 0.5 * rng.normal(size=(40, 8))
    u = rng.uniform(size=40)
    bins = recall_by_uncertainty(x, labels, u)
    path = plot_uncertainty_analysis(bins, rng.gamma(2, 1, 300), rng.gamma(4, 1, 200),
                                     tmp_path / "sub" / "unc.png")
    assert path == str(tmp_path / "sub" / "unc.png")
    assert_png(path, min_kb=20)
    assert_png(plot_uncertainty_analysis(bins, u, None, tmp_path / "clean_only.png"))
    with pytest.raises(ValueError, match="bins"):
        plot_uncertainty_analysis([], u, None, tmp_path / "x.png")


def test_recall_curves_png(tmp_path):
    history = [
        {"epoch": e, "val/recall@1": 0.3 + 0.05 * e, "val/map@r": 0.1 + 0.02 * e,
         "test/recall@1": 0.25 + 0.04 * e, "val/recall@16": 0.9}
        for e in range(6)
    ]
    history.append({"epoch": 6, "val/recall@1": 0.62})  # a series may lack some epochs
    path = plot_recall_curves(history, tmp_path / "curves.png")
    assert_png(path, min_kb=15)
    with pytest.raises(ValueError, match="no history key matches"):
        plot_recall_curves(history, tmp_path / "x.png", keys=("nmi",))
    with pytest.raises(ValueError, match="epoch"):
        plot_recall_curves([{"recall@1": 0.5}], tmp_path / "x.png")


def test_retrieval_grid_png_borders(tmp_path):
    rng = np.random.default_rng(0)
    img = lambda: rng.integers(0, 100, size=(32, 24, 3), dtype=np.uint8)  # noqa: E731
    queries = [img(), Image.fromarray(img())]
    results = [[img(), img(), img()], [img(), Image.fromarray(img()), img()]]
    all_correct = plot_retrieval_grid(queries, results, [[True] * 3] * 2, tmp_path / "ok.png")
    assert_png(all_correct)
    assert count_color(all_correct, WRONG_COLOR) == 0
    path = plot_retrieval_grid(
        queries, results, [[True, False, True], [False, False, True]], tmp_path / "grid.png",
        query_titles=["cat 1", "dog 7"], result_scores=[[0.9, 0.8, 0.7], [0.6, 0.5, 0.4]],
    )
    assert_png(path)
    assert count_color(path, WRONG_COLOR) > 100  # thick red borders around wrong results
    with pytest.raises(ValueError, match="one row of results"):
        plot_retrieval_grid(queries, results[:1], [[True] * 3], tmp_path / "x.png")
    with pytest.raises(ValueError, match="uint8"):
        plot_retrieval_grid([np.zeros((4, 4, 3))], [[img()]], [[True]], tmp_path / "x.png")


def test_uncertainty_extremes_put_least_uncertain_on_top(tmp_path):
    from idml.evaluation.plots import save_uncertainty_extremes

    blue, red, grey = (0, 0, 255), (255, 0, 0), (128, 128, 128)
    uncertainty = np.array([0.5, 3.0, 1.0, 0.2, 2.5, 1.1, 0.9, 2.9])
    # The 3 least uncertain images are blue, the 3 most uncertain red, the rest grey.
    order = np.argsort(uncertainty)
    colour = {int(i): blue for i in order[:3]} | {int(i): red for i in order[-3:]}
    asked = []

    def load_images(indices):
        asked.extend(indices)
        return {i: Image.new("RGB", (16, 16), colour.get(i, grey)) for i in indices}

    path = save_uncertainty_extremes(uncertainty, load_images, tmp_path / "extremes.png", n=3)
    assert_png(path, min_kb=1)
    assert sorted(asked) == sorted(colour)  # only the shown images are read
    pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)

    def rows_of(rgb):
        return np.nonzero(np.all(np.abs(pixels - rgb) <= 10, axis=-1))[0]

    blue_rows, red_rows = rows_of(blue), rows_of(red)
    assert len(blue_rows) > 1000 and len(red_rows) > 1000
    assert blue_rows.max() < red_rows.min()  # every blue (least uncertain) pixel lies above every red one
    assert save_uncertainty_extremes(np.array([1.0]), load_images, tmp_path / "none.png") is None
