"""UCI Census-Income (KDD): the upstream files, three binary tasks (GradOPS Section 4.1, MMoE).

Files (https://archive.ics.uci.edu/dataset/117): ``census-income.data`` (199,523 rows) and
``census-income.test`` (99,762 rows), optionally gzipped, 42 comma-separated fields per line: 40
attributes, the instance weight (field 25) and the income label ("- 50000." / "50000+.").

Tasks: income (> 50K), marital (never married), education (at least college; the cut is
ambiguous in the sources, so it is an option: "bachelors" (default: bachelors, masters,
doctorate, professional school; ~14.7% positive), "associates" (+ associates degrees) or
"some_college" (+ some college but no degree)). Education and marital status are removed from
the inputs (they are labels, as in MMoE), and so is the instance weight.

Encoding: the 7 continuous attributes standardized with the training split's mean and standard
deviation; the 31 others one-hot, with a vocabulary from the training split (an unseen value
encodes as all zeros; "?" is a value like any other).

Splits: with both files, train on the training file and split the test file 1:1 into
validation and test (MMoE). With only the test file (as in ../shared/datasets), it is split
deterministically (a fixed permutation, independent of the run's seed) into 50% train, 25%
validation and 25% test, and ``CensusData.note`` says so.
"""

from __future__ import annotations

import functools
import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...errors import DataFormatError, InvalidOptionError
from . import data_directory

COLUMNS = (
    "age", "class of worker", "detailed industry recode", "detailed occupation recode",
    "education", "wage per hour", "enroll in edu inst last wk", "marital stat",
    "major industry code", "major occupation code", "race", "hispanic origin", "sex",
    "member of a labor union", "reason for unemployment", "full or part time employment stat",
    "capital gains", "capital losses", "dividends from stocks", "tax filer stat",
    "region of previous residence", "state of previous residence",
    "detailed household and family stat", "detailed household summary in household",
    "instance weight", "migration code-change in msa", "migration code-change in reg",
    "migration code-move within reg", "live in this house 1 year ago",
    "migration prev res in sunbelt", "num persons worked for employer",
    "family members under 18", "country of birth father", "country of birth mother",
    "country of birth self", "citizenship", "own business or self employed",
    "fill inc questionnaire for veteran's admin", "veterans benefits", "weeks worked in year",
    "year", "income",
)
CONTINUOUS = ("age", "wage per hour", "capital gains", "capital losses", "dividends from stocks",
              "num persons worked for employer", "weeks worked in year")
NOT_FEATURES = ("education", "marital stat", "instance weight", "income")
TASKS = ("income", "marital", "education")
EDUCATION_CUTS: dict[str, tuple[str, ...]] = {
    "bachelors": ("Bachelors degree(BA AB BS)", "Masters degree(MA MS MEng MEd MSW MBA)",
                  "Doctorate degree(PhD EdD)", "Prof school degree (MD DDS DVM LLB JD)"),
}
EDUCATION_CUTS["associates"] = EDUCATION_CUTS["bachelors"] + (
    "Associates degree-occup /vocational", "Associates degree-academic program")
EDUCATION_CUTS["some_college"] = EDUCATION_CUTS["associates"] + ("Some college but no degree",)
TRAIN_FILES = ("census-income.data.gz", "census-income.data")
TEST_FILES = ("census-income.test.gz", "census-income.test")
SPLIT_SEED = 0


@dataclass(frozen=True)
class Split:
    features: np.ndarray  # (N, F) float32
    labels: dict[str, np.ndarray]  # task -> (N,) float32 in {0, 1}


@dataclass(frozen=True)
class CensusData:
    train: Split
    validation: Split
    test: Split
    feature_names: tuple[str, ...]
    note: str


