"""Shared dataset-loading machinery: reading local JSONL/JSON/Parquet files with `datasets`
(offline), per-row normalisation, :class:`DatasetRowError` and ``skip_invalid_rows``.

Every loader returns a :class:`LoadedDataset` whose ``records`` are plain dicts with the common
keys below plus environment-specific keys (documented in each loader):

- ``id`` (str): stable identifier of the problem.
- ``task`` (str): ``code`` | ``multiple_choice`` | ``tool_call`` | ``arithmetic`` (the env name).
- ``prompt`` (str): the user turn x of the student prompt (appendix A.1 templates).
- ``system`` (str | None): the system message, if the task has one.
- ``reference_answer`` (str | None): ground truth for RLSD's answer-only teacher context.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable

from megacredit.utils.errors import SetupError, one_line

logger = logging.getLogger(__name__)


class DatasetRowError(SetupError, ValueError):
    """A row of a dataset file is malformed. Names the file, the 1-based row and the field."""

    def __init__(self, path: str, row: int, field_name: str, message: str) -> None:
        self.path = str(path)
        self.row = row
        self.field_name = field_name
        self.message = message
        super().__init__(
            f"{self.path}: row {row} (1-based), field {field_name!r}: {message} "
            "(fix the row, or set data.skip_invalid_rows=true (skip_invalid_rows=True in Python) to skip and "
            "count such rows)"
        )


class DatasetFileError(SetupError, ValueError):
    """A dataset file cannot be read at all (missing, unsupported type, unreadable table)."""


class DatasetFileNotFoundError(DatasetFileError, FileNotFoundError):
    """The dataset file does not exist."""


@dataclass
class LoadedDataset:
    """Normalised records of one file plus what was skipped."""

    records: list[dict[str, Any]]
    """Normalised prompt records, in file order."""
    source: str
    """Path of the file they came from."""
    num_skipped: int = 0
    """Number of malformed rows skipped (only non-zero with skip_invalid_rows=True)."""
    skipped_errors: list[DatasetRowError] = field(default_factory=list)
    """The error of each skipped row (file, row, field, reason)."""

    def __len__(self) -> int:
        return len(self.records)


def require(row: dict[str, Any], key: str, kind: type | tuple[type, ...], path: str, row_number: int) -> Any:
    """Return ``row[key]`` or raise DatasetRowError when it is missing, None or of the wrong type."""
    value = row.get(key)
    if value is None:
        raise DatasetRowError(path, row_number, key, "missing (or null)")
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise DatasetRowError(path, row_number, key, f"expected {names}, got {type(value).__name__}")
    return value


def parse_json_field(value: Any, path: str, row_number: int, key: str) -> Any:
    """Parse a field stored as a JSON string (objects already decoded are returned as is)."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as error:
        raise DatasetRowError(path, row_number, key, f"not valid JSON ({error.msg} at char {error.pos})") from None


def _read_json_lines(path: str) -> list[dict[str, Any] | DatasetRowError]:
    """Plain line-by-line JSONL reading, used to pinpoint rows `datasets` could not parse."""
    rows: list[dict[str, Any] | DatasetRowError] = []
    with open(path, encoding="utf-8") as handle:
        for row_number, line in enumerate((raw for raw in handle if raw.strip()), start=1):
            try:
                value = json.loads(line)
            except json.JSONDecodeError as error:
                rows.append(DatasetRowError(path, row_number, "<json>", f"not valid JSON ({error.msg})"))
                continue
            if not isinstance(value, dict):
                rows.append(DatasetRowError(path, row_number, "<row>", f"expected a JSON object, got {type(value).__name__}"))
            else:
                rows.append(value)
    return rows


def read_rows(path: str) -> list[dict[str, Any] | DatasetRowError]:
    """Read a local .jsonl/.json/.parquet file with `datasets` (offline, no hub access).

    If `datasets` cannot build a table (bad JSON, a field with inconsistent types), JSONL files
    are re-read line by line so the offending rows come back as DatasetRowError entries.
    """
    if not os.path.isfile(path):
        raise DatasetFileNotFoundError(f"dataset file not found: {path}")
    import datasets  # local import: heavy

    extension = os.path.splitext(path)[1].lower()
    builder = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}.get(extension)
    if builder is None:
        raise DatasetFileError(f"{path}: unsupported dataset file type {extension!r}; use .jsonl, .json or .parquet")
    try:
        table = datasets.load_dataset(builder, data_files=path, split="train")
        return [dict(row) for row in table]
    except Exception as error:  # noqa: BLE001 - datasets raises many kinds; we re-diagnose below
        if extension != ".jsonl":
            raise DatasetFileError(f"{path}: could not be read by datasets: {one_line(error)}") from error
        logger.info("datasets could not read %s (%s); re-reading line by line", path, type(error).__name__)
        return _read_json_lines(path)


def normalise_rows(
    path: str,
    rows: list[dict[str, Any] | DatasetRowError],
    normalise: Callable[[Any, str, int], dict[str, Any] | list[dict[str, Any]]],
    skip_invalid_rows: bool,
) -> LoadedDataset:
    """Apply ``normalise(row, path, row_number)`` to each row (one record, or a list when a row
    holds several, as a ToolAlpaca API does); raise or skip-and-count errors."""
    result = LoadedDataset(records=[], source=path)
    for row_number, row in enumerate(rows, start=1):
        try:
            if isinstance(row, DatasetRowError):
                raise row
            normalised = normalise(row, path, row_number)
            result.records.extend(normalised if isinstance(normalised, list) else [normalised])
        except DatasetRowError as error:
            if not skip_invalid_rows:
                raise
            result.skipped_errors.append(error)
    result.num_skipped = len(result.skipped_errors)
    if result.num_skipped:
        logger.warning("%s: skipped %d malformed row(s); first: %s", path, result.num_skipped, result.skipped_errors[0])
    return result
