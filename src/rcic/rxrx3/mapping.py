"""What ``rcic map`` takes from this package: RxRx3-core embeddings with their metadata, and known gene
pairs from a built-in source (``corum``, ``humap``, ``reactome``, ``signor``, ``stringdb``) or a file."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from rcic.errors import DataError


def read_rxrx3_embeddings(embeddings: str | Path, metadata: str | Path) -> tuple[pd.DataFrame, np.ndarray]:
    """(rcic's embeddings metadata, features) of an embeddings parquet keyed by ``well_id`` and the
    download's ``metadata_rxrx3_core.csv``: guides labelled by their gene, compounds by name and dose."""
    from rcic.rxrx3.formats import profiles_metadata, read_embeddings, read_metadata

    embedded = read_embeddings(embeddings, read_metadata(metadata), metadata)
    return profiles_metadata(embedded.metadata), embedded.x


def map_relationships(relationships: str, genes: str | Path | None, meta: pd.DataFrame,
                      notify: Callable[[str], None] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(label -> gene table, gene pairs ``gene_a``, ``gene_b``) for ``rcic map``.

    Without ``genes`` the map's labels are taken as gene symbols (an RxRx3-core map, or any map of
    knockouts). A built-in source's licence goes to ``notify`` the first time it is used."""
    from rcic.io.metadata import read_csv_strict
    from rcic.rxrx3.relationships import licence_notice, read_relationships, source_name

    pairs = read_relationships(relationships).rename(columns={"entity1": "gene_a", "entity2": "gene_b"})
    notice = licence_notice(relationships) if source_name(relationships) else None
    if notice and notify is not None:
        notify(notice)
    labels = pd.Series(sorted(set(meta.loc[(meta["well_type"] == "treatment") & (meta["label"] != ""), "label"])))
    if genes is not None:
        gene_table = read_csv_strict(Path(genes), ["label", "gene"])
        if not gene_table["label"].isin(set(labels)).any():
            raise DataError("no label of the gene table is a label of the embeddings: another dataset or label "
                            "spelling?", genes)
    else:
        gene_table = pd.DataFrame({"label": labels, "gene": labels})
    known = set(gene_table["gene"])
    if not (pairs["gene_a"].isin(known) & pairs["gene_b"].isin(known)).any():
        where = "the gene table's genes" if genes is not None else \
            "the map's labels (are they gene symbols? else give --genes label,gene)"
        raise DataError(f"no known pair joins two of {where}", relationships if Path(relationships).exists() else None)
    return gene_table, pairs
