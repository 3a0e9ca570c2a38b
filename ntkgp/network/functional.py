r"""The network as a pure function of its parameters and inputs: the one place that touches ``torch.func``.

:class:`FunctionalNetwork` holds :math:`\hat\theta` (a snapshot of the Bayesian parameters) and
offers four primitives, each chunked over data so memory stays bounded:

* :meth:`~FunctionalNetwork.forward`   :math:`f(x;\hat\theta)`, ``(N, C)``;
* :meth:`~FunctionalNetwork.jvp`       :math:`J(x)\,v` for ``T`` tangents at once, ``(T, N, C)``;
* :meth:`~FunctionalNetwork.vjp`       :math:`J(x)^\top u` for ``T`` cotangents, ``(T, P)``;
* :meth:`~FunctionalNetwork.jacobian`  :math:`J(x)` of one chunk, per example, ``(n, C, P)``;

plus :meth:`~FunctionalNetwork.evaluate`, one plain evaluation under a ``TorchFunctionMode``,
which the structured routes (:mod:`ntkgp.structured`) use to capture layer inputs.

**The network is read, never written.** Every evaluation runs on a private, per-thread, eval-mode
copy of the module that shares its tensors (:mod:`ntkgp.network.shadow`), with the parameter and
buffer values snapshotted when the ``FunctionalNetwork`` was built: later changes to the user's
network do not change the GP, and the GP never changes the network, its flags or its modes.
All passes run under :func:`~ntkgp.network.passes.network_pass` (full float32 precision, no fused
attention fast path, usable inside ``torch.inference_mode()``).

**Inputs** are whatever the network takes (:class:`~ntkgp.network.inputs.Inputs`): a tensor of any
dtype, positional tensors or keyword tensors; floating-point leaves are cast to the network's
dtype. When the test inputs require grad (and grad mode is on), every primitive keeps the graph to
them, so predictions can be differentiated in their inputs.
"""

from __future__ import annotations

import functools
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, jvp, vjp, vmap
from torch.overrides import TorchFunctionMode

from ntkgp.errors import NetworkError
from ntkgp.network.finite import check_finite_outputs
from ntkgp.network.inputs import InputLike, Inputs
from ntkgp.network.passes import network_pass, usable
from ntkgp.network.shadow import ModuleShadow
from ntkgp.network.subnetwork import SubnetworkSpec, select_parameters
from ntkgp.progress import progress_bar

__all__ = ["MODE_DEPENDENT_MODULES", "FunctionalNetwork", "OutputFn"]

#: Module types whose output depends on ``module.training``; ntkgp refuses them in train mode.
MODE_DEPENDENT_MODULES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.modules.dropout._DropoutNd,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)

#: Maps the network's return value to the ``(n, C)`` or ``(n,)`` outputs to linearize.
OutputFn = Callable[[Any], Tensor]

#: Floating dtypes too coarse for Jacobians: such networks are evaluated in float32.
_LOW_PRECISION = (torch.float16, torch.bfloat16)

_DEFAULT_CHUNK_ELEMENTS = 2**25  # a Jacobian chunk holds at most this many entries (128 MiB in float32)

#: Forward-mode AD keeps its dual levels in process-wide state: two threads in ``torch.func.jvp`` at
#: once corrupt each other's levels ("forward AD level with an invalid index", or silently wrong
#: tangents). Every jvp pass of ntkgp holds this lock; reverse-mode passes run concurrently.
_FORWARD_AD_LOCK = threading.RLock()


