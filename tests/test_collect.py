"""experiments/collect.py: one row per results.json, override keys as columns, then metrics."""
import csv
import importlib.util
from pathlib import Path

from atom_lab.results import write_results

spec = importlib.util.spec_from_file_location(
    "collect", Path(__file__).resolve().parent.parent / "experiments" / "collect.py")
collect = importlib.util.module_from_spec(spec)
spec.loader.exec_module(collect)


def fake_sweep(root: Path):
    jobs = [(["quant=fp16", "quant.group_size=32"], {"ppl/wikitext2": 10.0}, None),
            (["quant=atom_w4a4", "quant.group_size=32"], {"ppl/wikitext2": 11.25}, None),
            (["quant=atom_w4a4", "quant.group_size=64"], {}, "quant.group_size=64 is not allowed")]
    for num, (overrides, metrics, error) in enumerate(jobs):
        record = {"type": "ConfigError", "message": error, "traceback": "Traceback ..."} if error else None
        write_results(root / f"{num}_{','.join(overrides)}",
                      {"status": "failed" if error else "ok", "overrides": overrides,
                       "metrics": metrics, "error": record})
    (root / "10_extra").mkdir()  # job 10 sorts after job 2, not between 1 and 2
    write_results(root / "10_extra", {"status": "ok", "overrides": ["quant=fp16"],
                                      "metrics": {"zeroshot/avg": 0.5}, "error": None})


def test_rows_columns_and_files(tmp_path):
    fake_sweep(tmp_path)
    md_path, csv_path, markdown = collect.write_tables(tmp_path)
    lines = markdown.strip().splitlines()
    assert lines[0] == ("| run | status | quant | quant.group_size | ppl/wikitext2 | zeroshot/avg "
                        "| error |")
    assert len(lines) == 2 + 4
    assert lines[2].startswith("| 0_") and lines[5].startswith("| 10_extra")
    assert "| 11.2500 |" in lines[3]
    assert "| failed |" in lines[4] and "is not allowed" in lines[4]
    rows = list(csv.DictReader(open(csv_path)))
    assert [r["quant"] for r in rows] == ["fp16", "atom_w4a4", "atom_w4a4", "fp16"]
    assert rows[1]["ppl/wikitext2"] == "11.25" and rows[2]["ppl/wikitext2"] == ""
    assert md_path.read_text() == markdown


def test_cli_errors(tmp_path, capsys):
    assert collect.main([str(tmp_path / "nope")]) == 2
    assert collect.main([str(tmp_path)]) == 2  # no results.json under it
    assert "no results.json" in capsys.readouterr().err


def test_job_order_with_nested_job_dirs(tmp_path):
    # an override value holding '/' (e.g. a path) nests the job dir one level deeper
    for num, quant in ((10, "c"), (2, "b"), (0, "a")):
        write_results(tmp_path / f"{num}_model.path=models" / f"llama,quant={quant}",
                      {"status": "ok", "overrides": [f"quant={quant}"], "metrics": {}})
    _, rows = collect.collect_rows(tmp_path)
    assert [r["quant"] for r in rows] == ["a", "b", "c"]
