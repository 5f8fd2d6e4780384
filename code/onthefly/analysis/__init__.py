"""Evaluation and analysis of trained runs.

  probe.py             linear probes on frozen encoder features (probe.json)
  runs.py              reading run folders (config.json, metrics.jsonl, test_metrics.json, ...)
  tb.py                reading TensorBoard scalars of a run
  report.py            grouping runs (methods x seeds) into a markdown table and plots
  benchmark_report.py  statistics, report and figures of the benchmark protocol (experiments/)
  plots.py             the matplotlib figures (Agg backend, files only)

Nothing here is imported by training; matplotlib and tensorboard are imported lazily.
"""
