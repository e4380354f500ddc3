"""Grouping run summaries over seeds, their statistics, and the report's Markdown table.

Summaries (or :func:`report_runs.run_info` dicts) are grouped by a :class:`GroupKey`
(dataset, model, method, target sparsity and the config without seeds), aggregated into
means and sample standard deviations over seeds, and written as one Markdown table row
per group.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
import json
import statistics
from typing import Any, NamedTuple

from experiments.report_runs import DENSE, Run, run_info


class GroupKey(NamedTuple):
  """What runs aggregated over seeds share: their label, and their config without seeds."""
  dataset: str
  model: str
  method: str
  target_sparsity: float | None
  config: str = ""  # canonical JSON of records.group_config; "" when unknown


# Grouping and aggregating.


def group_key(summary: Mapping[str, Any]) -> GroupKey:
  """The group of a summary (or :func:`run_info`) dict: dataset, model, method, target.

  A ``variant`` (e.g. DST's ``"alpha=0.0005"``, which stands in for a target sparsity)
  is part of the method's name: ``"dst (alpha=0.0005)"``. Summaries with a ``group``
  (the config without seeds) are grouped only with summaries of an equal one.
  """
  method = str(summary.get("method") or "unknown")
  if summary.get("variant"):
    method = f"{method} ({summary['variant']})"
  target = summary.get("target_sparsity")
  group = summary.get("group")
  return GroupKey(str(summary.get("dataset") or "-"), str(summary.get("model") or "-"), method,
                  None if method == DENSE or target is None else round(float(target), 6),
                  "" if group is None else json.dumps(group, sort_keys=True))


def sort_key(key: GroupKey) -> tuple[Any, ...]:
  """Dataset, model, dense first, method name, then target sparsity (none first)."""
  target = key.target_sparsity
  return (key.dataset, key.model, key.method != DENSE, key.method, target is not None,
          target or 0.0, key.config)


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
  """``{"optimizer.learning_rate": 0.1, ...}`` of a nested dict."""
  if not isinstance(tree, Mapping):
    return {prefix: tree}
  out: dict[str, Any] = {}
  for key, value in tree.items():
    out.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
  return out


def method_labels(keys: Iterable[GroupKey]) -> dict[GroupKey, str]:
  """Each group's method name, followed by the config values that tell apart groups of
  the same dataset, model, method and target, e.g. ``"rigl (num_epochs=2)"``."""
  keys = list(keys)
  same: dict[GroupKey, list[GroupKey]] = {}
  for key in keys:
    same.setdefault(key._replace(config=""), []).append(key)
  labels = {}
  for members in same.values():
    flats = [_flat(json.loads(key.config)) if key.config else {} for key in members]
    names = sorted({name for flat in flats for name in flat})
    differing = [name for name in names if len({json.dumps(f.get(name)) for f in flats}) > 1]
    for key, flat in zip(members, flats):
      values = ", ".join(f"{name}={json.dumps(flat.get(name))}" for name in differing)
      labels[key] = f"{key.method} ({values})" if values else key.method
  return labels


def _mean(values: Iterable[Any]) -> float | None:
  numbers = [float(value) for value in values if value is not None]
  return statistics.fmean(numbers) if numbers else None


def _stdev(values: Iterable[Any]) -> float | None:
  """The sample standard deviation (ddof=1); None for fewer than two values."""
  numbers = [float(value) for value in values if value is not None]
  return statistics.stdev(numbers) if len(numbers) > 1 else None


def aggregate(summaries: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """Groups summaries by :func:`group_key` and averages them over seeds.

  Args:
    summaries: ``summary.json`` dicts (or in-memory summaries of the training runner).

  Returns:
    One dict per group, sorted by :func:`sort_key`: ``key`` (a :class:`GroupKey`), ``n``
    (the number of summaries), ``seeds``, the means ``sparsity``, ``test_accuracy``,
    ``train_flops_ratio``, ``inference_flops_ratio`` and ``coverage`` (None where no
    summary has a value) and ``test_accuracy_std`` (sample std, None for one value).
  """
  groups: dict[GroupKey, list[Mapping[str, Any]]] = {}
  for summary in summaries:
    groups.setdefault(group_key(summary), []).append(summary)
  rows = []
  for key in sorted(groups, key=sort_key):
    members = groups[key]
    row: dict[str, Any] = {"key": key, "n": len(members),
                           "seeds": [member.get("seed") for member in members]}
    for name in ("sparsity", "test_accuracy", "train_flops_ratio", "inference_flops_ratio",
                 "coverage"):
      row[name] = _mean(member.get(name) for member in members)
    row["test_accuracy_std"] = _stdev(member.get("test_accuracy") for member in members)
    rows.append(row)
  return rows


def group_runs(runs: Sequence[Run]) -> dict[GroupKey, list[Run]]:
  """The runs by group, groups sorted by :func:`sort_key`; finished runs first, then by seed."""
  groups: dict[GroupKey, list[Run]] = {}
  for run in runs:
    groups.setdefault(group_key(run_info(run)), []).append(run)

  def order(run: Run) -> tuple[Any, ...]:
    seed = run_info(run)["seed"]
    return (not run.finished, seed is None, seed if isinstance(seed, (int, float)) else 0,
            str(run.path))

  return {key: sorted(groups[key], key=order) for key in sorted(groups, key=sort_key)}


# The table.


def _number(value: float | None, spec: str) -> str:
  return "-" if value is None else format(value, spec)


def accuracy_cell(mean: float | None, std: float | None) -> str:
  """``"92.00 ± 2.00"`` (in %), just the mean without a std, ``"-"`` without a mean."""
  if mean is None:
    return "-"
  return f"{100.0 * mean:.2f}" if std is None else f"{100.0 * mean:.2f} ± {100.0 * std:.2f}"


def markdown_table(summaries: Sequence[Mapping[str, Any]]) -> str:
  """A Markdown table of the summaries, one row per group aggregated over seeds.

  Args:
    summaries: dicts with the keys of ``summary.json`` (method, dataset, model, seed,
      target_sparsity, sparsity, test_accuracy, train_flops_ratio, inference_flops_ratio,
      coverage); missing or null values show as "-".

  Returns:
    The table: method, model, dataset (only when there are several), mean measured
    sparsity, test accuracy in % as ``mean ± std`` over seeds (sample std), the number
    of seeds ``n``, mean FLOPs ratios (sparse / dense) and mean coverage.
  """
  rows = aggregate(summaries)
  labels = method_labels(row["key"] for row in rows)
  with_dataset = len({row["key"].dataset for row in rows}) > 1
  names = ["method", "model", *(["dataset"] if with_dataset else []), "sparsity",
           "test accuracy (%)", "n", "train FLOPs (× dense)", "inference FLOPs (× dense)",
           "coverage"]
  lines = ["| " + " | ".join(names) + " |",
           "|" + "|".join("---" if name in ("method", "model", "dataset") else "---:"
                          for name in names) + "|"]
  for row in rows:
    key = row["key"]
    cells = [labels[key], key.model, *([key.dataset] if with_dataset else []),
             _number(row["sparsity"], ".3f"),
             accuracy_cell(row["test_accuracy"], row["test_accuracy_std"]), str(row["n"]),
             _number(row["train_flops_ratio"], "#.3g"),
             _number(row["inference_flops_ratio"], "#.3g"), _number(row["coverage"], ".3f")]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)
