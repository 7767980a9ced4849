"""The code the benchmarks' entry scripts (``python -m benchmarks.<name>``) run on; they import only from here.

Shared by the entry scripts:

* :mod:`~benchmarks.harness.cli`: paths, exit statuses, common options, one-line stops, child environments;
* :mod:`~benchmarks.harness.procmon` and :mod:`~benchmarks.harness.launch`: monitored child processes (peak
  memory of the process tree) and why one failed, in one line;
* :mod:`~benchmarks.harness.workload`, :mod:`~benchmarks.harness.models` and :mod:`~benchmarks.harness.files`:
  what is trained, as each side's config, and the YAML and JSON files written;
* :mod:`~benchmarks.harness.ours`, :mod:`~benchmarks.harness.sides` and :mod:`~benchmarks.harness.results`:
  the sides (ours, upstream, a single model) and what each gave, verified;
* :mod:`~benchmarks.harness.manifest`: what a run of ours records in its ``manifest.json`` (stage times);
* :mod:`~benchmarks.harness.contenders`: exported artifacts and the monitored children that time them;
* :mod:`~benchmarks.harness.backbones`: offline backbones at their real sizes (seeded-weight cache entries);
* :mod:`~benchmarks.harness.datasets`: deterministic MVTec AD subsets and the synthetic set;
* :mod:`~benchmarks.harness.machine` and :mod:`~benchmarks.harness.markdown`: machine facts, number formats
  and the ``results.md`` + ``results.json`` pair.

One benchmark's own modules: :mod:`~benchmarks.harness.comparison` and
:mod:`~benchmarks.harness.comparison_report` (``compare_upstream``), :mod:`~benchmarks.harness.accuracy_data`
and :mod:`~benchmarks.harness.accuracy_report` (``accuracy``).
"""
