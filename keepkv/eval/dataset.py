"""Task datasets in kvpress's columns, read and written as JSON lines or Parquet (``keepkv eval tasks --dataset``,
``keepkv eval export-tasks``).

One record per sample with the columns kvpress's evaluation reads (``REQUIRED_COLUMNS``):

- ``context`` (str): the text compressed when the question is not yet known;
- ``question`` (str): the text after it (may be empty);
- ``answer_prefix`` (str): the start of the assistant turn (may be empty);
- ``answers`` (list of str; a single string is accepted on reading and becomes a one-item list);
- ``max_new_tokens`` (int).

Other columns are kept as they are; keepkv's own tasks add ``task`` (family), ``length`` (target tokens),
``sample``, ``cell``, ``seed``, ``haystack``, ``distractors`` and ``chat`` (:mod:`keepkv.eval.tasks`). A file
missing a required column is refused with a :class:`~keepkv.errors.KeepKVError` naming the columns; a written file
appears whole or not at all (written to a temporary file in the same folder, then renamed). Parquet needs
``pyarrow`` (``pip install keepkv[eval]``), imported only when a ``.parquet`` path is given.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from keepkv.errors import KeepKVError

REQUIRED_COLUMNS = ("context", "question", "answer_prefix", "answers", "max_new_tokens")
FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}


def dataset_format(path: str | Path) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise KeepKVError(f"{path}: unknown dataset format {suffix or '(no suffix)'!r}; allowed: .jsonl, .parquet")
    return FORMATS[suffix]


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError as err:
        raise KeepKVError("reading or writing Parquet needs pyarrow: pip install 'keepkv[eval]' "
                          "(or use a .jsonl file)") from err
    return pyarrow


def check_records(records: list[dict[str, Any]], source: str) -> list[dict[str, Any]]:
    """Every record has every required column with a usable type; ``answers`` normalised to a list of str,
    ``max_new_tokens`` to an int. Raises :class:`KeepKVError` naming the missing columns or the bad value."""
    if not records:
        raise KeepKVError(f"{source}: the dataset has no records")
    missing = sorted({c for r in records for c in REQUIRED_COLUMNS if c not in r},
                     key=REQUIRED_COLUMNS.index)
    if missing:
        raise KeepKVError(f"{source}: missing column{'s' if len(missing) > 1 else ''} {', '.join(missing)}; "
                          f"a task dataset needs {', '.join(REQUIRED_COLUMNS)} (kvpress's columns)")
    checked = []
    for index, record in enumerate(records):
        record = dict(record)
        for column in ("context", "question", "answer_prefix"):
            if record[column] is None:
                record[column] = ""
            if not isinstance(record[column], str):
                raise KeepKVError(f"{source} record {index}: {column} must be a string, got "
                                  f"{type(record[column]).__name__}")
        answers = record["answers"]
        if isinstance(answers, str):
            answers = [answers]
        if hasattr(answers, "tolist"):
            answers = answers.tolist()
        if not isinstance(answers, (list, tuple)) or not answers or not all(isinstance(a, (str, int)) for a in answers):
            raise KeepKVError(f"{source} record {index}: answers must be a non-empty list of strings, got {answers!r}")
        record["answers"] = [str(a) for a in answers]
        try:
            record["max_new_tokens"] = int(record["max_new_tokens"])
        except (TypeError, ValueError):
            raise KeepKVError(f"{source} record {index}: max_new_tokens must be an integer, got "
                              f"{record['max_new_tokens']!r}") from None
        if record["max_new_tokens"] < 1:
            raise KeepKVError(f"{source} record {index}: max_new_tokens must be >= 1, got {record['max_new_tokens']}")
        if not record["context"]:
            raise KeepKVError(f"{source} record {index}: context is empty")
        checked.append(record)
    return checked


def read_dataset(path: str | Path) -> list[dict[str, Any]]:
    """The checked records of a ``.jsonl`` or ``.parquet`` file (:func:`check_records`)."""
    path = Path(path)
    kind = dataset_format(path)
    if not path.is_file():
        raise KeepKVError(f"no such dataset file: {path}")
    if kind == "parquet":
        records = _pyarrow().parquet.read_table(path).to_pylist()
    else:
        records = []
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise KeepKVError(f"{path} line {number}: not JSON ({err.msg})") from None
                if not isinstance(record, dict):
                    raise KeepKVError(f"{path} line {number}: a record must be a JSON object")
                records.append(record)
    return check_records(records, str(path))


def write_dataset(records: list[dict[str, Any]], path: str | Path) -> Path:
    """Write checked ``records`` to ``path`` (``.jsonl`` or ``.parquet``) atomically: a temporary file in the same
    folder, renamed over ``path`` once complete (nothing half-written on error)."""
    path = Path(path)
    kind = dataset_format(path)
    records = check_records(records, str(path))
    arrow = _pyarrow() if kind == "parquet" else None
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if kind == "parquet":
            os.close(handle)
            arrow.parquet.write_table(arrow.Table.from_pylist(records), temporary)
        else:
            with os.fdopen(handle, "w", encoding="utf-8") as out:
                for record in records:
                    out.write(json.dumps(record, ensure_ascii=False) + "\n")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # mkstemp's 0600 -> what a plain open() would have made
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def dataset_source(path: str | Path) -> str:
    """A short identity of a dataset file for result keys: ``<stem>-<sha256 prefix of its bytes>``."""
    path = Path(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    return f"{path.stem}-{digest}"
