"""Loaders on generated files in the upstream formats, including malformed ones, and on the real
data when ../shared/datasets is present."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

import deconflict
from deconflict.experiments.data.census import COLUMNS, load_census, read_rows
from deconflict.experiments.data.mnist import load_mnist, read_idx, write_idx
from deconflict.experiments.data.two_digits import compose

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"
# The first row of the upstream census-income.test (42 fields).
TEMPLATE = ("38, Private, 6, 36, 1st 2nd 3rd or 4th grade, 0, Not in universe, Married-civilian "
            "spouse present, Manufacturing-durable goods, Machine operators assmblrs & "
            "inspctrs, White, Mexican (Mexicano), Female, Not in universe, Not in universe, "
            "Full-time schedules, 0, 0, 0, Joint one under 65 & one 65+, Not in universe, Not "
            "in universe, Spouse of householder, Spouse of householder, 1032.38, ?, ?, ?, Not "
            "in universe under 1 year old, ?, 4, Not in universe, Mexico, Mexico, Mexico, "
            "Foreign born- Not a citizen of U S , 0, Not in universe, 2, 12, 95, - 50000.")


def census_rows(count: int, seed: int = 0) -> list[str]:
    """Rows in the upstream format with varied age, education, marital status and income."""
    rng = np.random.default_rng(seed)
    index = {name: k for k, name in enumerate(COLUMNS)}
    educations = ["Children", "High school graduate", "Bachelors degree(BA AB BS)",
                  "Some college but no degree", "Masters degree(MA MS MEng MEd MSW MBA)"]
    rows = []
    for _ in range(count):
        fields = [f.strip() for f in TEMPLATE.split(",")]
        fields[index["age"]] = str(int(rng.integers(1, 90)))
        fields[index["education"]] = str(rng.choice(educations))
        fields[index["marital stat"]] = str(rng.choice(["Never married", "Divorced",
                                                        "Married-civilian spouse present"]))
        fields[index["race"]] = str(rng.choice(["White", "Black", "Asian or Pacific Islander"]))
        fields[index["income"]] = "50000+." if rng.random() < 0.3 else "- 50000."
        rows.append(", ".join(fields))
    return rows


def write_census(folder: Path, rows: list[str], name: str = "census-income.test.gz") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    with gzip.open(path, "wt") as handle:
        handle.write("\n".join(rows) + "\n")
    return path


# --------------------------------------------------------------------------------------- census
def test_census_from_the_test_file_alone_is_split_and_says_so(tmp_path):
    write_census(tmp_path / "census-income", census_rows(400))
    data = load_census(tmp_path)
    assert (len(data.train.features), len(data.validation.features),
            len(data.test.features)) == (200, 100, 100)
    assert "split deterministically" in data.note
    # 7 standardized continuous columns, then one-hot blocks (one 1 per categorical column)
    assert np.allclose(data.train.features[:, 0].mean(), 0.0, atol=1e-6)
    assert set(np.unique(data.train.features[:, 7:].sum(axis=1))) == {31.0}
    assert set(data.train.labels) == {"income", "marital", "education"}
    assert "education=Children" not in data.feature_names  # labels are not inputs
    again = load_census(tmp_path / "census-income")
    np.testing.assert_array_equal(again.test.features, data.test.features)


def test_census_with_both_files_trains_on_the_training_file(tmp_path):
    folder = tmp_path / "census-income"
    write_census(folder, census_rows(300, 1), "census-income.data.gz")
    write_census(folder, census_rows(100, 2))
    data = load_census(folder)
    assert (len(data.train.features), len(data.validation.features),
            len(data.test.features)) == (300, 50, 50)
    assert "split 1:1" in data.note


def test_census_education_cut_is_configurable(tmp_path):
    write_census(tmp_path, census_rows(400))
    rates = {cut: load_census(tmp_path, cut).train.labels["education"].mean()
             for cut in ("bachelors", "associates", "some_college")}
    assert rates["bachelors"] < rates["some_college"]
    with pytest.raises(deconflict.InvalidOptionError, match="education_cut"):
        load_census(tmp_path, "phd")


def test_census_wrong_column_count_names_the_file_and_line(tmp_path):
    rows = census_rows(5)
    rows[3] = ", ".join(rows[3].split(", ")[:17])
    path = write_census(tmp_path, rows)
    with pytest.raises(deconflict.DataFormatError, match=rf"{path}:4: expected 42 .* found 17"):
        read_rows(path)


def test_census_truncated_gzip_is_named(tmp_path):
    path = write_census(tmp_path, census_rows(200))
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(deconflict.DataFormatError, match=str(path)):
        read_rows(path)


def test_missing_data_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("DECONFLICT_DATA", raising=False)
    with pytest.raises(deconflict.DataNotFoundError, match="DECONFLICT_DATA"):
        load_census(None)
    with pytest.raises(deconflict.DataNotFoundError, match=r"census-income\.test"):
        load_census(tmp_path)


def test_data_directory_from_the_environment(tmp_path, monkeypatch):
    write_census(tmp_path / "census-income", census_rows(40))
    monkeypatch.setenv("DECONFLICT_DATA", str(tmp_path))
    assert len(load_census().test.features) == 10


@pytest.mark.skipif(not (SHARED / "census-income").is_dir(), reason="no ../shared/datasets")
def test_real_census_test_file():
    data = load_census(SHARED)
    assert len(data.train.features) + len(data.validation.features) + len(
        data.test.features) == 99_762
    assert data.train.labels["income"].mean() == pytest.approx(0.062, abs=0.003)


# ---------------------------------------------------------------------------------------- MNIST
def write_mnist(folder: Path, count: int, seed: int = 0, train: bool = False) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    prefixes = ("t10k", "train") if train else ("t10k",)
    for prefix in prefixes:
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz",
                  rng.integers(0, 256, (count, 28, 28)).astype(np.uint8))
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz",
                  rng.integers(0, 10, count).astype(np.uint8))


def test_idx_round_trip(tmp_path):
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    for name in ("a.idx", "a.idx.gz"):
        write_idx(tmp_path / name, array)
        np.testing.assert_array_equal(read_idx(tmp_path / name), array)


def test_idx_header_is_big_endian_as_upstream(tmp_path):
    write_idx(tmp_path / "labels", np.array([7, 1], dtype=np.uint8))
    assert (tmp_path / "labels").read_bytes() == bytes([0, 0, 8, 1, 0, 0, 0, 2, 7, 1])


@pytest.mark.parametrize(("content", "message"), [
    (bytes([1, 0, 8, 1, 0, 0, 0, 1, 5]), "bad magic"),
    (bytes([0, 0, 13, 1, 0, 0, 0, 1, 5]), "data type 0x0d"),
    (bytes([0, 0, 8, 3, 0, 0]), "truncated header"),
    (bytes([0, 0, 8, 1, 0, 0, 0, 9, 5]), r"shape \(9,\) \(9 bytes of data\) but the file holds 1"),
])
def test_malformed_idx_names_the_file(tmp_path, content, message):
    path = tmp_path / "broken-idx1-ubyte"
    path.write_bytes(content)
    with pytest.raises(deconflict.DataFormatError, match=message) as error:
        read_idx(path)
    assert str(path) in str(error.value)


def test_mnist_test_set_only_is_split_and_says_so(tmp_path):
    write_mnist(tmp_path / "mnist", 100)
    data = load_mnist(tmp_path)
    assert (len(data.train[1]), len(data.validation[1]), len(data.test[1])) == (80, 10, 10)
    assert "split deterministically" in data.note
    assert data.train[0].dtype == np.float32 and data.train[0].max() <= 1.0


def test_mnist_with_training_images_uses_the_standard_split(tmp_path):
    write_mnist(tmp_path, 50, train=True)
    data = load_mnist(tmp_path)
    assert (len(data.train[1]), len(data.validation[1]), len(data.test[1])) == (45, 5, 50)


def test_mnist_images_and_labels_must_agree(tmp_path):
    write_mnist(tmp_path, 20)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(19, dtype=np.uint8))
    with pytest.raises(deconflict.DataFormatError, match="labels of shape"):
        load_mnist(tmp_path)


@pytest.mark.skipif(not (SHARED / "mnist").is_dir(), reason="no ../shared/datasets")
def test_real_mnist_test_set():
    data = load_mnist(SHARED)
    assert len(data.train[1]) + len(data.validation[1]) + len(data.test[1]) == 10_000


def test_two_digits_overlay_by_maximum():
    """8 x 8 digits on a 10 x 10 canvas: the first at (0, 0), the second at (2, 2)."""
    images = np.zeros((2, 8, 8), dtype=np.float32)
    images[0, 0, 0] = 1.0
    images[1, 7, 7] = 0.5
    images[1, 0, 0] = 0.25  # lands at (2, 2)
    pair = compose(images, np.array([3, 8]), 50, canvas=10, seed=0)
    k = int(np.flatnonzero((pair.left_labels == 3) & (pair.right_labels == 8))[0])
    canvas = pair.images[k, 0]
    assert canvas[0, 0] == 1.0 and canvas[9, 9] == 0.5 and canvas[2, 2] == 0.25
    np.testing.assert_array_equal(pair.right_images[k], images[1].reshape(-1))
    resized = compose(np.ones((3, 28, 28), np.float32), np.arange(3), 4, canvas=32, seed=0,
                      resize=28)
    assert resized.images.shape == (4, 1, 28, 28)
