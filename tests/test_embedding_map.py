"""make embedding-map's command on a small sample: PCA and t-SNE maps per representation, and the k-means table."""

from __future__ import annotations

import json

from PIL import Image

from benchmarks import embedding_map
from conftest import MODELS_DIR, classification_cards


def test_embedding_map_on_a_small_sample(tmp_path):
    classifier = "cnn" if "cnn" in classification_cards() else next(iter(classification_cards()))
    result = embedding_map.main(embedding_map.parse_args(
        ["--models-dir", str(MODELS_DIR), "--models", classifier, "--sample", "150", "--digits-epochs", "20", "--tsne-iterations", "250",
         "--out", str(tmp_path)]))
    names = [row["representation"] for row in result["rows"]]
    assert names[:2] == [f"{classifier}-embedding", "raw-pixels"]
    assert names[-2:] == ["digits-mlp-embedding", "digits-raw-pixels"]
    for row in result["rows"]:
        assert -0.5 <= row["ari"] <= 1 and 0 <= row["nmi"] <= 1
        for png in row["pngs"]:
            with Image.open(tmp_path / png) as image:
                assert image.format == "PNG" and image.width > 300
    by_name = {row["representation"]: row for row in result["rows"]}
    # A trained classifier's embedding separates the classes better than its input pixels do.
    assert by_name[f"{classifier}-embedding"]["nmi"] > by_name["raw-pixels"]["nmi"]
    table = (tmp_path / "embedding_map.md").read_text()
    assert table.count("\n| ") == len(result["rows"]) + 1  # header + one row each
    assert json.loads((tmp_path / "embedding_map.json").read_text())["rows"] == result["rows"]
