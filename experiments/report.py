r"""Summarizes training run directories: a Markdown table over seeds and PNG plots.

  python -m experiments.report DIR [DIR ...] [--out=OUTDIR]

Each DIR is a run directory (it holds ``config.json`` or ``metrics.jsonl``, as written
by the training runner) or a directory searched recursively for run directories (the
search does not descend into a run directory). Runs are grouped by (dataset, model,
method, target sparsity) and aggregated over seeds.

Only finished runs (with ``summary.json``) enter the table and the accuracy plot; an
unfinished run is named on stderr, and its curves (loss, density) are still plotted
from its ``metrics.jsonl``, labelled "unfinished". A run that failed (its summary's
``status`` is not "finished", e.g. a diverged loss) is left out the same way and
listed, with where and why it failed, on stderr and under the table in ``report.md``.

The table is printed and written to ``OUTDIR/report.md``, next to the plots
``accuracy_vs_sparsity.png``, ``accuracy_vs_coverage.png`` (runs with a coverage),
``loss_<group>.png`` (every group) and
``density_<group>.png`` (sparse groups). OUTDIR defaults to ``DIR/report`` for a
single DIR and to ``./report`` for several. It is created if needed; only these files
are (over)written, nothing is deleted. A DIR that does not exist or holds no run, or
an unreadable JSON file, prints one line ``error: ...`` and exits with status 2; an
OUTDIR that cannot be written exits with status 1.
"""

from __future__ import annotations

from collections.abc import Sequence
import os
from pathlib import Path
import sys

from absl import app, flags

from experiments.cli import fail, flag_error_line
from sparsejax import extras

try:
  from experiments.report_plots import write_plots
  from experiments.report_runs import ReportError, find_runs, load_run, run_summary
  from experiments.report_tables import markdown_table
except ImportError as e:  # the report's packages come with sparsejax[experiments]
  fail(str(e), 1)

REPORT_FILE = "report.md"
DEFAULT_OUT = "report"
INPUT_ERROR = 2
OUTPUT_ERROR = 1


def default_out(paths: Sequence[str | os.PathLike[str]]) -> Path:
  """``DIR/report`` for a single DIR, else ``./report``."""
  return Path(paths[0]) / DEFAULT_OUT if len(paths) == 1 else Path(DEFAULT_OUT)


def write_report(table: str, out: Path) -> Path:
  """Writes ``out/report.md`` (through a temporary file) and returns its path."""
  path = out / REPORT_FILE
  temporary = path.with_name(path.name + ".tmp")
  temporary.write_text(table + "\n")
  temporary.replace(path)
  return path


def define_flags() -> None:
  """Defines ``--out``; called only by the command line, so importing this module adds no flag."""
  flags.DEFINE_string("out", None, "Output directory (default: DIR/report for a single DIR, "
                      "else ./report).")


def parse_flags(argv: list[str]) -> list[str]:
  """Parses the flags like ``app.run``, but reports an error as one line, with status 2."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    fail(flag_error_line(e), INPUT_ERROR)


def main(argv: Sequence[str]) -> None:
  paths = list(argv[1:])
  if not paths:
    fail("give at least one run directory: python -m experiments.report DIR [DIR ...]",
          INPUT_ERROR)
  try:
    extras.require(extras.REPORT, "python -m experiments.report")
  except ImportError as e:
    fail(str(e), OUTPUT_ERROR)
  try:
    runs = [load_run(path) for path in find_runs(paths)]
  except ReportError as e:
    fail(str(e), INPUT_ERROR)
  left_out = [(run, f"{run.left_out()}, left out of the table: {run.path}")
              for run in runs if not run.finished]
  for _, line in left_out:
    print(line, file=sys.stderr)
  summaries = [run_summary(run) for run in runs if run.finished]
  if not summaries:
    print("no finished run: the table is empty", file=sys.stderr)
  table = markdown_table(summaries)
  print(table, flush=True)
  failed = [line for run, line in left_out if run.summary is not None]
  if failed:
    table += "\n\nFailed runs:\n\n" + "\n".join(f"- {line}" for line in failed)
  out_flag = flags.FLAGS["out"].value if "out" in flags.FLAGS else None
  out = Path(out_flag) if out_flag else default_out(paths)
  try:
    out.mkdir(parents=True, exist_ok=True)
    write_report(table, out)
    written = write_plots(runs, out)
  except OSError as e:
    fail(f"--out: {e}", OUTPUT_ERROR)
  print(f"wrote {out / REPORT_FILE} and {len(written)} plots in {out}", file=sys.stderr)

if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=parse_flags)
