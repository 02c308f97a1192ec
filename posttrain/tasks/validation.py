"""Great Expectations over a task's records: a failed expectation is a DataError naming file:line."""

from __future__ import annotations

from posttrain.io import DataError


def line_numbers(records: list[dict]) -> list[int]:
    """The file line of each record: read_jsonl keeps them (it skips blank lines); records without them
    (a hub split) are reported as line i + 1."""
    lines = getattr(records, "line_numbers", None)
    return list(lines) if lines and len(lines) == len(records) else [i + 1 for i in range(len(records))]


def run_suite(frame, name: str, label: str, expectations: list, describe=None) -> dict:
    """Validate `frame` (which has a `line` column) against `expectations`; return the report, or raise
    DataError for the first failure: `label:line: failed <expectation> on '<column>' (n records, lines [...])`.
    `describe(column)` may name a helper column in words."""
    import great_expectations as gx

    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)  # its "Calculating Metrics" bars
    suite = gx.ExpectationSuite(name=f"{name}:{label}")
    for expectation in expectations:
        suite.add_expectation(expectation)
    batch = (
        context.data_sources.add_pandas(name)
        .add_dataframe_asset(name="records")
        .add_batch_definition_whole_dataframe("all")
        .get_batch(batch_parameters={"dataframe": frame})
    )
    result = batch.validate(
        suite, result_format={"result_format": "COMPLETE", "unexpected_index_column_names": ["line"]}
    )
    report = {"source": label, "records": len(frame), "success": bool(result.success), "expectations": []}
    first_failure = None
    for item in result.results:
        config = item.expectation_config
        # pandas hands back numpy integers: plain ints, so messages and the report say 8, not np.int64(8)
        lines = [int(row["line"]) for row in (item.result.get("unexpected_index_list") or [])]
        entry = {
            "expectation": config.type,
            "column": config.kwargs.get("column"),
            "success": bool(item.success),
            "unexpected_count": int(item.result.get("unexpected_count") or 0),
            "first_lines": lines[:10],
        }
        report["expectations"].append(entry)
        if not item.success and first_failure is None:
            first_failure = entry
    if first_failure is not None:
        line = first_failure["first_lines"][0] if first_failure["first_lines"] else "?"
        what = (describe or (lambda column: column))(first_failure["column"])
        raise DataError(
            f"{label}:{line}: failed {first_failure['expectation']} on '{what}' "
            f"({first_failure['unexpected_count']} records, lines {first_failure['first_lines']})"
        )
    return report
