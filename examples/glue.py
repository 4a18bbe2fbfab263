"""GLUE-format single-sentence classification data (SST-2) from TSV files or the hub.

A data folder holds ``train.tsv`` and ``dev.tsv``: UTF-8, a header line naming the columns
(``sentence`` and ``label`` for SST-2), then one example a line, as GLUE distributes them. Without
a folder the data comes from the hub's ``glue`` data set through the ``datasets`` package.
"""
from __future__ import annotations

import csv
import os

# The environment variable that names an SST-2 folder when no --data-dir is given.
SST2_DIR_ENV = "MGPP_SST2_DIR"
SPLIT_FILES = {"train": "train.tsv", "validation": "dev.tsv"}


def read_glue_tsv(path: str, text_column: str = "sentence",
                  label_column: str = "label") -> dict[str, list]:
    """``{"sentence": [...], "label": [...]}`` from one GLUE TSV file (labels as ints)."""
    sentences, labels = [], []
    with open(path, encoding="utf-8", newline="") as handle:
        # GLUE's TSVs are not quoted: a sentence may hold a bare quote character.
        reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None)
        if header is None or text_column not in header or label_column not in header:
            raise ValueError(f"{path}: the header must name the columns {text_column!r} and "
                             f"{label_column!r}, got {header!r}")
        text_at, label_at = header.index(text_column), header.index(label_column)
        for line_number, row in enumerate(reader, start=2):
            if len(row) != len(header):
                raise ValueError(f"{path}:{line_number}: {len(row)} columns, the header has "
                                 f"{len(header)}")
            try:
                labels.append(int(row[label_at]))
            except ValueError:
                raise ValueError(f"{path}:{line_number}: the label {row[label_at]!r} is not an "
                                 f"integer") from None
            sentences.append(row[text_at])
    return {text_column: sentences, label_column: labels}


def load_sst2(data_dir: str | None = None) -> dict[str, dict[str, list]]:
    """SST-2's ``train`` and ``validation`` (GLUE's dev) splits as column lists.

    From ``data_dir`` when given, else from the folder named by ``$MGPP_SST2_DIR``, else from
    the hub's ``glue/sst2`` (which needs the ``datasets`` package and a network).
    """
    data_dir = data_dir or os.environ.get(SST2_DIR_ENV)
    if data_dir:
        splits = {}
        for split, file_name in SPLIT_FILES.items():
            path = os.path.join(data_dir, file_name)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"no {file_name} in the SST-2 folder {data_dir}")
            splits[split] = read_glue_tsv(path)
        return splits
    try:
        import datasets
    except ImportError:
        raise FileNotFoundError(f"no SST-2 source: pass a folder with train.tsv and dev.tsv "
                                f"(--data-dir, or ${SST2_DIR_ENV}), or install the datasets "
                                f"package to load glue/sst2 from the hub") from None
    hub = datasets.load_dataset("glue", "sst2")
    return {split: {"sentence": list(hub[split]["sentence"]), "label": list(hub[split]["label"])}
            for split in SPLIT_FILES}
