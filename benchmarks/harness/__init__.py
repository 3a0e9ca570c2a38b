"""Scaffolding shared by the benchmark scripts of :mod:`benchmarks`.

What lives here is what several scripts do alike and that is not itself measured: describing
the machine, timing phases and repeated calls, probing peak memory, running a measurement in a
fresh process, fitting hyperparameters on the evidence, and writing the reports. The problems
(data, networks, workflows) stay in the scripts.

Modules
-------
* :mod:`~benchmarks.harness.machine`: :func:`cpu_model`, :func:`loadavg`, :func:`machine_info`,
  :func:`machine_summary`, :func:`gemm_rate`;
* :mod:`~benchmarks.harness.timing`: :func:`sync`, :class:`PhaseTimer`, :class:`DeviceClock`,
  :func:`time_calls`, :func:`timed_with_peak`, :func:`timed_route`;
* :mod:`~benchmarks.harness.memory`: :data:`KiB`, :data:`MiB`, :data:`GiB`, :func:`status_kib`,
  :func:`reset_peak_rss`, :class:`PeakRSS`, :class:`PeakMemory`, :func:`peak_memory`,
  :func:`peak_rss_gb`, :func:`available_bytes`;
* :mod:`~benchmarks.harness.processes`: :func:`run_spawned`;
* :mod:`~benchmarks.harness.evidence`: :func:`fit_evidence`;
* :mod:`~benchmarks.harness.report`: :func:`max_rel_err`, :func:`fmt_mib`, :func:`fmt_load`,
  :func:`args_record`, :func:`run_record`, :func:`command_line`, :func:`write_json`, :func:`print_and_save`,
  :func:`start_report`, :func:`finish_report`;
* :mod:`~benchmarks.harness.gram_checks` (``kernel_build.py``, ``cnn_digits.py``):
  :func:`start_gram_run`, :func:`finish_gram_run`, :func:`gram_agreement`, :func:`route_table`,
  :func:`agreement_table`, :func:`add_gram_run_arguments`;
* :mod:`~benchmarks.harness.internals`: the only module that imports ntkgp's internals
  (``ntkgp.ntk``, ``ntkgp.structured``, ``ntkgp.network``, ``ntkgp.precision``). It is
  not imported here: importing this package does not import ntkgp.
"""

from benchmarks.harness.evidence import fit_evidence
from benchmarks.harness.gram_checks import (
    add_gram_run_arguments,
    agreement_table,
    finish_gram_run,
    gram_agreement,
    route_table,
    start_gram_run,
)
from benchmarks.harness.machine import LIBRARIES, cpu_model, gemm_rate, loadavg, machine_info, machine_summary
from benchmarks.harness.memory import (
    GiB,
    KiB,
    MiB,
    PeakMemory,
    PeakRSS,
    available_bytes,
    peak_memory,
    peak_rss_gb,
    reset_peak_rss,
    status_kib,
)
from benchmarks.harness.processes import run_spawned
from benchmarks.harness.report import (
    args_record,
    command_line,
    finish_report,
    fmt_load,
    fmt_mib,
    max_rel_err,
    print_and_save,
    run_record,
    start_report,
    write_json,
)
from benchmarks.harness.timing import DeviceClock, PhaseTimer, sync, time_calls, timed_route, timed_with_peak

__all__ = [
    "LIBRARIES",
    "DeviceClock",
    "GiB",
    "KiB",
    "MiB",
    "PeakMemory",
    "PeakRSS",
    "PhaseTimer",
    "add_gram_run_arguments",
    "agreement_table",
    "args_record",
    "available_bytes",
    "command_line",
    "cpu_model",
    "finish_gram_run",
    "finish_report",
    "fit_evidence",
    "fmt_load",
    "fmt_mib",
    "gemm_rate",
    "gram_agreement",
    "loadavg",
    "machine_info",
    "machine_summary",
    "max_rel_err",
    "peak_memory",
    "peak_rss_gb",
    "print_and_save",
    "reset_peak_rss",
    "route_table",
    "run_record",
    "run_spawned",
    "start_gram_run",
    "start_report",
    "status_kib",
    "sync",
    "time_calls",
    "timed_route",
    "timed_with_peak",
    "write_json",
]
