"""Evaluation and analysis of trained runs.

  probe.py             linear probes on frozen encoder features (probe.json)
  runs.py              reading run folders (config.json, metrics.jsonl, test_metrics.json, ...)
  tb.py                reading TensorBoard scalars of a run
  report.py            grouping runs (methods x seeds) into a markdown table and plots
  benchmark_report.py  statistics, report and figures of the benchmark protocol (experiments/)
  plots.py             the matplotlib figures (Agg backend, files only)
  stats.py             paired t-interval, exact sign-flip test, Holm, bootstrap (small-n statistics)
  tables.py            means, stds and markdown tables shared by report.py and benchmark_report.py

Nothing here is imported by training; matplotlib and tensorboard are imported lazily.
"""
