"""The published numbers against their records. records/ holds the metrics.json behind each number
(made small by runs.record, written by `python sweep.py --summarize RUN... --records DIR`). Every row
of a results table in README.md, RESULTS.md and docs/ that cites a record is read: each number in
its result columns must be a value of that record, as printed (rounded to the digits shown, a
percentage from a fraction; record_values says which of its numbers count, and a quoted anchor
never does). A row of a table with a record column cites one or says "no record".
Changing a number in a document, or in a record, fails here."""
import json
import math
import re
import statistics
from pathlib import Path

import pytest

import runs
import sweep

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", ROOT / "RESULTS.md", *sorted((ROOT / "docs").glob("*.md"))]
RECORDS = sorted((ROOT / "records").rglob("*.json"))
RECORD = re.compile(r"records/[\w./-]+?\.json")
# the columns whose numbers are results (not anchors, commands, machines or times)
RESULT_COLUMN = re.compile(r"^(ours|test −ELBO|= recon \+ KL|test NLL|test −log p|bits/dim|samples (judged right|that are)|"
                           r"active units|best epoch|mean AUROC|AUROC|VAE |per seed|−log p\(x_h|nats|bits|"
                           r"z ~ |reconstructions|a z read|encode|decode|median epoch|ratio to|s / epoch|page size|self-test|`#z=`|"
                           r"float16 error|seconds$|\d+( quadrants?( given)?)?$)", re.I)
NUMBER = re.compile(r"(?<![\w.,−-])(\d{1,3}(?:,\d{3})+|\d+(?:\.\d+)?(?:e[-+]?\d+)?)(%?)(?![\w.]|,\d)")   # 10,000 is one number; 1.4e-07 too


def tables(text):
    """(header cells, [row cells...]) of every markdown table in text."""
    lines = text.splitlines()
    for i in range(len(lines) - 1):
        if lines[i].startswith("|") and re.fullmatch(r"\|( *:?-+:? *\|)+", lines[i + 1].strip()) and \
                (i == 0 or not lines[i - 1].startswith("|")):
            rows = []
            for line in lines[i + 2:]:
                if not line.startswith("|"):
                    break
                rows.append(cells(line))
            yield cells(lines[i]), rows


def cells(line):
    return [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]


# a benchmark's raw timings, of which a table prints the median: a median typed as one of them fails
RAW_SAMPLES = ("seconds", "all")


def record_values(path):
    """Every number a run's record holds but its provenance, its per-epoch rows, the raw timings of
    RAW_SAMPLES and the published numbers a report quotes beside its own (runs.ANCHORS): its report,
    settings and configuration.
    For a summary: its means, standard deviations and values, and of each seed record it names the
    results (runs.end_metrics_of) and the configuration (the 50 of "24 / 50 active units")."""
    data = runs.read_json(path)
    skip = ("provenance", "epochs", "earlier_provenance", *runs.ANCHORS)
    found = []

    def walk(x):
        if isinstance(x, dict):
            for k, v in x.items():
                if not (k in RAW_SAMPLES and isinstance(v, list)):
                    walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)
        elif isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x):
            found.append(x)
    if path.name != "summary.json":
        walk({k: v for k, v in data.items() if k not in skip})
        return found
    walk([[s["mean"], s["std"], s["values"]] for s in data["metrics"].values()])
    for seed in (runs.read_json(path.parent / name) for name in data["runs"]):
        walk([list(runs.end_metrics_of(seed).values()), seed.get("config", {})])
    return found


def printed_as(value, digits, percent, style="f"):
    return f"{value * (100 if percent else 1):.{digits}{style}}"


def backed(token, percent, values):
    if "e" in token:                                    # 1.4e-07 or 1.4e-7: f"{v:.1e}", however written
        mantissa = token.split("e")[0]
        digits = len(mantissa.split(".")[1]) if "." in mantissa else 0
        return any(float(printed_as(v, digits, percent, "e")) == float(token) for v in values)
    digits = len(token.split(".")[1]) if "." in token else 0
    return any(printed_as(v, digits, percent) == token for v in values) or \
        (not percent and any(printed_as(v, digits, True) == token for v in values if 0 <= v <= 1))


