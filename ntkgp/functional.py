r"""The network as a pure function of its parameters: the one place that touches ``torch.func``.

Everything else in ntkgp (kernels, means, operators, solvers) is built on the four
primitives of :class:`FunctionalNetwork`:

* ``forward(x)``      :math:`f(x;\hat\theta)`, shape ``(N, C)``;
* ``jvp(x, v)``       :math:`J(x)\,v` for a batch of tangents, shape ``(T, N, C)``;
* ``vjp(x, u)``       :math:`J(x)^\top u` for a batch of cotangents, shape ``(T, P)``;
* ``jacobian(x)``     :math:`J(x)`, shape ``(n, C, P)`` for one chunk of data.

Each pass over data is chunked, so memory is bounded by ``chunk_size`` examples at a time.

The network is evaluated with :func:`torch.func.functional_call` on a frozen copy of its
trained parameters :math:`\hat\theta` and its buffers, in eval mode, with TF32 off on CUDA
(:mod:`ntkgp.precision`). The user's module is
never changed: if it sits in train mode (with no mode-dependent layers), it is switched to
eval for the duration of each call and restored afterwards.
"""

from __future__ import annotations

import contextlib
import itertools
import warnings
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, jacrev, jvp, vjp, vmap

from ntkgp.precision import full_precision
from ntkgp.progress import progress_bar

__all__ = ["FunctionalNetwork", "LinearLayer", "MODE_DEPENDENT_MODULES", "StructuredLayer"]

#: Module types whose output depends on ``module.training``; ntkgp refuses them in train mode.
MODE_DEPENDENT_MODULES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.modules.dropout._DropoutNd,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)

_DEFAULT_CHUNK_ELEMENTS = 2**25  # a Jacobian chunk holds at most this many entries (128 MiB in float32)


class StructuredLayer(NamedTuple):
    r"""A module whose per-example Jacobian factorizes, handled by structured Gram matrices.

    ``kind`` tags the factorization (see :meth:`FunctionalNetwork.structured_factors`):

    * ``"linear"``: ``nn.Linear`` on 2-D input; factors ``A`` ``(n, d_in)``, ``G`` ``(n, C, d_out)``.
    * ``"conv"``: ``nn.Conv1d`` / ``nn.Conv2d`` (``groups=1``) on batched input; factors: the
      unfolded input patches ``U`` ``(n, L, d_in k)`` (``k`` the kernel's number of taps, ``L`` the
      number of output positions) and the output cotangents ``G`` ``(n, C, L, d_out)``.
    """

    name: str
    #: index of its weight / bias in :attr:`FunctionalNetwork.names` (None if not trainable)
    weight: int | None
    bias: int | None
    kind: str = "linear"


#: The historical name: a structured layer (``nn.Linear`` ones are built with ``kind="linear"``).
LinearLayer = StructuredLayer

_CONV_TYPES: dict[type[nn.Module], int] = {nn.Conv1d: 3, nn.Conv2d: 4}  # module type -> its batched input dim


def conv_patches(module: nn.Conv1d | nn.Conv2d, x: Tensor) -> Tensor:
    r"""Unfolded input patches :math:`U_n` of a convolution: ``(n, d_in, *spatial)`` -> ``(n, L, d_in k)``.

    With them the convolution is :math:`z_{n,l} = W u_{n,l} + b` for every output position
    :math:`l`, where ``W`` is the weight reshaped to ``(d_out, d_in k)`` (channel-major, then kernel
    taps, as ``weight.reshape(d_out, -1)``). The input is padded exactly as the module pads it
    (its ``padding``, including ``"same"`` with its asymmetric split, and ``padding_mode``), then
    unfolded with the module's kernel size, stride and dilation. Conv1d runs as a Conv2d of height 1.
    """
    kernel, stride, dilation = module.kernel_size, module.stride, module.dilation
    if isinstance(module.padding, str):
        pads = [0, 0] * len(kernel)  # "valid"
        if module.padding == "same":
            for i, (d, k) in enumerate(zip(reversed(dilation), reversed(kernel))):
                total = d * (k - 1)
                pads[2 * i], pads[2 * i + 1] = total // 2, total - total // 2
    else:
        pads = [p for p in reversed(module.padding) for _ in range(2)]
    if any(pads):
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, pads, mode=mode)
    if len(kernel) == 1:  # shape: (n, d_in, T) -> (n, d_in, 1, T)
        x, kernel, stride, dilation = x.unsqueeze(2), (1, *kernel), (1, *stride), (1, *dilation)
    # shape: (n, d_in * k, L) -> (n, L, d_in * k)
    return F.unfold(x, kernel, dilation=dilation, stride=stride).transpose(1, 2)