def read_rows(path: str | os.PathLike[str]) -> np.ndarray:
    """The rows of one upstream file (N x 42 strings), each checked to have 42 fields."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    try:
        with opener(path, "rt", encoding="latin-1") as handle:
            for number, line in enumerate(handle, start=1):
                line = line.strip()
                if not line:
                    continue
                fields = [field.strip() for field in line.split(",")]
                if len(fields) != len(COLUMNS):
                    raise DataFormatError(f"{path}:{number}: expected {len(COLUMNS)} "
                                          f"comma-separated fields, found {len(fields)}")
                rows.append(fields)
    except (OSError, EOFError) as error:  # truncated gzip streams end here
        raise DataFormatError(f"{path}: cannot be read to the end ({error})") from None
    if not rows:
        raise DataFormatError(f"{path}: no rows")
    table = np.empty((len(rows), len(COLUMNS)), dtype=object)
    table[:] = rows
    return table


def _find(directory: Path, names: tuple[str, ...]) -> Path | None:
    return next((directory / n for n in names if (directory / n).is_file()), None)


def task_labels(rows: np.ndarray, education_cut: str) -> dict[str, np.ndarray]:
    index = {name: k for k, name in enumerate(COLUMNS)}
    return {
        "income": np.array([value.startswith("50000+") for value in rows[:, index["income"]]],
                           np.float32),
        "marital": (rows[:, index["marital stat"]] == "Never married").astype(np.float32),
        "education": np.isin(rows[:, index["education"]],
                             EDUCATION_CUTS[education_cut]).astype(np.float32),
    }


class CensusEncoder:
    """Standardize the continuous attributes, one-hot the others; fitted on the training rows."""

    def __init__(self, rows: np.ndarray) -> None:
        index = {name: k for k, name in enumerate(COLUMNS)}
        self.continuous = [index[c] for c in CONTINUOUS]
        self.categorical = [k for k, name in enumerate(COLUMNS)
                            if name not in CONTINUOUS and name not in NOT_FEATURES]
        values = self._continuous_values(rows)
        self.mean = values.mean(axis=0)
        self.std = np.where(values.std(axis=0) > 0, values.std(axis=0), 1.0)
        self.vocabularies = [np.unique(rows[:, k]) for k in self.categorical]
        self.names = tuple(COLUMNS[k] for k in self.continuous) + tuple(
            f"{COLUMNS[k]}={value}" for k, vocabulary in zip(self.categorical, self.vocabularies,
                                                              strict=True) for value in vocabulary)

    def _continuous_values(self, rows: np.ndarray) -> np.ndarray:
        try:
            return rows[:, self.continuous].astype(np.float64)
        except ValueError as error:
            raise DataFormatError(f"a continuous census attribute is not a number: {error}") \
                from None

    def encode(self, rows: np.ndarray) -> np.ndarray:
        blocks = [(self._continuous_values(rows) - self.mean) / self.std]
        for k, vocabulary in zip(self.categorical, self.vocabularies, strict=True):
            column = rows[:, k]
            position = np.clip(np.searchsorted(vocabulary, column), 0, len(vocabulary) - 1)
            known = vocabulary[position] == column  # unseen values encode as all zeros
            one_hot = np.zeros((len(rows), len(vocabulary)))
            one_hot[np.flatnonzero(known), position[known]] = 1.0
            blocks.append(one_hot)
        return np.concatenate(blocks, axis=1).astype(np.float32)


def load_census(directory: str | os.PathLike[str] | None = None,
                education_cut: str = "bachelors") -> CensusData:
    """Read, split and encode Census-Income from ``directory`` (or $DECONFLICT_DATA).

    Cached per process (a compare or sweep trains many models on the same data).
    """
    root = data_directory(directory, "census-income", TRAIN_FILES + TEST_FILES)
    return _load(str(root.resolve()), education_cut)


@functools.lru_cache(maxsize=4)
def _load(directory: str, education_cut: str) -> CensusData:
    if education_cut not in EDUCATION_CUTS:
        raise InvalidOptionError(f"education_cut must be one of {sorted(EDUCATION_CUTS)}, got "
                                 f"{education_cut!r}")
    root = Path(directory)
    test_path, train_path = _find(root, TEST_FILES), _find(root, TRAIN_FILES)
    if test_path is None:
        raise DataFormatError(f"{root}: census-income.test(.gz) is missing")
    test_rows = read_rows(test_path)
    order = np.random.default_rng(SPLIT_SEED).permutation(len(test_rows))
    if train_path is not None:
        train_rows = read_rows(train_path)
        half = len(test_rows) // 2
        validation_rows, final_rows = test_rows[order[:half]], test_rows[order[half:]]
        note = (f"trained on {train_path.name} ({len(train_rows):,} rows); {test_path.name} "
                f"split 1:1 (fixed permutation) into validation ({len(validation_rows):,}) and "
                f"test ({len(final_rows):,})")
    else:
        a, b = len(test_rows) // 2, (3 * len(test_rows)) // 4
        train_rows, validation_rows, final_rows = (test_rows[order[:a]], test_rows[order[a:b]],
                                                   test_rows[order[b:]])
        note = (f"census-income.data not found in {root}: the {len(test_rows):,} rows of "
                f"{test_path.name} were split deterministically (fixed permutation) into train "
                f"({len(train_rows):,}), validation ({len(validation_rows):,}) and test "
                f"({len(final_rows):,}); numbers are not comparable to the papers' split")
    encoder = CensusEncoder(train_rows)

    def split(rows: np.ndarray) -> Split:
        return Split(encoder.encode(rows), task_labels(rows, education_cut))

    return CensusData(split(train_rows), split(validation_rows), split(final_rows),
                      encoder.names, note)