def cited_rows():
    """(document, row text, record paths, [(column, number, is a percentage)]) of every table row
    that cites a record."""
    for doc in DOCS:
        for header, rows in tables(doc.read_text(encoding="utf-8")):
            if header[0] == "record":                   # the machines table, checked whole below
                continue
            for row in rows:
                paths = sorted(set(RECORD.findall(" ".join(row))))
                if not paths:
                    continue
                numbers = [(name, m.group(1).replace(",", ""), bool(m.group(2)))
                           for name, cell in zip(header, row) if RESULT_COLUMN.match(name)
                           for m in NUMBER.finditer(re.sub(r"\(.*?\)|`.*?`|records/\S+", "", cell))]
                timing = " ".join(c for name, c in zip(header, row) if re.search(r"time|machine", name, re.I))
                yield doc.name, " | ".join(row)[:80], paths, numbers, timing


ROWS = list(cited_rows())


def test_the_documents_cite_records():
    assert len(ROWS) >= 8 and len(RECORDS) >= 8 and len(TIMED) >= 4


@pytest.mark.parametrize("doc, row, paths, numbers, timing", ROWS, ids=[f"{d}: {r[:40]}" for d, r, *_ in ROWS])
def test_each_number_of_a_row_is_a_value_of_its_records(doc, row, paths, numbers, timing):
    for path in paths:
        assert (ROOT / path).is_file(), f"{doc}: {path} does not exist"
    values = [v for path in paths for v in record_values(ROOT / path)]
    assert numbers, f"{doc}: the row '{row}' cites a record but shows no result"
    wrong = [(column, token + ("%" if pct else "")) for column, token, pct in numbers if not backed(token, pct, values)]
    assert not wrong, f"{doc}: '{row}': {wrong} are not values of {', '.join(paths)}"


def test_a_table_with_a_record_column_cites_one_in_every_row():
    for doc in DOCS:
        for header, rows in tables(doc.read_text(encoding="utf-8")):
            if not any(re.search(r"\brecord\b", h, re.I) for h in header):
                continue
            for row in rows:
                text = " ".join(row)
                assert RECORD.search(text) or "no record" in text, f"{doc.name}: '{text[:80]}' cites no record"


