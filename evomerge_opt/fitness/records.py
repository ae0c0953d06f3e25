"""Records of an accuracy dataset (prompt/answer, prompt/choices/label), read and checked before any model.

The file formats and hub access are :mod:`evomerge_opt.data.records`' (``.jsonl``/``.json``/
``.csv``/``.parquet``, ``zoo:...``, ``hub:``); ``shuffle``/``seed`` then ``num_samples`` (the first N)
select the records, in file order otherwise, so "the first n questions" of a budgeted evaluation are
the file's first n. :func:`~evomerge_opt.fitness.checks.check_dataset` applies the metric's record rules (fields present, labels in
range, numeric answers parseable) and raises :class:`~evomerge_opt.errors.ConfigError` listing the bad
records.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from evomerge_opt.errors import ModelSourceError

if TYPE_CHECKING:
    from evomerge_opt.fitness.spec import FitnessDatasetSpec

MAX_LISTED = 5  # bad records named in one problem line


def load_records(spec: FitnessDatasetSpec) -> list[dict[str, Any]]:
    """The selected records of ``spec`` as plain dicts (no checks beyond "readable and not empty")."""
    from evomerge_opt.data import records as readers

    path = None
    if spec.hub is None:
        path = readers.resolve_path(spec)
        if path.stat().st_size == 0:
            raise ModelSourceError(f"Dataset file {str(path)!r} (dataset {spec.name!r}) is empty.")
    ds, _ = readers.load_records(spec, path)
    if len(ds) == 0:
        raise ModelSourceError(f"Dataset {spec.name!r} has no records.")
    if spec.shuffle:
        ds = ds.shuffle(seed=spec.seed)
    if spec.num_samples is not None and spec.num_samples < len(ds):
        ds = ds.select(range(spec.num_samples))
    return ds.to_list()


def missing_field_problems(spec: FitnessDatasetSpec, records: list[dict[str, Any]], fields: dict[str, str]) -> list[str]:
    """One problem per ``{key: field}`` that some record lacks (or holds as null)."""
    problems = []
    columns = sorted(records[0]) if records else []
    for key, field in fields.items():
        bad = [i for i, r in enumerate(records) if r.get(field) is None]
        if bad:
            which = "every record" if len(bad) == len(records) else f"records {listed(bad)}"
            problems.append(
                f"dataset {spec.name!r} (metric {spec.metric}): {which} lack(s) the field {field!r} "
                f"(`{key}`); the records' fields are {columns}. Set `{key}` to the field that holds it."
            )
    return problems


def listed(indices: list[int]) -> str:
    """``"0, 3, 7 and 12 more"``: record indices for a problem message."""
    shown = ", ".join(map(str, indices[:MAX_LISTED]))
    return shown + (f" and {len(indices) - MAX_LISTED} more" if len(indices) > MAX_LISTED else "")
