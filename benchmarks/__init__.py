"""Benchmarks of ntkgp, most of them against laplace-torch; results and commands in ``benchmarks/RESULTS.md``.

Scripts
-------
* ``regression_workflow``: the exact linearized-Laplace regression workflow (build, log evidence,
  predictive) on Friedman-1, ntkgp versus laplace-torch's ``FunctionalLaplace``, one fresh process
  per measurement;
* ``approximate_regression``: ntkgp's approximate solvers (inducing points, subset of data, subset
  of regressors, Lanczos, CG) against the exact GP and laplace-torch's ``FunctionalLaplace`` and
  ``ELLA``, then large N;
* ``approximate_digits``: the inducing-point Laplace GP against the exact one, digits classification;
* ``cuda_workflow``: the exact and inducing regression workflows on a GPU, with the device's GEMM rates;
* ``kernel_build``: the NTK Gram of an MLP alone, structured versus generic Jacobian contraction,
  with GEMM efficiency;
* ``cnn_digits``: the same for a small CNN on 8x8 digits;
* ``subset_bound``: the subset-NTK lower bound on the Laplace log evidence against the exact evidence;
* ``online_marglik_digits``: online marginal-likelihood training against a weight-decay grid search;
* ``online_marglik_seeds``: that comparison over several seeds;
* ``online_marglik_diabetes``: online marglik on diabetes regression against the post-hoc evidence optimum.

Each script's docstring describes its setup, what it measures and its options (``--help``).

Running
-------
From the repository root, either as a module of this package or as a file::

    .venv/bin/python -m benchmarks.kernel_build --n 500 --generic-repeats 1
    .venv/bin/python benchmarks/kernel_build.py --n 500 --generic-repeats 1

Run as a file, a script first puts the repository root on ``sys.path`` (its two lines
``if __package__ in (None, ""): ...`` before it imports ``benchmarks`` and ``ntkgp``), so
``benchmarks.harness`` and the ntkgp of this checkout are importable either way. Processes the
scripts start with ``multiprocessing``'s "spawn" inherit that ``sys.path``.

Shared code
-----------
:mod:`benchmarks.harness` holds the scaffolding the scripts share (machine description, timing,
memory probes, fresh processes, evidence fits, reports); :mod:`benchmarks.harness.internals` is
the one module that imports ntkgp's internals.
"""