@pytest.mark.parametrize("path", [p for p in RECORDS if p.name == "summary.json"],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_a_summary_is_the_mean_and_sample_std_of_its_seed_records(path):
    """A second computation of each summary from the seed records beside it: a changed value in
    either fails."""
    summary = runs.read_json(path)
    seeds = [runs.read_json(path.parent / name) for name in summary["runs"]]
    ends = [runs.end_metrics_of(s) for s in seeds]
    assert summary["metrics"]
    for name, s in summary["metrics"].items():
        values = [e[name] for e in ends if name in e]
        assert s["values"] == values and s["n"] == len(values)
        assert s["mean"] == pytest.approx(statistics.fmean(values), rel=1e-12)
        assert s["std"] == (pytest.approx(statistics.stdev(values), rel=1e-12) if len(values) > 1 else None)


@pytest.mark.parametrize("path", RECORDS, ids=lambda p: str(p.relative_to(ROOT)))
def test_a_record_holds_its_provenance_and_no_machine_path(path):
    data = runs.read_json(path)
    if path.name != "summary.json":
        p = data["provenance"]
        assert p["torch"] and p["device"] and p["argv"] and p["started_utc"] and p["wall_seconds"] > 0
        assert len(p["commit"]) == 40 and p["dirty"] is False, f"{path}: run from a tree with uncommitted changes"
    else:
        assert all("/" not in name for name in data["runs"])


def seed_records(paths):
    """The run records among paths, and those a cited summary names."""
    out = []
    for path in paths:
        data = runs.read_json(ROOT / path)
        out += [(ROOT / path).parent / n for n in data["runs"]] if Path(path).name == "summary.json" else [ROOT / path]
    return out


TIME = re.compile(r"(\d+(?:\.\d+)?) (min|s)\b")


TIMED = [r for r in ROWS if r[4]]


@pytest.mark.parametrize("doc, row, paths, numbers, timing", TIMED, ids=[f"{d}: {r[:40]}" for d, r, *_ in TIMED])
def test_a_rows_machine_and_time_are_its_records_provenance(doc, row, paths, numbers, timing):
    """In a table with a time or machine column, the CPU a row names is its records' device_name,
    and each time it gives ("90.5 min", or "63 s to 3.4 min" over seeds) is a wall time of one of
    them (all its processes, if resumed), as sweep.minutes prints it."""
    records = [runs.read_json(p) for p in seed_records(paths)]
    assert any(r["provenance"]["device_name"] in timing for r in records), f"{doc}: '{row}' names no CPU of its records"
    walls = [sweep.minutes(runs.run_seconds(r)[0]) for r in records]
    times = [f"{m.group(1)} {m.group(2)}" for m in TIME.finditer(timing)]
    assert times, f"{doc}: '{row}' gives no run time"
    assert set(times) <= set(walls), f"{doc}: '{row}': {times} are not among the records' wall times {walls}"


def test_results_md_lists_the_machines_of_its_records_as_they_recorded_them():
    """RESULTS.md's table of the records' machines is python sweep.py --records-table's output."""
    text = (ROOT / "RESULTS.md").read_text(encoding="utf-8")
    shipped = [p for p in RECORDS if p.name != "summary.json"]
    table = sweep.records_table([p.relative_to(ROOT) for p in shipped], root=ROOT)
    assert table in text, "RESULTS.md: rebuild the table with python sweep.py --records-table records/*/*.json"


def test_an_anchor_quoted_in_a_record_backs_no_number(tmp_path):
    """A report quotes Deep SVDD's 94.8 beside its own 86.43: only the 86.43 is the record's; as a
    seed of a summary, the same."""
    quoted = {"provenance": {}, "config": {"latent_dim": 50}, "final": {"test_nll": 86.43},
              "deep_svdd_per_digit": {"0": 94.8}, "anchor_means": {"DCAE": 89.7}}
    (tmp_path / "seed1.json").write_text(json.dumps(quoted))
    (tmp_path / "summary.json").write_text(json.dumps({"runs": ["seed1.json"], "metrics": {
        "test_nll": {"mean": 86.43, "std": None, "n": 1, "values": [86.43], "runs": ["seed1.json"]}}}))
    for path in (tmp_path / "seed1.json", tmp_path / "summary.json"):
        values = record_values(path)
        assert backed("86.43", False, values) and backed("50", False, values)
        assert not backed("94.8", False, values) and not backed("89.7", False, values)


def test_the_check_catches_a_changed_number(tmp_path):
    """A fake row and record: the matcher accepts the printed rounding, and refuses one digit off."""
    values = [86.1749, 0.9782, 22, 0.19]
    assert backed("86.17", False, values) and backed("97.8", True, values) and backed("22", False, values)
    assert backed("0.19", False, values) and backed("97.8", False, values)        # 97.8 of "97.8% ± 0.5"
    assert backed("1.4e-07", False, [1.4e-7]) and backed("1.4e-7", False, [1.4e-7]) and backed("5e-3", False, [0.0051])
    assert not backed("1.5e-07", False, [1.4e-7]) and not backed("1.4e-6", False, [1.4e-7])
    assert [m.group(1) for m in NUMBER.finditer("pass 1.4e-07, 2.59 MB")] == ["1.4e-07", "2.59"]
    raw = {"loops": {"a": {"seconds": [9.116, 9.13], "median_seconds": 9.13}}, "provenance": {}}
    (tmp_path / "run.json").write_text(json.dumps(raw))
    assert backed("9.13", False, record_values(tmp_path / "run.json"))
    assert not backed("9.12", False, record_values(tmp_path / "run.json"))
    assert not backed("86.18", False, values) and not backed("97.9", True, values) and not backed("23", False, values)
    header, rows = next(tables("| model | ours | record |\n| --- | --- | --- |\n| VAE | **86.18 ± 0.19** | x |\n"))
    assert [m.group(1) for m in NUMBER.finditer(rows[0][1])] == ["86.18", "0.19"]
    assert [m.group(1) for m in NUMBER.finditer("10,000 digits, K = 1000, 60.25 / 42.73")] == ["10,000", "1000", "60.25", "42.73"]


def test_a_resumed_runs_time_is_the_sum_of_its_processes():
    record = {"provenance": {"wall_seconds": 60.0}, "earlier_provenance": [{"wall_seconds": 5400.0}, {"wall_seconds": 30.5}]}
    assert runs.run_seconds(record) == (5490.5, 3) and sweep.minutes(5490.5) == "91.5 min"
    assert runs.run_seconds({"provenance": {"wall_seconds": 119.4}}) == (119.4, 1) and sweep.minutes(119.4) == "119 s"