def _join(module: str, attr: str) -> str:
    return f"{module}.{attr}" if module else attr


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """Temporarily put every submodule in eval mode, restoring the exact previous flags."""
    flags = [(m, m.training) for m in module.modules()]
    if not any(training for _, training in flags):
        yield
        return
    try:
        for m, _ in flags:
            m.training = False
        yield
    finally:
        for m, training in flags:
            m.training = training


class FunctionalNetwork:
    r"""A trained network :math:`f(x;\theta)` as a pure function of its parameter tensors.

    Parameters
    ----------
    net:
        The trained module. Its output for ``n`` inputs must have shape ``(n, C)`` or ``(n,)``
        (read as ``C = 1``). Parameters with ``requires_grad=False`` are held fixed and are not
        part of :math:`\theta`.
    input_shape:
        Shape of one input example, e.g. ``(8,)`` or ``(1, 8, 8)``. ntkgp passes inputs
        around flattened as ``(N, D)`` (as GPyTorch kernels expect) and reshapes them to
        ``(N, *input_shape)`` before calling ``net``.
    chunk_size:
        Number of examples per chunk in every pass over data. ``None`` picks it so that a
        chunk's Jacobian holds about 2**25 entries.
    progress:
        Show tqdm progress bars on passes over many chunks.
    structured:
        Use per-layer structured Gram matrices for ``nn.Linear``, ``nn.Conv1d`` and ``nn.Conv2d``
        layers (see :attr:`structured_layers`); ``False`` contracts per-example Jacobians for
        every tensor.

    Raises
    ------
    ValueError
        If the net has BatchNorm/InstanceNorm/Dropout layers in train mode, or no trainable
        parameters.
    """

    def __init__(
        self,
        net: nn.Module,
        input_shape: tuple[int, ...] | torch.Size,
        *,
        chunk_size: int | None = None,
        progress: bool = False,
        structured: bool = True,
    ) -> None:
        if not isinstance(net, nn.Module):
            raise TypeError(f"net must be a torch.nn.Module, got {type(net).__name__}")
        in_train_mode = [
            name
            for name, m in net.named_modules()
            if m.training and isinstance(m, MODE_DEPENDENT_MODULES)
        ]
        if in_train_mode:
            raise ValueError(
                "the network has layers whose output depends on train/eval mode and they are in "
                f"train mode: {in_train_mode[:5]}. ntkgp linearizes the network as it predicts, "
                "in eval mode; call net.eval() before building the GP."
            )
        if net.training:
            warnings.warn(
                "the network is in train mode; ntkgp evaluates it in eval mode (it has no "
                "BatchNorm or Dropout layers, so the outputs are the same).",
                stacklevel=3,
            )
        trainable = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
        if not trainable:
            raise ValueError("the network has no parameters with requires_grad=True to linearize")

        self.module = net
        self.input_shape = torch.Size(input_shape)
        #: names of the parameter tensors in :math:`\theta`, in ``named_parameters()`` order
        self.names: tuple[str, ...] = tuple(n for n, _ in trainable)
        #: :math:`\hat\theta`, a frozen copy of the trained values
        self.params: dict[str, Tensor] = {n: p.detach().clone() for n, p in trainable}
        frozen = {n: p.detach().clone() for n, p in net.named_parameters() if not p.requires_grad}
        #: frozen copies of the buffers (e.g. BatchNorm statistics) and of fixed parameters
        self.buffers: dict[str, Tensor] = {**frozen, **{n: b.detach().clone() for n, b in net.named_buffers()}}
        self.shapes: tuple[torch.Size, ...] = tuple(p.shape for p in self.params.values())
        self.numels: tuple[int, ...] = tuple(p.numel() for p in self.params.values())
        #: column offset of each parameter tensor in the flattened parameter vector
        self.offsets: tuple[int, ...] = tuple(
            sum(self.numels[:i]) for i in range(len(self.numels) + 1)
        )
        first = next(iter(self.params.values()))
        self.dtype: torch.dtype = first.dtype
        self.device: torch.device = first.device
        self.progress = progress
        self._chunk_size = chunk_size
        self._num_outputs: int | None = None
        self._structured_layers: tuple[StructuredLayer, ...] | None = None if structured else ()
        #: entries per example held by one factor pass (factors and activations), set with the layers
        self._factor_entries = 0
        self._factor_cache: list[tuple[Tensor, int, list[tuple[Tensor, Tensor]]]] = []

    # ------------------------------------------------------------------ sizes
    @property
    def num_parameters(self) -> int:
        """P, the number of scalar parameters in :math:`\\theta`."""
        return self.offsets[-1]

    @property
    def num_outputs(self) -> int:
        """C, the width of the network's output (probed once on a zero input)."""
        if self._num_outputs is None:
            probe = torch.zeros(1, *self.input_shape, dtype=self.dtype, device=self.device)
            try:
                with torch.no_grad():
                    out = self._call(self.params, probe)
            except RuntimeError as err:
                raise ValueError(
                    f"the network cannot be evaluated on examples of shape {tuple(self.input_shape)} "
                    f"(taken from the training inputs): {err}"
                ) from err
            self._num_outputs = out.shape[-1]
        return self._num_outputs

    def chunk_size(self, tangents: int = 1) -> int:
        """Examples per chunk for a pass that carries ``tangents`` vectors at once."""
        if self._chunk_size is not None:
            base = self._chunk_size
        else:
            base = _DEFAULT_CHUNK_ELEMENTS // (self.num_outputs * self.num_parameters)
        return max(1, base // max(1, tangents))

    def _through_jacobian(self, vectors: int) -> bool:
        """Whether ``vectors`` jvp tangents / vjp cotangents are cheaper through per-chunk Jacobians.

        Vectorized jvp/vjp run one forward/backward per vector and shrink the chunk by the number of
        vectors; the Jacobian costs ``C`` backward passes per example and one GEMM with all vectors.
        With many vectors (block Lanczos, CG probes, low-rank posteriors) the GEMM route was up to
        50x faster on an 8-256-256-1 MLP (512 vectors, 1000 examples: 4 s versus 200 s).
        """
        return vectors > 4 * self.num_outputs

    def chunks(self, x: Tensor, size: int, *, desc: str = "") -> Iterator[tuple[int, Tensor]]:
        """Yield ``(start, x[start:start + size])`` over the rows of ``x``."""
        starts = range(0, x.shape[0], size)
        bar = progress_bar(starts, desc=desc, enable=self.progress and len(starts) > 1)
        for start in bar:
            yield start, x[start : start + size]

    # -------------------------------------------------------------- flattening
    def flatten(self, tensors: dict[str, Tensor], batch_dims: int = 0) -> Tensor:
        """Concatenate per-tensor values ``(*B, *shape)`` into one ``(*B, P)`` tensor."""
        parts = [tensors[n].reshape(*tensors[n].shape[:batch_dims], -1) for n in self.names]
        return torch.cat(parts, dim=-1)

    def unflatten(self, vector: Tensor) -> dict[str, Tensor]:
        """Split ``(*B, P)`` into per-tensor values ``(*B, *shape)``."""
        batch = vector.shape[:-1]
        return {
            n: vector[..., self.offsets[i] : self.offsets[i + 1]].reshape(*batch, *self.shapes[i])
            for i, n in enumerate(self.names)
        }

    @property
    def flat_params(self) -> Tensor:
        r""":math:`\hat\theta` as one vector, shape ``(P,)``."""
        return self.flatten(self.params)

    # --------------------------------------------------------------- the core
    def _call(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        # shape: x (n, D) flattened, or (n, *input_shape) -> out (n, C)
        x = x.reshape(x.shape[0], *self.input_shape)
        with _eval_mode(self.module):
            out = functional_call(self.module, {**params, **self.buffers}, (x,))
        if out.dim() == 1:
            out = out.unsqueeze(-1)
        if out.dim() != 2 or out.shape[0] != x.shape[0]:
            raise ValueError(
                f"the network must map (n, *input_shape) inputs to (n, C) or (n,) outputs; "
                f"for n={x.shape[0]} inputs it returned shape {tuple(out.shape)}"
            )
        return out

    def _cast(self, t: Tensor) -> Tensor:
        return t.to(dtype=self.dtype, device=self.device)

    @torch.no_grad()
    @full_precision
    def forward(self, x: Tensor) -> Tensor:
        r""":math:`f(x;\hat\theta)`. Shape: x ``(N, D)`` -> ``(N, C)``."""
        size = self.chunk_size()
        outs = [self._call(self.params, self._cast(xc)) for _, xc in self.chunks(x, size)]
        return torch.cat(outs, dim=0)

    @torch.no_grad()
    @full_precision
    def jvp(self, x: Tensor, tangents: Tensor) -> Tensor:
        r"""Jacobian-vector products :math:`J(x)\,v_t` for ``T`` tangents at once.

        Shape: x ``(N, D)``, tangents ``(T, P)`` -> ``(T, N, C)``.
        """
        if self._through_jacobian(tangents.shape[0]):
            flat = self._cast(tangents)
            parts = [torch.einsum("ncp,tp->tnc", self.jacobian(xc), flat)
                     for _, xc in self.chunks(x, self.chunk_size(), desc="jvp")]
            return torch.cat(parts, dim=1)
        size = self.chunk_size(tangents.shape[0])
        tangents = self.unflatten(self._cast(tangents))
        outs = []
        for _, xc in self.chunks(x, size, desc="jvp"):
            xc = self._cast(xc)

            def one(tangent: dict[str, Tensor], xc: Tensor = xc) -> Tensor:
                return jvp(lambda p: self._call(p, xc), (self.params,), (tangent,))[1]

            outs.append(vmap(one)(tangents))
        return torch.cat(outs, dim=1)

    @torch.no_grad()
    @full_precision
    def vjp(self, x: Tensor, cotangents: Tensor) -> Tensor:
        r"""Vector-Jacobian products :math:`J(x)^\top u_t`, summed over data, for ``T`` cotangents.

        Shape: x ``(N, D)``, cotangents ``(T, N, C)`` -> ``(T, P)``.
        """
        cotangents = self._cast(cotangents)
        if self._through_jacobian(cotangents.shape[0]):
            total = None
            for start, xc in self.chunks(x, self.chunk_size(), desc="vjp"):
                part = torch.einsum("tnc,ncp->tp", cotangents[:, start : start + xc.shape[0]], self.jacobian(xc))
                total = part if total is None else total + part
            assert total is not None
            return total
        size = self.chunk_size(cotangents.shape[0])
        total: Tensor | None = None
        for start, xc in self.chunks(x, size, desc="vjp"):
            xc = self._cast(xc)
            _, pullback = vjp(lambda p, xc=xc: self._call(p, xc), self.params)
            grads = vmap(pullback)(cotangents[:, start : start + xc.shape[0]])[0]
            flat = self.flatten(grads, batch_dims=1)
            total = flat if total is None else total + flat
        assert total is not None
        return total

    @torch.no_grad()
    @full_precision
    def jacobian(self, x: Tensor, tensors: Sequence[int] | None = None) -> Tensor:
        r"""The Jacobian :math:`J(x)` of one chunk, per example. Shape: ``(n, D)`` -> ``(n, C, P)``.

        With ``tensors`` (indices into :attr:`names`), only those parameter tensors' columns,
        concatenated in that order. Callers chunk the data; this materialises ``n * C * P`` entries.

        Columns of :attr:`structured_layers` are outer products of their factors
        (:meth:`structured_factors`): :math:`g_{n,c} a_n^\top` for ``nn.Linear`` weights,
        :math:`\sum_l g_{n,c,l} u_{n,l}^\top` for convolutions, :math:`g_{n,c}` (summed over
        positions) for biases. That costs one forward and ``C`` backward passes for the chunk, where
        ``vmap(jacrev)`` costs ``C`` backward passes per example (8-256-256-1 MLP, 490 examples:
        about 10x faster). Other tensors go through ``vmap(jacrev)``, as does everything with
        ``structured=False``.
        """
        x = self._cast(x)
        requested = list(range(len(self.names))) if tensors is None else list(tensors)
        owner = {}  # tensor index -> (structured layer index, is the weight)
        for i, layer in enumerate(self.structured_layers):
            if layer.weight is not None:
                owner[layer.weight] = (i, True)
            if layer.bias is not None:
                owner[layer.bias] = (i, False)
        generic = [t for t in requested if t not in owner]
        if not len(generic) < len(requested):
            return self._autograd_jacobian(x, generic)
        # every block is written into its columns of one output: the Jacobian is held once, not twice
        offsets = dict(zip(requested, itertools.accumulate((self.numels[t] for t in requested), initial=0)))
        factors = self._factors_chunk(x)
        n, C = factors[0][1].shape[:2]
        out = torch.empty(n, C, sum(self.numels[t] for t in requested), dtype=self.dtype, device=self.device)
        if generic:
            jac = self._autograd_jacobian(x, generic)
            start = 0
            for t in generic:
                out[..., offsets[t] : offsets[t] + self.numels[t]] = jac[..., start : start + self.numels[t]]
                start += self.numels[t]
            del jac
        for t in requested:
            if t not in owner:
                continue
            i, is_weight = owner[t]
            a, g = factors[i]
            cols = out[..., offsets[t] : offsets[t] + self.numels[t]]
            if self.structured_layers[i].kind == "linear":  # a: (n, d_in), g: (n, C, d_out)
                if is_weight:
                    torch.mul(g[..., :, None], a[:, None, None, :], out=cols.view(n, C, g.shape[-1], a.shape[-1]))
                else:
                    cols.copy_(g)
            elif is_weight:  # conv: a = patches (n, L, d_in k), g: (n, C, L, d_out)
                cols.copy_(torch.einsum("ncld,nle->ncde", g, a).reshape(n, C, -1))
            else:
                torch.sum(g, 2, out=cols)
        return out

    def _autograd_jacobian(self, x: Tensor, tensors: Sequence[int]) -> Tensor:
        """``vmap(jacrev)`` Jacobian of the given tensors' columns, ``(n, C, sum of their numels)``."""
        names = [self.names[i] for i in tensors]
        wrt = {n: self.params[n] for n in names}
        fixed = {n: p for n, p in self.params.items() if n not in wrt}

        def single(params: dict[str, Tensor], xi: Tensor) -> Tensor:
            return self._call({**fixed, **params}, xi.unsqueeze(0)).squeeze(0)

        jac = vmap(jacrev(single), in_dims=(None, 0))(wrt, x)
        # shape: jac[name] (n, C, *param_shape) -> (n, C, P)
        return torch.cat([jac[n].reshape(x.shape[0], jac[n].shape[1], -1) for n in names], -1)

    def jacobian_block(self, x: Tensor, tensors: Sequence[int] | None = None) -> Tensor:
        """``J(x)`` for a block larger than one chunk, computed chunk by chunk. ``(n, C, P)``."""
        inner = self.chunk_size()
        if x.shape[0] <= inner:
            return self.jacobian(x, tensors)
        return torch.cat([self.jacobian(x[i : i + inner], tensors) for i in range(0, x.shape[0], inner)], 0)

    # ------------------------------------------------- structured (per-layer) factors
    @property
    def structured_layers(self) -> tuple[StructuredLayer, ...]:
        r"""The layers whose Jacobian factorizes per example (handled by structured Grams).

        * ``nn.Linear`` (``kind="linear"``) with input :math:`a_n` and output cotangent
          :math:`g_{n,c} = \partial f_c(x_n)/\partial z_n`:
          :math:`\partial f_c(x_n)/\partial W = g_{n,c} a_n^\top`,
          :math:`\partial f_c(x_n)/\partial b = g_{n,c}`. Qualifies on 2-D ``(n, d_in)`` input.
        * ``nn.Conv1d`` / ``nn.Conv2d`` (``kind="conv"``) with ``groups=1``, with input patches
          :math:`u_{n,l}` and output cotangents :math:`g_{n,c,l}` at output positions :math:`l`:
          :math:`\partial f_c(x_n)/\partial W = \sum_l g_{n,c,l} u_{n,l}^\top`,
          :math:`\partial f_c(x_n)/\partial b = \sum_l g_{n,c,l}`. Qualifies on batched input
          (3-D for Conv1d, 4-D for Conv2d).

        A layer qualifies when it is called exactly once per forward pass (shared modules fall
        back to the generic route), on the input above, has a trainable parameter, and none of its
        parameters is tied into another module. Only exact module types count (subclasses may
        override ``forward``). Found once by a probe forward pass on two zero examples. A parameter
        used outside its module's ``forward`` (e.g. ``F.linear(x, self.layer.weight)``) is not
        detected: build such a network with ``structured=False``.
        """
        if self._structured_layers is None:
            self._discover_layers()
        assert self._structured_layers is not None
        return self._structured_layers

    @property
    def linear_layers(self) -> tuple[StructuredLayer, ...]:
        """The historical name of :attr:`structured_layers` (it holds conv layers too)."""
        return self.structured_layers

    def _discover_layers(self) -> None:
        probe = torch.zeros(2, *self.input_shape, dtype=self.dtype, device=self.device)
        C = self.num_outputs  # its own probe pass must not be counted below
        kinds = {nn.Linear: 2, **_CONV_TYPES}
        calls: dict[str, list[tuple[int, int, int]]] = {}  # name -> per call: (input dim, in, out numel)
        activations = [0]
        modules = dict(self.module.named_modules())
        # a parameter tied into several modules gets contributions from all of them: generic route
        uses: dict[int, int] = {}
        for _, p in self.module.named_parameters(remove_duplicate=False):
            uses[id(p)] = uses.get(id(p), 0) + 1
        candidates = {name for name, m in modules.items()
                      if type(m) in kinds and getattr(m, "groups", 1) == 1
                      and all(uses[id(p)] == 1 for p in m.parameters(recurse=False))}

        def record(name: str, inp: tuple[Tensor, ...], out: object) -> None:
            if isinstance(out, Tensor):
                activations[0] += out.numel()
            if name in candidates and isinstance(out, Tensor):
                calls.setdefault(name, []).append((inp[0].dim(), inp[0].numel(), out.numel()))

        leaves = {name: m for name, m in modules.items() if name in candidates or not any(m.children())}
        handles = [m.register_forward_hook(lambda mod, inp, out, name=name: record(name, inp, out))
                   for name, m in leaves.items()]
        try:
            with torch.no_grad():
                self._call(self.params, probe)
        finally:
            for h in handles:
                h.remove()
        index = {n: i for i, n in enumerate(self.names)}
        layers = []
        entries = 2 * activations[0] // probe.shape[0]  # activations and their gradients, per example
        for name, seen in calls.items():
            module = modules[name]
            weight, bias = index.get(_join(name, "weight")), index.get(_join(name, "bias"))
            if len(seen) != 1 or seen[0][0] != kinds[type(module)] or (weight is None and bias is None):
                continue
            numel_in, numel_out = seen[0][1] // probe.shape[0], seen[0][2] // probe.shape[0]  # per example
            if type(module) is nn.Linear:
                layers.append(StructuredLayer(name, weight, bias, "linear"))
                entries += numel_in + C * numel_out
            else:
                L = numel_out // module.out_channels
                taps = module.in_channels * module.weight.shape[2:].numel()
                layers.append(StructuredLayer(name, weight, bias, "conv"))
                entries += numel_in + L * taps + C * numel_out
        self._structured_layers = tuple(layers)
        self._factor_entries = entries

    @property
    def generic_tensors(self) -> tuple[int, ...]:
        """Indices of parameter tensors not covered by :attr:`structured_layers` (contracted generically)."""
        covered = {i for layer in self.structured_layers for i in (layer.weight, layer.bias) if i is not None}
        return tuple(i for i in range(len(self.names)) if i not in covered)

    def factor_chunk_size(self) -> int:
        """Examples per chunk of a factor pass: the given ``chunk_size``, else about 2**25 entries held."""
        if self._chunk_size is not None:
            return self._chunk_size
        _ = self.structured_layers
        return max(1, _DEFAULT_CHUNK_ELEMENTS // max(1, self._factor_entries))

    @full_precision
    def structured_factors(self, x: Tensor) -> list[tuple[Tensor, Tensor]]:
        r"""Per-layer factors of :attr:`structured_layers`, chunked over data, in the network's dtype.

        For a ``"linear"`` layer ``(A, G)``: ``A`` ``(n, d_in)`` holds the layer inputs :math:`a_n`,
        ``G`` ``(n, C, d_out)`` the output cotangents :math:`g_{n,c}`. For a ``"conv"`` layer
        ``(U, G)``: ``U`` ``(n, L, d_in k)`` the unfolded input patches (:func:`conv_patches`),
        ``G`` ``(n, C, L, d_out)`` the output cotangents per output position. One forward pass with
        zero "probe" tensors added to each layer's output, and one backward pass per network output.
        """
        size = self.factor_chunk_size()
        parts = [self._factors_chunk(self._cast(xc)) for _, xc in self.chunks(x, size, desc="factors")]
        if len(parts) == 1:
            return parts[0]
        return [(torch.cat([p[i][0] for p in parts]), torch.cat([p[i][1] for p in parts]))
                for i in range(len(self.structured_layers))]

    def cached_structured_factors(self, x: Tensor, max_bytes: int) -> list[tuple[Tensor, Tensor]] | None:
        """:meth:`structured_factors` of all of ``x``, kept for the two most recent inputs; ``None``
        when a factor pass over ``x`` would hold more than ``max_bytes`` (then callers compute the
        factors chunk by chunk).

        Iterative solvers multiply by the same training kernel hundreds of times; its factors are
        one forward and ``C`` backward passes that need not be repeated. An entry holds its input
        tensor and is reused only for that same tensor object at the same version counter: changing
        it in place invalidates the entry, and a new tensor that happens to get the freed storage
        of an old one (the CUDA caching allocator reuses blocks) is never mistaken for it.
        """
        for i, (held, version, factors) in enumerate(self._factor_cache):
            if held is x and version == x._version:
                self._factor_cache.insert(0, self._factor_cache.pop(i))
                return factors
        _ = self.structured_layers
        if x.shape[0] * self._factor_entries * self.dtype.itemsize > max_bytes:
            return None
        factors = self.structured_factors(x)
        self._factor_cache = [(x, x._version, factors), *self._factor_cache[:1]]
        return factors

    def linear_layer_factors(self, x: Tensor) -> list[tuple[Tensor, Tensor]]:
        """The historical name of :meth:`structured_factors` (conv layers included)."""
        return self.structured_factors(x)

    def _factors_chunk(self, x: Tensor) -> list[tuple[Tensor, Tensor]]:
        modules = dict(self.module.named_modules())
        inputs: dict[str, Tensor] = {}
        probes: dict[str, Tensor] = {}

        def hook(module: nn.Module, inp: tuple[Tensor, ...], out: Tensor, name: str) -> Tensor:
            inputs[name] = inp[0].detach()
            probes[name] = torch.zeros_like(out, requires_grad=True)
            return out + probes[name]

        layers = self.structured_layers
        handles = [modules[layer.name].register_forward_hook(
            lambda m, i, o, name=layer.name: hook(m, i, o, name)) for layer in layers]
        names = [layer.name for layer in layers]
        try:
            with torch.enable_grad():
                out = self._call(self.params, x)
                per_output = [torch.autograd.grad(out[:, c].sum(), [probes[n] for n in names], retain_graph=True)
                              for c in range(out.shape[1])]
        finally:
            for h in handles:
                h.remove()
        factors = []
        for i, layer in enumerate(layers):
            # shape: per output c, the cotangent of the layer output (n, d_out) or (n, d_out, *spatial)
            cot = torch.stack([g[i] for g in per_output], 1)
            if layer.kind == "linear":
                factors.append((inputs[layer.name], cot))
                continue
            patches = conv_patches(modules[layer.name], inputs[layer.name])  # shape: (n, L, d_in k)
            # shape: (n, C, d_out, *spatial) -> (n, C, L, d_out)
            cot = cot.flatten(3).transpose(2, 3)
            if cot.shape[2] != patches.shape[1]:
                raise RuntimeError(f"conv layer {layer.name!r}: {patches.shape[1]} patches for {cot.shape[2]} outputs")
            factors.append((patches, cot))
        return factors

    def iter_jacobians(self, x: Tensor, size: int, *, desc: str = "jacobian") -> Iterator[tuple[int, Tensor]]:
        """Yield ``(start, J(x[start:start+size]))`` with the Jacobian shaped ``(n, C, P)``."""
        for start, xc in self.chunks(x, size, desc=desc):
            yield start, self.jacobian_block(xc)

    def jacobian_bytes_per_example(self) -> int:
        """Bytes of one example's Jacobian, ``C * P`` entries in the network's dtype."""
        return self.num_outputs * self.num_parameters * _itemsize(self.dtype)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()

