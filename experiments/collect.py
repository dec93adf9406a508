"""Turn a run or sweep directory into one table: a row per results.json, the override keys as
columns, then the metrics.

    python experiments/collect.py outputs/multirun/2025-01-01/12-00-00 [--out table]

writes <out>.md (Markdown) and <out>.csv (default: <sweep dir>/results.{md,csv}) and prints the
Markdown. Failed jobs keep their row with status `failed` and the error in the `error` column.
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from atom_lab.results import find_results, load_results  # noqa: E402

FIXED_COLUMNS = ("run", "status")
NOT_EXPERIMENT_KEYS = ("progress", "debug", "data.root", "hydra", "logger")  # not table columns


def override_columns(overrides: list[str]) -> dict[str, str]:
    """['quant=fp16', 'quant.group_size=32'] -> {'quant': 'fp16', 'quant.group_size': '32'}."""
    columns = {}
    for item in overrides:
        key, _, value = item.partition("=")
        key = key.lstrip("+~")
        if not key.startswith(NOT_EXPERIMENT_KEYS):
            columns[key] = value
    return columns


def collect_rows(sweep_dir: Path) -> tuple[list[str], list[dict]]:
    """-> (column names, one dict per run) for every results.json under `sweep_dir`."""
    rows, override_keys, metric_keys = [], {}, {}
    for path in find_results(sweep_dir):
        results = load_results(path)
        overrides = override_columns(results.get("overrides", []))
        row = {"run": str(path.parent.relative_to(sweep_dir)) or ".",
               "status": results.get("status", "?"), **overrides, **results.get("metrics", {})}
        if results.get("error"):
            row["error"] = results["error"]["message"].splitlines()[0][:120]
        override_keys.update(dict.fromkeys(overrides))
        metric_keys.update(dict.fromkeys(results.get("metrics", {})))
        rows.append(row)
    extra = ["error"] if any("error" in r for r in rows) else []
    return [*FIXED_COLUMNS, *override_keys, *sorted(metric_keys), *extra], rows


def format_value(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def markdown_table(columns: list[str], rows: list[dict]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [format_value(row.get(c)).replace("|", "\\|") for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_tables(sweep_dir: Path, out: Path | None = None) -> tuple[Path, Path, str]:
    sweep_dir = Path(sweep_dir)
    columns, rows = collect_rows(sweep_dir)
    if not rows:
        raise FileNotFoundError(f"no results.json under {sweep_dir}")
    out = Path(out) if out else sweep_dir / "results"
    markdown = markdown_table(columns, rows)
    md_path, csv_path = out.with_suffix(".md"), out.with_suffix(".csv")
    md_path.write_text(markdown)
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return md_path, csv_path, markdown


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path, help="a Hydra run or multirun directory")
    parser.add_argument("--out", type=Path, default=None,
                        help="output path without suffix (default: <sweep_dir>/results)")
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        print(f"error: {args.sweep_dir} is not a directory", file=sys.stderr)
        return 2
    try:
        md_path, csv_path, markdown = write_tables(args.sweep_dir, args.out)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(markdown, end="")
    print(f"\nwrote {md_path} and {csv_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
