"""Raw rows from wherever a config points: local json/jsonl/parquet/csv files, a `save_to_disk` directory, or the Hub.

Everything is returned as a `datasets.Dataset` so the builders see one row interface whatever the source.
"""
from __future__ import annotations

import socket
import urllib.parse
from pathlib import Path

import datasets

FILE_LOADERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


class DataError(ValueError):
    """Data that cannot be used as configured; the message names the file, column or setting and the fix."""


def _looks_like_local_path(path: str) -> bool:
    """A Hub id is `name` or `org/name`; absolute, dotted-relative or suffixed paths are meant to be local."""
    return path.startswith(("/", ".", "~")) or Path(path).suffix != "" or path.count("/") > 1


LOCAL_ROWS = "give a local file (json/jsonl/parquet/csv) or a save_to_disk directory instead"


def _hub_unreachable(endpoint: str, timeout_s: float = 3.0) -> str | None:
    """Why no TCP connection to the Hub `endpoint` (its URL) opens within `timeout_s` seconds, else None."""
    url = urllib.parse.urlsplit(endpoint)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                 timeout=timeout_s).close()
    except OSError as e:
        return e.strerror or type(e).__name__
    return None


def _read_hub(path: str, split: str) -> datasets.Dataset:
    """A Hub dataset's split; with HF_HUB_OFFLINE set, from the datasets cache. Without network this fails at once
    (one line) rather than after half a minute of retries."""
    from huggingface_hub import constants
    if not constants.HF_HUB_OFFLINE:
        reason = _hub_unreachable(constants.ENDPOINT)
        if reason:
            raise DataError(f"{path} is a Hub dataset, but the Hub ({constants.ENDPOINT}) cannot be reached "
                            f"({reason}); {LOCAL_ROWS}, or set HF_HUB_OFFLINE=1 to use the datasets cache")
        return datasets.load_dataset(path, split=split)
    try:
        return datasets.load_dataset(path, split=split)
    except ConnectionError:
        raise DataError(f"{path} is a Hub dataset, but HF_HUB_OFFLINE is set and it is not in the datasets cache; "
                        f"{LOCAL_ROWS}") from None


def _read(path: str, split: str) -> datasets.Dataset:
    local = Path(path).expanduser()
    if local.is_dir():
        rows = datasets.load_from_disk(str(local))
        if isinstance(rows, datasets.DatasetDict):
            if split not in rows:
                raise DataError(f"{path} has splits {sorted(rows)}, not {split!r}: set the dataset's split")
            rows = rows[split]
        return rows
    if local.is_file():
        loader = FILE_LOADERS.get(local.suffix.lower())
        if loader is None:
            raise DataError(f"{path}: unsupported file type {local.suffix!r}; use one of {sorted(FILE_LOADERS)}")
        return datasets.load_dataset(loader, data_files=str(local), split="train")
    if _looks_like_local_path(path):
        raise DataError(f"data file or directory {path} does not exist")
    return _read_hub(path, split)


def load_rows(path: str, split: str = "train", limit: int | None = None) -> datasets.Dataset:
    """Load one split of rows; local files have a single split, so `split` only selects within dirs and Hub sets."""
    if not path:
        raise DataError("data path is empty: set the dataset's path (a file, a save_to_disk directory or a Hub name)")
    if limit is not None and limit < 1:
        raise DataError(f"limit must be a positive number of rows or None, got {limit}")
    try:
        rows = _read(path, split)
    except DataError:
        raise
    except Exception as e:  # empty or malformed files, offline or missing Hub sets fail in many ways; report as one
        raise DataError(f"could not load {path} (split {split!r}): it has no rows or is not readable "
                        f"({type(e).__name__}: {e})") from e
    if limit is not None:
        rows = rows.select(range(min(limit, len(rows))))
    if len(rows) == 0:
        raise DataError(f"could not load {path} (split {split!r}): it has no rows")
    return rows


def require_columns(rows: datasets.Dataset, expected: dict[str, str | None], path: str) -> None:
    """Fail early, naming both sides, instead of a KeyError deep inside tokenization. `expected` maps each needed
    column to the dataset setting that names it (e.g. "columns.answer"), or to None when the kind fixes it."""
    missing = [c for c in expected if c not in rows.column_names]
    if missing:
        settings = [expected[c] for c in missing if expected[c]]
        fix = (f"set the dataset's {', '.join(settings)} to columns the file has" if settings else
               "this kind's columns are fixed: rename them in the file, or use kind='instruction' with `columns`")
        raise DataError(f"{path} lacks column(s) {missing}: expected {list(expected)}, found {rows.column_names}; "
                        f"{fix}")
