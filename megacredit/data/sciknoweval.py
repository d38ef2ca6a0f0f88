"""SciKnowEval (Level 3) loader, native `hicai-zju/SciKnowEval` field layout, offline.

Field layout, as the SDPO data pipeline that the CREDIT paper follows reads it (lasgroup/SDPO
``data/format/sciknoweval.py``: ``format`` and ``load_sciknoweval``; the dataset card was not
reachable here): each native row has ``question`` (str), ``choices`` = ``{"text": [...],
"label": ["A", "B", ...]}``, ``answerKey`` (a label), ``domain`` (``Biology``, ``Chemistry``,
``Material``, ``Physics``: the domains of SDPO's ``data/README.md``), ``details`` = ``{"level":
"L3", ...}`` and ``type``. The paper uses Level-3 multiple-choice questions (SDPO's
``data/load_dataset.py`` passes ``levels=["L3"]``, ``types=["mcq-4-choices", "mcq-2-choices"]``)
and SDPO's split, a ``datasets`` ``train_test_split(test_size=0.1, seed=42)`` per domain
(``data/split_tasks.py::split_tasks``), which :func:`split_sciknoweval` reproduces.

Record produced (consumed by MultipleChoiceEnv): ``id``, ``task='multiple_choice'``,
``prompt`` (question + options + "Please reason step by step."), ``system`` (the appendix
A.1 answer-format system prompt), ``answer`` (letter), ``choice_labels``, ``domain``,
``level``, ``question_type``, ``reference_answer`` (= answer).
"""

from __future__ import annotations

from typing import Any, Sequence

from megacredit.data.common import DatasetRowError, LoadedDataset, normalise_rows, read_rows, require
from megacredit.data.templates import SCIKNOWEVAL_SYSTEM_PROMPT, sciknoweval_prompt

DEFAULT_LEVELS = ("L3",)
DEFAULT_TYPES = ("mcq-4-choices", "mcq-2-choices")


def normalise_sciknoweval_row(row: dict[str, Any], path: str, row_number: int) -> dict[str, Any]:
    """One native SciKnowEval row -> one normalised record (raises DatasetRowError)."""
    question = require(row, "question", str, path, row_number)
    choices = require(row, "choices", dict, path, row_number)
    texts, labels = choices.get("text"), choices.get("label")
    if not isinstance(texts, list) or not isinstance(labels, list) or not labels:
        raise DatasetRowError(path, row_number, "choices", "needs non-empty lists 'text' and 'label'")
    if len(texts) != len(labels):
        raise DatasetRowError(path, row_number, "choices", f"{len(texts)} texts but {len(labels)} labels")
    labels = [str(label).strip().upper() for label in labels]
    answer = str(require(row, "answerKey", str, path, row_number)).strip().upper()
    if answer not in labels:
        raise DatasetRowError(path, row_number, "answerKey", f"{answer!r} is not one of the choice labels {labels}")
    details = row.get("details") or {}
    identifier = row.get("id") or f"{row.get('domain', 'sciknoweval')}-{row_number}"
    return {
        "id": str(identifier),
        "task": "multiple_choice",
        "prompt": sciknoweval_prompt(question, labels, [str(t) for t in texts]),
        "system": SCIKNOWEVAL_SYSTEM_PROMPT,
        "answer": answer,
        "choice_labels": labels,
        "domain": row.get("domain") or "",
        "level": details.get("level") if isinstance(details, dict) else None,
        "question_type": row.get("type") or "",
        "reference_answer": answer,
    }


def load_sciknoweval(
    path: str,
    skip_invalid_rows: bool = False,
    domains: Sequence[str] | None = None,
    levels: Sequence[str] | None = DEFAULT_LEVELS,
    types: Sequence[str] | None = DEFAULT_TYPES,
) -> LoadedDataset:
    """Load a local SciKnowEval JSONL/Parquet file, keeping the given domains/levels/types.

    Filters are applied after validation (a malformed row is reported even if it would be
    filtered out). ``None`` disables a filter.
    """
    loaded = normalise_rows(path, read_rows(path), normalise_sciknoweval_row, skip_invalid_rows)
    loaded.records = [
        r for r in loaded.records
        if (domains is None or r["domain"] in domains)
        and (levels is None or r["level"] in levels)
        and (types is None or r["question_type"] in types)
    ]
    return loaded


def split_sciknoweval(records: list[dict[str, Any]], test_ratio: float = 0.1, seed: int = 42) -> tuple[list, list]:
    """SDPO's train/test split: ``datasets.Dataset.train_test_split(test_size, seed)``.

    Given the same rows in the same order as SDPO's filtered per-domain table, this gives the
    same split (it is the same function with the same arguments). Returns (train, test).
    """
    import datasets

    if not records:
        return [], []
    indices = datasets.Dataset.from_dict({"index": list(range(len(records)))})
    parts = indices.train_test_split(test_size=test_ratio, seed=seed)
    return [records[i] for i in parts["train"]["index"]], [records[i] for i in parts["test"]["index"]]