class FunctionalNetwork:
    r"""A trained network :math:`f(x;\theta)` as a pure function of its Bayesian parameter tensors.

    Parameters
    ----------
    net:
        The trained module. Called as ``net(x)``, ``net(*x)`` or ``net(**x)`` (see
        :class:`~ntkgp.network.inputs.Inputs`); its output for ``n`` examples (after
        ``output_fn``) must have shape ``(n, C)`` or ``(n,)`` (read as ``C = 1``).
    input_shape:
        Shape of one example for single-tensor inputs that may arrive flattened as ``(N, D)``
        (GPyTorch kernels pass them so); ``None`` takes inputs as they come.
    chunk_size:
        Examples per chunk in every pass over data; ``None`` picks it so that a chunk's Jacobian
        holds about ``2**25`` entries.
    progress:
        Show tqdm progress bars on passes over many chunks.
    subnetwork:
        Which parameters are Bayesian (:func:`~ntkgp.network.subnetwork.select_parameters`):
        ``None`` (every parameter with ``requires_grad=True``), ``"last_layer"``, a list of module or
        parameter names, or a callable ``(name, param) -> bool``. The others are held at their values.
    output_fn:
        Maps the network's return value (a tensor, tuple, dict or model output object) to the
        outputs to linearize, e.g. ``lambda out: out.logits``.
    probe_inputs:
        A few examples (the first training inputs) for the checks made when the network is
        built; without them, three standard-normal examples of ``input_shape``.

    Raises
    ------
    ValueError
        If the net has BatchNorm/InstanceNorm/Dropout layers in train mode or no Bayesian parameters.
    NetworkError
        If the network is random, mixes the examples of a batch, or returns something other than
        ``(n, C)`` outputs (:mod:`ntkgp.network.checks`).
    NonFiniteError
        If a Bayesian parameter or an output on the probe examples is NaN or infinite.
    """

    def __init__(
        self,
        net: nn.Module,
        input_shape: Sequence[int] | torch.Size | None = None,
        *,
        chunk_size: int | None = None,
        progress: bool = False,
        subnetwork: SubnetworkSpec = None,
        output_fn: OutputFn | None = None,
        probe_inputs: InputLike | None = None,
    ) -> None:
        from ntkgp.network.checks import check_network, check_parameters, refuse_train_mode

        if not isinstance(net, nn.Module):
            raise TypeError(f"net must be a torch.nn.Module, got {type(net).__name__}")
        refuse_train_mode(net)
        self.module = net
        self.input_shape = None if input_shape is None else torch.Size(input_shape)
        self.output_fn = output_fn
        self.progress = progress
        self._chunk_size = chunk_size
        #: entries one example's pass holds beyond its Jacobian (activations, patches), when known: the
        #: structured plan measures them (:meth:`ntkgp.ntk.EmpiricalNTK.plan`), and chunks respect them
        self.example_entries: int | None = None
        #: set once ``vmap`` cannot batch the network's per-example Jacobians (see :meth:`jacobian`)
        self._unbatchable = False
        self.shadow = ModuleShadow(net)
        probe = self._default_probe(net) if probe_inputs is None else Inputs.wrap(probe_inputs, "the inputs")
        chosen = select_parameters(net, subnetwork, probe=lambda mode: self._probe_call(net, probe, mode))
        with torch.inference_mode(False):  # the snapshot must be usable by autograd
            #: :math:`\hat\theta`, frozen copies of the Bayesian parameters, in ``named_parameters()`` order
            self.params: dict[str, Tensor] = {n: p.detach().clone() for n, p in chosen}
            held = {n: p.detach().clone() for n, p in net.named_parameters() if n not in self.params}
            #: frozen copies of the other parameters and the buffers (e.g. BatchNorm statistics)
            self.fixed: dict[str, Tensor] = {**held, **{n: b.detach().clone() for n, b in net.named_buffers()}}
        first = next(iter(self.params.values()))
        #: the dtype of the user's network; float16 and bfloat16 networks are evaluated in float32
        self.source_dtype: torch.dtype = first.dtype
        if first.dtype in _LOW_PRECISION:
            warnings.warn(
                f"the network's parameters are {first.dtype}; ntkgp evaluates it in float32 (a {first.dtype} "
                "Jacobian would put errors of 1e-2 or more on the predictive mean and variance). The GP is the "
                "linearization of the same weights in float32.",
                stacklevel=3,
            )
            self.params = {n: _widen(p) for n, p in self.params.items()}
            self.fixed = {n: _widen(p) for n, p in self.fixed.items()}
        #: names of the parameter tensors in :math:`\theta`
        self.names: tuple[str, ...] = tuple(self.params)
        self.shapes: tuple[torch.Size, ...] = tuple(p.shape for p in self.params.values())
        self.numels: tuple[int, ...] = tuple(p.numel() for p in self.params.values())
        #: column offset of each parameter tensor in the flattened parameter vector
        self.offsets: tuple[int, ...] = tuple(sum(self.numels[:i]) for i in range(len(self.numels) + 1))
        first = next(iter(self.params.values()))
        self.dtype: torch.dtype = first.dtype
        self.device: torch.device = first.device
        check_parameters(self)
        #: C, the width of the network's output
        self.num_outputs: int = check_network(self, probe)

    def _default_probe(self, net: nn.Module) -> Inputs:
        if self.input_shape is None:
            raise ValueError("give probe_inputs (a few example inputs) or the input_shape of one example")
        first = next(iter(net.parameters()), None)
        dtype = first.dtype if first is not None else torch.get_default_dtype()
        device = first.device if first is not None else None
        g = torch.Generator().manual_seed(0)
        return Inputs.wrap(torch.randn(3, *self.input_shape, generator=g, dtype=dtype).to(device))

    def _probe_call(self, net: nn.Module, probe: Inputs, mode: TorchFunctionMode) -> None:
        """Evaluate the user's module once on ``probe`` under ``mode`` (parameter selection only)."""
        with self.shadow.module() as module, network_pass(grad=False), mode:
            probe.to(float_dtype=self._float_dtype(net)).call(module)

    @staticmethod
    def _float_dtype(net: nn.Module) -> torch.dtype | None:
        return next((p.dtype for p in net.parameters() if p.is_floating_point()), None)

    # ------------------------------------------------------------------ sizes
    @property
    def num_parameters(self) -> int:
        """P, the number of scalar parameters in :math:`\\theta`."""
        return self.offsets[-1]

    def chunk_size(self, tangents: int = 1) -> int:
        """Examples per chunk for a pass that carries ``tangents`` vectors at once."""
        if self._chunk_size is not None:
            base = self._chunk_size
        else:
            base = _DEFAULT_CHUNK_ELEMENTS // (self.num_outputs * self.num_parameters)
            if self.example_entries is not None:  # wide activations (convolutions) bound the chunk too
                base = min(base, _DEFAULT_CHUNK_ELEMENTS // max(1, self.example_entries))
        return max(1, base // max(1, tangents))

    @property
    def fixed_chunk_size(self) -> int | None:
        """The user's ``chunk_size`` (``None``: sized from memory)."""
        return self._chunk_size

    def chunks(self, x: Inputs, size: int, *, desc: str = "") -> Iterator[tuple[int, Inputs]]:
        """``(start, x[start:start + size])`` over the examples, with a progress bar when enabled."""
        starts = range(0, x.num, max(1, size))
        for start in progress_bar(starts, desc=desc, enable=self.progress and len(starts) > 1):
            yield start, x[start : start + size]

    def inputs(self, x: InputLike, name: str = "x") -> Inputs:
        """``x`` as :class:`Inputs`, flattened single tensors reshaped to ``input_shape``."""
        inputs = Inputs.wrap(x, name)
        if inputs.form == "tensor" and self.input_shape is not None:
            t = inputs.data
            if tuple(t.shape[1:]) != tuple(self.input_shape) and t[0].numel() == self.input_shape.numel():
                return Inputs.wrap(t.reshape(t.shape[0], *self.input_shape), name)
        return inputs

    # -------------------------------------------------------------- flattening
    def flatten(self, tensors: dict[str, Tensor], batch_dims: int = 0) -> Tensor:
        """Concatenate per-tensor values ``(*B, *shape)`` into one ``(*B, P)`` tensor."""
        return torch.cat([tensors[n].reshape(*tensors[n].shape[:batch_dims], -1) for n in self.names], dim=-1)

    def unflatten(self, vector: Tensor, tensors: Sequence[int] | None = None) -> dict[str, Tensor]:
        """Split ``(*B, P)`` (or the columns of ``tensors``) into per-tensor values ``(*B, *shape)``."""
        batch = vector.shape[:-1]
        out, start = {}, 0
        for i in range(len(self.names)) if tensors is None else tensors:
            out[self.names[i]] = vector[..., start : start + self.numels[i]].reshape(*batch, *self.shapes[i])
            start += self.numels[i]
        return out

    @property
    def flat_params(self) -> Tensor:
        r""":math:`\hat\theta` as one vector, shape ``(P,)``."""
        return self.flatten(self.params)

    # --------------------------------------------------------------- the core
    def call(self, params: dict[str, Tensor], x: Inputs, *, mode: TorchFunctionMode | None = None) -> Tensor:
        """The network at parameters ``params`` (the rest fixed) on one chunk: ``(n, C)``.

        The only ``functional_call`` in ntkgp; ``mode`` (a ``TorchFunctionMode``) is active
        during the module call only.
        """
        with self.shadow.module() as module:
            args, kwargs = x.args_kwargs()
            state = {**self.fixed, **params}
            if mode is None:
                out = functional_call(module, state, args, kwargs)
            else:
                with mode:
                    out = functional_call(module, state, args, kwargs)
        return self._outputs(out, x.num)

    def _outputs(self, out: Any, n: int) -> Tensor:
        if self.output_fn is not None:
            out = self.output_fn(out)
        if not isinstance(out, Tensor):
            raise NetworkError(
                f"the network returned a {type(out).__name__}, not a tensor; pass output_fn= to pick the outputs "
                "to linearize, e.g. output_fn=lambda out: out[0] or lambda out: out.logits"
            )
        if out.dim() == 1:
            out = out.unsqueeze(-1)
        if out.dim() != 2 or out.shape[0] != n:
            raise NetworkError(
                f"the network must map n examples to (n, C) or (n,) outputs; for n={n} examples it returned "
                f"shape {tuple(out.shape)}" + ("" if self.output_fn else " (output_fn= can reshape them)")
            )
        return out

    def _prepare(self, x: Inputs) -> Inputs:
        """Floating leaves in the network's dtype, on its device, usable by autograd."""
        return x.to(self.device, self.dtype).map(usable)

    def _grad(self, x: Inputs) -> bool:
        """Whether a pass keeps the graph to the inputs (they require grad and grad mode is on)."""
        return torch.is_grad_enabled() and x.requires_grad

    def forward(self, x: Inputs) -> Tensor:
        r""":math:`f(x;\hat\theta)`, ``(N, C)``. Raises :class:`~ntkgp.errors.NonFiniteError` on NaN/inf outputs."""
        with network_pass(self._grad(x), inputs_graph=self._grad(x)):
            outs = [self.call(self.params, self._prepare(xc)) for _, xc in self.chunks(x, self.chunk_size())]
        out = torch.cat(outs, dim=0)
        check_finite_outputs(out)
        return out

    def _split(self, tensors: Sequence[int] | None) -> tuple[list[str], dict[str, Tensor]]:
        """Names of the differentiated tensors and the values of the others (held fixed)."""
        names = list(self.names) if tensors is None else [self.names[i] for i in tensors]
        held = {n: p for n, p in self.params.items() if n not in names}
        return names, held

    def jvp(self, x: Inputs, tangents: Tensor, tensors: Sequence[int] | None = None) -> Tensor:
        r""":math:`J(x)\,v_t` for ``T`` tangents: ``(T, P)`` (or the columns of ``tensors``) -> ``(T, N, C)``."""
        names, held = self._split(tensors)
        size = self.chunk_size(tangents.shape[0])
        tangent = self.unflatten(tangents.to(self.dtype), tensors)
        primal = {n: self.params[n] for n in names}
        if self._unbatchable:
            return self._jvp_by_loop(x, tangents, names, held, size)
        outs = []
        try:
            with _FORWARD_AD_LOCK, network_pass(self._grad(x) or tangents.requires_grad, inputs_graph=self._grad(x)):
                for _, xc in self.chunks(x, size, desc="jvp"):
                    xc = self._prepare(xc)

                    def one(t: dict[str, Tensor], xc: Inputs = xc) -> Tensor:
                        return jvp(lambda p: self.call({**held, **p}, xc), (primal,), (t,))[1]

                    outs.append(vmap(one)(tangent))
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as error:  # no forward-AD or batching rule (mkldnn LSTM; NotImplementedError too)
            self._check_loop_route(names, held, x, error)
            return self._jvp_by_loop(x, tangents, names, held, size)
        return torch.cat(outs, dim=1)

    def _jvp_by_loop(self, x: Inputs, tangents: Tensor, names: list[str], held: dict[str, Tensor], size: int) -> Tensor:
        """:meth:`jvp` through per-example Jacobians by plain autograd (:meth:`_jacobian_by_loop`)."""
        outs = []
        for _, xc in self.chunks(x, size, desc="jvp"):
            jac = self._jacobian_by_loop(names, held, self._prepare(xc))  # shape: (n, C, P)
            outs.append(torch.einsum("ncp,tp->tnc", jac, tangents.to(jac.dtype)))
        return torch.cat(outs, dim=1)

    def vjp(self, x: Inputs, cotangents: Tensor, tensors: Sequence[int] | None = None) -> Tensor:
        r""":math:`\sum_n J(x_n)^\top u_{t,n}` for ``T`` cotangents: ``(T, N, C)`` -> ``(T, P)``.

        With ``tensors``, only those tensors' columns (the others held fixed)."""
        names, held = self._split(tensors)
        size = self.chunk_size(cotangents.shape[0])
        cotangents = cotangents.to(self.dtype)
        primal = {n: self.params[n] for n in names}
        total: Tensor | None = None
        if self._unbatchable:
            return self._vjp_by_loop(x, cotangents, names, held, size)
        if cotangents.shape[0] == 1:
            return self._vjp_by_autograd(x, cotangents, names, held, size)
        try:
            with network_pass(self._grad(x) or cotangents.requires_grad, inputs_graph=self._grad(x)):
                for start, xc in self.chunks(x, size, desc="vjp"):
                    xc = self._prepare(xc)
                    pullback = vjp(lambda p, xc=xc: self.call({**held, **p}, xc), primal)[1]
                    grads = vmap(pullback)(cotangents[:, start : start + xc.num])[0]
                    flat = torch.cat([grads[n].reshape(grads[n].shape[0], -1) for n in names], dim=-1)
                    total = flat if total is None else total + flat
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as error:  # no batching rule for the pullback (LSTM)
            self._check_loop_route(names, held, x, error)
            return self._vjp_by_loop(x, cotangents, names, held, size)
        assert total is not None
        return total

    def _vjp_by_autograd(
        self, x: Inputs, cotangents: Tensor, names: list[str], held: dict[str, Tensor], size: int
    ) -> Tensor:
        """:meth:`vjp` of one cotangent ``(1, N, C)`` by plain autograd on detached copies of the weights.

        The same numbers as ``torch.func.vjp``, whose pullback imports ``torch._dynamo`` on its first call
        in a process (4-5 s on a CPU), which a network whose tensors all take structured routes then never pays."""
        graph = self._grad(x) or cotangents.requires_grad
        total: Tensor | None = None
        with network_pass(graph, inputs_graph=self._grad(x)):
            for start, xc in self.chunks(x, size, desc="vjp"):
                xc = self._prepare(xc)
                with torch.enable_grad():
                    leaves = {n: self.params[n].detach().requires_grad_() for n in names}
                    out = self.call({**held, **leaves}, xc)
                    grads = torch.autograd.grad(
                        out,
                        [leaves[n] for n in names],
                        cotangents[0, start : start + xc.num],
                        create_graph=graph,
                        allow_unused=True,
                    )
                flat = torch.cat(
                    [(torch.zeros_like(leaves[n]) if g is None else g).reshape(1, -1) for n, g in zip(names, grads)],
                    dim=-1,
                )
                total = flat if total is None else total + flat
        assert total is not None
        return total

    def _vjp_by_loop(
        self, x: Inputs, cotangents: Tensor, names: list[str], held: dict[str, Tensor], size: int
    ) -> Tensor:
        """:meth:`vjp` through per-example Jacobians by plain autograd (:meth:`_jacobian_by_loop`)."""
        total: Tensor | None = None
        for start, xc in self.chunks(x, size, desc="vjp"):
            jac = self._jacobian_by_loop(names, held, self._prepare(xc))  # shape: (n, C, P)
            part = torch.einsum("ncp,tnc->tp", jac, cotangents[:, start : start + xc.num].to(jac.dtype))
            total = part if total is None else total + part
        assert total is not None
        return total

    def jacobian(self, x: Inputs, tensors: Sequence[int] | None = None) -> Tensor:
        r"""Per-example :math:`J(x)` of one chunk by ``vmap(jacrev)``: ``(n, C, P)`` (or ``tensors``' columns).

        Materializes ``n * C * P`` entries: callers chunk the data. The structured routes
        (:mod:`ntkgp.structured`) give the same columns far cheaper; :func:`ntkgp.ntk.jacobian`
        combines both.
        """
        names, held = self._split(tensors)
        x = self._prepare(x)
        wrt = {n: self.params[n] for n in names}
        args, kwargs = x.args_kwargs()
        dims = _batch_dims(args), _batch_dims(kwargs)

        def single(params: dict[str, Tensor], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
            # one example: every tensor leaf gets its batch dimension back
            data = kwargs if x.form == "kwargs" else (args[0] if x.form == "tensor" else args)
            one = Inputs(data, x.form, 1).map(lambda t: t.unsqueeze(0))
            return self.call({**held, **params}, one).squeeze(0)

        if not self._unbatchable:
            try:
                with network_pass(self._grad(x), inputs_graph=self._grad(x)):
                    jac = vmap(jacrev(single), in_dims=(None, *dims))(wrt, args, kwargs)
                # shape: jac[name] (n, C, *param_shape) -> (n, C, P)
                return torch.cat([jac[n].reshape(x.num, jac[n].shape[1], -1) for n in names], -1)
            except torch.OutOfMemoryError:
                raise
            except RuntimeError as error:  # kernels without batching or functorch rules (nn.LSTM, nn.GRU)
                self._check_loop_route(names, held, x, error)
        return self._jacobian_by_loop(names, held, x)

    def _check_loop_route(self, names: list[str], held: dict[str, Tensor], x: Inputs, error: RuntimeError) -> None:
        """After ``vmap(jacrev)`` failed: take the loop of backward passes if it runs, else re-raise ``error``."""
        try:
            self._jacobian_by_loop(names, held, x.map(lambda t: t[:1]))
        except Exception:
            raise error from None
        self._unbatchable = True
        warnings.warn(
            "torch.func cannot vmap this network's per-example Jacobians (one of its kernels, for example "
            f"nn.LSTM or nn.GRU, has no batching rule: {str(error).splitlines()[0][:120]}); ntkgp computes them "
            "by one backward pass per example and output instead: the same values, slower",
            stacklevel=4,
        )

    def _jacobian_by_loop(self, names: list[str], held: dict[str, Tensor], x: Inputs) -> Tensor:
        """Per-example :math:`J(x)` by plain autograd, one backward pass per example and output: ``(n, C, P)``."""
        keep = self._grad(x)  # input gradients: keep the graph of every row
        rows = []
        with network_pass(True, inputs_graph=keep):
            for i in range(x.num):
                params = {n: self.params[n].detach().requires_grad_() for n in names}
                row = x.map(functools.partial(_row, index=i))
                out = self.call({**held, **params}, row).reshape(-1)  # shape: (C,)
                per_output = []
                for c in range(out.shape[0]):
                    grads = torch.autograd.grad(
                        out[c], list(params.values()), retain_graph=True, create_graph=keep, allow_unused=True
                    )
                    per_output.append(
                        torch.cat(
                            [
                                (torch.zeros_like(p) if g is None else g).reshape(-1)
                                for g, p in zip(grads, params.values(), strict=True)
                            ]
                        )
                    )
                rows.append(torch.stack(per_output))
        return torch.stack(rows)  # shape: (n, C, P)

    def evaluate(self, x: Inputs, mode: TorchFunctionMode | None = None, *, grad: bool = True) -> Tensor:
        """One plain evaluation at :math:`\\hat\\theta`, ``(n, C)``.

        Autograd is on (captures differentiate it) unless ``grad=False``; ``mode`` is active during the call."""
        with network_pass(grad, inputs_graph=grad and self._grad(x)):
            return self.call(self.params, self._prepare(x), mode=mode)

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__.copy()


def _row(t: Tensor, index: int) -> Tensor:
    return t[index : index + 1]


def _widen(t: Tensor) -> Tensor:
    return t.to(torch.float32) if t.dtype in _LOW_PRECISION else t


def _batch_dims(tree: Any) -> Any:
    """``vmap`` in_dims for a tuple or dict of leaves: 0 for tensors, ``None`` for constants."""
    if isinstance(tree, dict):
        return {k: 0 if isinstance(v, Tensor) else None for k, v in tree.items()}
    return tuple(0 if isinstance(v, Tensor) else None for v in tree)
