import pytest

from idml.evaluation import format_metrics_table


def test_table_renders_percentages_and_counts():
    table = format_metrics_table(
        {
            "baseline": {"recall@1": 0.5234, "map@r": 0.2, "num_queries": 120},
            "idml": {"recall@1": 0.61, "map@r": float("nan")},
        }
    )
    lines = table.splitlines()
    assert lines[0].split() == ["run", "recall@1", "map@r", "num_queries"]
    assert set(lines[1]) <= {"-", " "}
    assert lines[2].split() == ["baseline", "52.3", "20.0", "120"]
    assert lines[3].split() == ["idml", "61.0", "nan", "-"]
    assert len({len(line) for line in lines[:3]}) == 1  # aligned columns


def test_table_metric_selection_and_validation():
    table = format_metrics_table({"r": {"a": 0.1, "b": 0.2}}, metrics=["b"])
    assert table.splitlines()[2].split() == ["r", "20.0"]
    with pytest.raises(ValueError, match="empty"):
        format_metrics_table({})
