"""Peak-memory probe of the approximate routes (issue 5): no N x P Jacobian, no N x N matrix.

Each route runs in a fresh subprocess on N = 8,000 points of a network with P = 17,793
parameters, a 32 MiB Jacobian budget and chunks of 500 examples. The probe resets the kernel's peak-RSS counter
(``/proc/self/clear_refs``) after setup and reads ``VmHWM`` after the evidence and 500
predictions. An N x P float32 Jacobian would add 570 MB and an N x N float64 matrix 512 MB;
the allowance is 200 MB (the chunk's per-example Jacobian and its vmap intermediates are
36 MB each, the rest a few MB).
"""

from __future__ import annotations

import textwrap

import pytest
from rss_probe import needs_clear_refs, probe

SCRIPT = textwrap.dedent(
    """
    import re, sys, warnings, torch, gpytorch, ntkgp
    warnings.simplefilter("ignore")  # CG may stop at max_iterations: only memory is measured here
    from ntkgp.solvers import ConjugateGradients, Inducing, Lanczos
    torch.manual_seed(0)
    n = 8_000
    x = torch.randn(n + 500, 8)
    y = torch.sin(x[:, 0]) + 0.1 * torch.randn(n + 500)
    net = torch.nn.Sequential(torch.nn.Linear(8, 128), torch.nn.Tanh(), torch.nn.Linear(128, 128), torch.nn.Tanh(),
                              torch.nn.Linear(128, 1)).eval()
    lik = gpytorch.likelihoods.GaussianLikelihood()
    lik.noise = 0.05
    spec = {"inducing": Inducing(200, selection="random"), "lanczos": Lanczos(rank=40),
            "cg": ConjugateGradients(num_probes=4, preconditioner_rank=50, variance_rank=40, tolerance=1e-4,
                                    max_iterations=40)}
    model = ntkgp.LinearizedGP(net, lik, x[:n], y[:n], prior_precision=1.0, solver=spec[sys.argv[1]],
                               memory_budget=2**25, chunk_size=500)
    def rss(key):
        return int(re.search(key + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024
    open("/proc/self/clear_refs", "w").write("5")
    base = rss("VmRSS")
    model.log_evidence()
    model.eval(); lik.eval()
    with torch.no_grad():
        lik(model(x[n:])).variance
    print(rss("VmHWM") - base)
    """
)


@needs_clear_refs
@pytest.mark.parametrize("route", ["inducing", "lanczos", "cg"])
def test_approximate_routes_stay_within_memory(route: str) -> None:
    peak = int(probe(SCRIPT, route, threads=2))
    assert peak < 200 * 2**20, f"{route}: peak memory grew by {peak / 2**20:.0f} MiB"


BOUND_SCRIPT = textwrap.dedent(
    """
    import re, sys, torch, gpytorch, ntkgp
    from ntkgp.memory import KERNEL_SPACE_MATRICES, WEIGHT_SPACE_MATRICES
    space, groups = sys.argv[1], int(sys.argv[2])
    torch.manual_seed(0)
    n = 2500 if space == "kernel" else 3000
    x = torch.randn(n, 8, dtype=torch.float64)
    width = 16 if space == "kernel" else 44  # M x M and P x P float64 (M = 2500, P = 2421) above 32 MiB
    net = torch.nn.Sequential(torch.nn.Linear(8, width), torch.nn.Tanh(), torch.nn.Linear(width, width),
                              torch.nn.Tanh(), torch.nn.Linear(width, 1)).double().eval()
    lik = gpytorch.likelihoods.GaussianLikelihood().double()
    prior = 1.0 if groups == 1 else torch.ones(6)
    model = ntkgp.LinearizedGP(net, lik, x, torch.sin(x[:, 0]), prior_precision=prior, solver=space,
                               memory_budget=2**24)
    def rss(key):
        return int(re.search(key + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024
    open("/proc/self/clear_refs", "w").write("5")
    base = rss("VmRSS")
    model.log_evidence().backward()
    M, P, G = n, model.network.num_parameters, model.layout.num_groups
    bound = 8 * (G + KERNEL_SPACE_MATRICES) * M * M + 2**24 if space == "kernel" else (
        8 * (1 + WEIGHT_SPACE_MATRICES) * P * P + 2**24)
    print(rss("VmHWM") - base, bound)
    """
)


@needs_clear_refs
@pytest.mark.parametrize(("space", "groups"), [("kernel", 1), ("kernel", 6), ("weight", 1)])
def test_memory_check_bounds_the_peak_with_the_backward(space: str, groups: int) -> None:
    """The memory check before an exact solver is built bounds the real peak of evidence plus gradient.

    The matrices are sized above 32 MiB, glibc's largest dynamic mmap threshold, as every matrix the
    check can refuse is: such blocks are mapped and unmapped with the tensor, so resident memory tracks
    live tensors (P = 2421: 380-388 MiB in six runs against the estimate's 553 MiB). Below it, freed
    blocks stay in the heap and the peak varies run to run by several matrices (P = 2041: 285-446 MiB
    in nine identical runs, 284-292 MiB with ``MALLOC_MMAP_THRESHOLD_`` fixed), which measures the
    allocator rather than ntkgp.
    """
    peak, bound = map(int, probe(BOUND_SCRIPT, space, str(groups), threads=2).split())
    assert peak <= bound, f"{space}, G={groups}: peak {peak / 2**20:.0f} MiB above the estimate {bound / 2**20:.0f} MiB"
