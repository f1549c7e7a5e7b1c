"""``lstm_ext.LSTM``, ``LSTMCell``, ``GRU``, ``GRUCell``: drop-ins for their ``torch.nn`` namesakes.

They subclass torch's ``RNNBase`` / ``RNNCellBase``, so the constructor, its argument checks, the
parameter names, shapes and initialization, ``state_dict`` and ``repr`` are torch's own, and a
``state_dict`` moves between the two implementations without conversion. ``forward`` runs
lstm_ext's fused operators.

Why not subclass ``torch.nn.LSTM`` (``torch.nn.GRU``) itself: ``torch.compile`` refuses to trace
any instance of them (Dynamo graph-breaks on RNN/GRU/LSTM), which would make ``fullgraph=True``
fail.

Shapes: ``T`` time, ``N`` batch, ``C`` input size, ``H`` hidden size, ``L`` layers,
``D`` directions.
"""

from __future__ import annotations

import warnings
from typing import TypeVar, overload

import torch
from torch import Tensor
from torch.nn.modules.rnn import RNNBase, RNNCellBase
from torch.nn.utils.rnn import PackedSequence

from lstm_ext import functional
from lstm_ext import onnx as lstm_onnx
from lstm_ext.variants import LstmVariant, reset_variant_parameters

__all__ = ["GRU", "GRUCell", "LSTM", "LSTMCell"]

_Module = TypeVar("_Module", bound=torch.nn.Module)


def _converted(source: torch.nn.Module, make: type[_Module], kwargs: dict) -> _Module:
    """A new ``make(**kwargs)`` holding a copy of source's parameters.

    Built on the meta device and then materialized, so that the conversion draws nothing from the
    random number generator (the constructor's initialization would) and allocates each parameter
    once. Device, dtype, values, requires_grad and the training mode are source's.
    """
    first = next(iter(source.parameters()))
    with warnings.catch_warnings():
        # The constructor's warnings (dropout with one layer) were already given for source.
        warnings.simplefilter("ignore", UserWarning)
        target = make(**kwargs, device="meta", dtype=first.dtype)
    target = target.to_empty(device=first.device)
    target.load_state_dict(source.state_dict())
    for theirs, ours in zip(source.parameters(), target.parameters()):
        ours.requires_grad_(theirs.requires_grad)
    return target.train(source.training)


def _refuse_torch_conversion(module: torch.nn.Module, name: str) -> None:
    variant = module.variant
    if variant.changes_forward:
        raise ValueError(
            f"lstm_ext.{name}({variant.extra_repr()}) has no torch.nn.{name} equivalent: torch's "
            "LSTM has no variants"
        )


def _with_options(torch_repr: str, variant: LstmVariant) -> str:
    """torch's extra_repr, then the variant options that are on."""
    options = variant.extra_repr()
    return torch_repr + (", " + options if options else "")


def _init_new_parameters(module: torch.nn.Module, names: list[str], hidden_size: int) -> None:
    """torch's LSTM initialization, U(-1/sqrt(H), 1/sqrt(H)), for parameters added after it."""
    bound = 1.0 / hidden_size**0.5 if hidden_size > 0 else 0.0
    with torch.no_grad():
        for name in names:
            getattr(module, name).uniform_(-bound, bound)


def _add_variant_parameters(
    module: torch.nn.Module, variant: LstmVariant, suffixes: list[str], hidden_size: int,
    factory: dict, replace_weights: bool = True,
) -> list[str]:
    """Registers the variant's parameters (``<prefix><suffix>``) and, with coupled gates and
    replace_weights, replaces the 4H-row weights and biases by 3H-row ones; returns the names of
    what it created."""
    created = []
    if variant.coupled_gates and replace_weights:
        for name, param in list(module.named_parameters(recurse=False)):
            if name.startswith(("weight_ih", "weight_hh", "bias_ih", "bias_hh")):
                shape = (3 * hidden_size, *param.shape[1:])
                setattr(module, name, torch.nn.Parameter(torch.empty(shape, **factory)))
                created.append(name)
    for suffix in suffixes:
        for prefix, shape in variant.parameter_shapes(hidden_size).items():
            module.register_parameter(
                prefix + suffix, torch.nn.Parameter(torch.empty(shape, **factory))
            )
            created.append(prefix + suffix)
    return created


def _current_weights(module: RNNBase) -> list:
    """The module's flat weights as they are now, read by name rather than from the cached
    ``_flat_weights``, so that torch.func.functional_call (which swaps entries of
    ``_parameters``), parametrizations and pruning (which replace a parameter with a property or
    a plain attribute) are seen. ``_parameters`` first: ``getattr`` on a parameter goes through
    ``Module.__getattr__``, about 1 us a weight, felt at T = 1."""
    parameters = module._parameters
    weights = []
    for name in module._flat_weights_names:
        weight = parameters.get(name)
        weights.append(weight if weight is not None else getattr(module, name))
    return weights


def _lstm_config(module: RNNBase) -> dict:
    """The constructor arguments (but device and dtype) of a torch.nn.LSTM or lstm_ext.LSTM."""
    return dict(
        input_size=module.input_size,
        hidden_size=module.hidden_size,
        num_layers=module.num_layers,
        bias=module.bias,
        batch_first=module.batch_first,
        dropout=module.dropout,
        bidirectional=module.bidirectional,
        proj_size=module.proj_size,
    )


class LSTM(RNNBase):
    """Multi-layer LSTM on fused kernels; a drop-in for :class:`torch.nn.LSTM`.

    Same constructor, parameters (``weight_ih_l{k}``, ``weight_hh_l{k}``, ``bias_ih_l{k}``,
    ``bias_hh_l{k}``, ``weight_hr_l{k}`` with ``proj_size > 0``, ``*_reverse``), initialization,
    forward signature and return structure: ``output, (h_n, c_n) = lstm(input, (h_0, c_0))`` with
    input ``[T, N, C]`` (``[N, T, C]`` if batch_first), unbatched ``[T, C]``, or a
    ``PackedSequence``; output ``[T, N, D*P]`` (a ``PackedSequence`` for packed input); h_n
    ``[L*D, N, P]``, c_n ``[L*D, N, H]``, where ``P = proj_size`` or ``H`` without projections.

    Keyword-only variant options, all off by default (then the module is exactly the drop-in):
    ``peephole``, ``coupled_gates``, ``layer_norm``, ``zoneout``, ``forget_bias``; see
    :mod:`lstm_ext.variants` for what each means, its parameters and what runs it.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        peephole: bool = False,
        coupled_gates: bool = False,
        layer_norm: bool = False,
        zoneout: float = 0.0,
        forget_bias: float = 0.0,
    ) -> None:
        variant = LstmVariant(
            bool(peephole), bool(coupled_gates), bool(layer_norm), float(zoneout),
            float(forget_bias),
        )
        variant.check("LSTM", bias, proj_size)
        super().__init__(
            "LSTM",
            input_size,
            hidden_size,
            num_layers=num_layers,
            bias=bias,
            batch_first=batch_first,
            dropout=dropout,
            bidirectional=bidirectional,
            proj_size=proj_size,
            device=device,
            dtype=dtype,
        )
        # With every option off nothing below runs: same parameters and random draws as torch's.
        self.variant = variant
        created = _add_variant_parameters(
            self, variant, self._variant_suffixes(), hidden_size, {"device": device, "dtype": dtype}
        )
        if created:
            self._init_flat_weights()
            _init_new_parameters(self, created, hidden_size)
        self._reset_variant_parameters()

    def _variant_suffixes(self) -> list[str]:
        """``_l{k}`` and ``_l{k}_reverse`` in the functional layer's order (layer, direction)."""
        directions = ("", "_reverse") if self.bidirectional else ("",)
        return [f"_l{layer}{d}" for layer in range(self.num_layers) for d in directions]

    def reset_parameters(self) -> None:
        """torch's initialization, then the variant parameters' (see lstm_ext.variants)."""
        super().reset_parameters()
        if hasattr(self, "variant"):  # not yet while RNNBase.__init__ runs
            self._reset_variant_parameters()

    def _reset_variant_parameters(self) -> None:
        bias_names = [name for name in self._flat_weights_names if name.startswith("bias_ih")]
        reset_variant_parameters(
            self, self.variant, self._variant_suffixes(), self.hidden_size, bias_names
        )

    def extra_repr(self) -> str:
        return _with_options(super().extra_repr(), self.variant)

    @classmethod
    def from_torch(cls, module: torch.nn.LSTM) -> LSTM:
        """An ``lstm_ext.LSTM`` equal to ``module``, a :class:`torch.nn.LSTM`.

        Same configuration, device, dtype, parameter values, requires_grad flags and training
        mode. The parameters are copied: the two modules do not share storage afterwards.
        """
        if not isinstance(module, torch.nn.LSTM):
            raise TypeError(
                f"lstm_ext.LSTM.from_torch expects a torch.nn.LSTM, got {type(module).__name__}"
            )
        return _converted(module, cls, _lstm_config(module))

    def to_torch(self) -> torch.nn.LSTM:
        """A :class:`torch.nn.LSTM` equal to this module, e.g. for export or deployment.

        Same configuration, device, dtype, parameter values, requires_grad flags and training
        mode; the parameters are copied. A variant that changes the forward pass has no torch
        equivalent (ValueError); forget_bias alone is only an initialization and converts.
        """
        _refuse_torch_conversion(self, "LSTM")
        return _converted(self, torch.nn.LSTM, _lstm_config(self))

    def get_expected_cell_size(
        self, input: Tensor, batch_sizes: Tensor | None
    ) -> tuple[int, int, int]:
        """The shape c_0 must have: ``[L*D, N, H]`` (h_0's is ``[L*D, N, P]``)."""
        if batch_sizes is not None:
            batch = int(batch_sizes[0])
        else:
            batch = input.size(0) if self.batch_first else input.size(1)
        directions = 2 if self.bidirectional else 1
        return (self.num_layers * directions, batch, self.hidden_size)

    def check_forward_args(  # type: ignore[override]
        self, input: Tensor, hidden: tuple[Tensor, Tensor], batch_sizes: Tensor | None
    ) -> None:
        """torch.nn.LSTM's checks: input dtype, rank and size, then the shapes of h_0 and c_0."""
        self.check_input(input, batch_sizes)
        self.check_hidden_size(
            hidden[0],
            self.get_expected_hidden_size(input, batch_sizes),
            "Expected hidden[0] size {}, got {}",
        )
        self.check_hidden_size(
            hidden[1],
            self.get_expected_cell_size(input, batch_sizes),
            "Expected hidden[1] size {}, got {}",
        )

    def permute_hidden(  # type: ignore[override]
        self, hx: tuple[Tensor, Tensor], permutation: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """Reorders the batch dimension of (h, c) by ``permutation``, as torch.nn.LSTM does."""
        if permutation is None:
            return hx
        return hx[0].index_select(1, permutation), hx[1].index_select(1, permutation)

    def flatten_parameters(self) -> None:
        """Accepted for compatibility; does nothing.

        torch.nn.LSTM packs its weights into one buffer for cuDNN; lstm_ext reads each parameter
        as it is, so there is nothing to flatten.
        """

    def _zero_state(self, batch: int, input: Tensor) -> tuple[Tensor, Tensor]:
        directions = 2 if self.bidirectional else 1
        shape = (self.num_layers * directions, batch)
        real_hidden = self.proj_size if self.proj_size > 0 else self.hidden_size
        options = dict(dtype=input.dtype, device=input.device)
        c_0 = torch.zeros(*shape, self.hidden_size, **options)
        # Without projections h_0 has c_0's shape: one tensor serves as both (the ops only read
        # their initial states, and neither is ever handed to the caller), which saves an
        # allocation a call, felt at T = 1.
        if real_hidden == self.hidden_size:
            return c_0, c_0
        return torch.zeros(*shape, real_hidden, **options), c_0

    @overload
    def forward(
        self, input: Tensor, hx: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]: ...

    @overload
    def forward(
        self, input: PackedSequence, hx: tuple[Tensor, Tensor] | None = None
    ) -> tuple[PackedSequence, tuple[Tensor, Tensor]]: ...

    def forward(self, input, hx=None):  # type: ignore[override]
        """Runs the LSTM; see the class docstring for shapes. Mirrors torch.nn.LSTM.forward."""
        if isinstance(input, PackedSequence):
            return self._forward_packed(input, hx)
        if input.dim() not in (2, 3):
            raise ValueError(f"LSTM: Expected input to be 2D or 3D, got {input.dim()}D instead")
        is_batched = input.dim() == 3
        batch_dim = 0 if self.batch_first else 1
        if not is_batched:
            input = input.unsqueeze(batch_dim)
        if hx is None:
            # The zero states have the expected shapes by construction: only the input's checks.
            self.check_input(input, None)
            hx = self._zero_state(input.size(0) if self.batch_first else input.size(1), input)
        else:
            expected_dim = 3 if is_batched else 2
            if hx[0].dim() != expected_dim or hx[1].dim() != expected_dim:
                kind = "batched 3-D" if is_batched else "unbatched 2-D"
                raise RuntimeError(
                    f"For {kind} input, hx and cx should also be {expected_dim}-D but got "
                    f"({hx[0].dim()}-D, {hx[1].dim()}-D) tensors"
                )
            if not is_batched:
                hx = (hx[0].unsqueeze(1), hx[1].unsqueeze(1))
            self.check_forward_args(input, hx, None)
        output, h_n, c_n = self._run(input, hx, None)
        if not is_batched:
            return output.squeeze(batch_dim), (h_n.squeeze(1), c_n.squeeze(1))
        return output, (h_n, c_n)

    def _forward_packed(
        self, packed: PackedSequence, hx: tuple[Tensor, Tensor] | None
    ) -> tuple[PackedSequence, tuple[Tensor, Tensor]]:
        lstm_onnx.check_packed_input()  # torch.onnx.export: packing has no ONNX form here
        data, batch_sizes, sorted_indices, unsorted_indices = packed
        if hx is None:
            hx = self._zero_state(int(batch_sizes[0]), data)
        else:
            # torch.nn.LSTM skips these checks for packed input and fails later inside ATen with
            # RuntimeErrors about internals; the same checks as for padded input raise the same
            # type with a message that names the shapes.
            self.check_forward_args(data, hx, batch_sizes)
            # hx is given in the caller's batch order; the kernels run in sorted order.
            hx = self.permute_hidden(hx, sorted_indices)
        output, h_n, c_n = self._run(data, hx, batch_sizes)
        output_packed = PackedSequence(output, batch_sizes, sorted_indices, unsorted_indices)
        return output_packed, self.permute_hidden((h_n, c_n), unsorted_indices)

    def _run(
        self, input: Tensor, hx: tuple[Tensor, Tensor], batch_sizes: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        weights = _current_weights(self)
        cast_to = functional.autocast_dtype(
            input.device, packed=batch_sizes is not None, projections=self.proj_size > 0
        )
        # The variants have no torch counterpart whose autocast behaviour to copy: they run in
        # their parameters' dtype.
        if cast_to is None or self.variant.changes_forward:
            return self._lstm(input, hx, weights, batch_sizes)
        # Under torch.autocast: compute in the lower precision, as torch.nn.LSTM does.
        state_dtype = hx[1].dtype
        input = functional.autocast_cast(input, cast_to)
        hx = (functional.autocast_cast(hx[0], cast_to), functional.autocast_cast(hx[1], cast_to))
        weights = [functional.autocast_cast(w, cast_to) for w in weights]
        with torch.autocast(input.device.type, enabled=False):
            output, h_n, c_n = self._lstm(input, hx, weights, batch_sizes)
        if self.proj_size > 0 and input.device.type == "cpu":
            # torch's CPU LSTM with projections (its native path) keeps the cell state in the
            # dtype of c_0 (promoted with the gates'), so its c_n comes out in that dtype; ours
            # is computed in the lower precision and returned in that dtype.
            c_n = c_n.to(torch.promote_types(state_dtype, cast_to))
        return output, h_n, c_n

    def _lstm(
        self, input: Tensor, hx: tuple[Tensor, Tensor], weights: list[Tensor],
        batch_sizes: Tensor | None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        variant, variant_weights = None, None
        if self.variant.changes_forward:
            variant = self.variant
            prefixes = variant.parameter_shapes(self.hidden_size)
            variant_weights = [
                {prefix: getattr(self, prefix + suffix) for prefix in prefixes}
                for suffix in self._variant_suffixes()
            ]
        return functional.lstm(
            input,
            hx,
            weights,
            self.bias,
            self.num_layers,
            self.dropout,
            self.training,
            self.bidirectional,
            self.batch_first,
            batch_sizes=batch_sizes,
            variant=variant,
            variant_weights=variant_weights,
        )


class LSTMCell(RNNCellBase):
    """One LSTM step on fused kernels; a drop-in for :class:`torch.nn.LSTMCell`.

    ``h_1, c_1 = cell(input, (h_0, c_0))`` with input ``[N, C]`` or unbatched ``[C]``, states
    ``[N, H]`` (or ``[H]``). Parameters ``weight_ih [4H, C]``, ``weight_hh [4H, H]``, ``bias_ih``,
    ``bias_hh [4H]``, initialized as torch's.

    The variant options of :class:`LSTM`, keyword-only; the cell's variant parameters have no
    ``_l{k}`` suffix (``peephole``, ``layer_norm_weight_ih``, ...).
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        peephole: bool = False,
        coupled_gates: bool = False,
        layer_norm: bool = False,
        zoneout: float = 0.0,
        forget_bias: float = 0.0,
    ) -> None:
        variant = LstmVariant(
            bool(peephole), bool(coupled_gates), bool(layer_norm), float(zoneout),
            float(forget_bias),
        )
        variant.check("LSTMCell", bias, 0)
        super().__init__(
            input_size, hidden_size, bias, num_chunks=variant.gates, device=device, dtype=dtype
        )
        self.variant = variant
        # RNNCellBase made the weights with the variant's gate count already.
        created = _add_variant_parameters(
            self, variant, [""], hidden_size, {"device": device, "dtype": dtype},
            replace_weights=False,
        )
        _init_new_parameters(self, created, hidden_size)
        self._reset_variant_parameters()

    def reset_parameters(self) -> None:
        """torch's initialization, then the variant parameters' (see lstm_ext.variants)."""
        super().reset_parameters()
        if hasattr(self, "variant"):  # not yet while RNNCellBase.__init__ runs
            self._reset_variant_parameters()

    def _reset_variant_parameters(self) -> None:
        bias_names = ["bias_ih"] if self.bias else []
        reset_variant_parameters(self, self.variant, [""], self.hidden_size, bias_names)

    def extra_repr(self) -> str:
        return _with_options(super().extra_repr(), self.variant)

    @classmethod
    def from_torch(cls, module: torch.nn.LSTMCell) -> LSTMCell:
        """An ``lstm_ext.LSTMCell`` equal to ``module``, a :class:`torch.nn.LSTMCell`.

        Same sizes, bias, device, dtype, parameter values, requires_grad flags and training
        mode; the parameters are copied.
        """
        if not isinstance(module, torch.nn.LSTMCell):
            raise TypeError(
                "lstm_ext.LSTMCell.from_torch expects a torch.nn.LSTMCell, got "
                f"{type(module).__name__}"
            )
        config = dict(input_size=module.input_size, hidden_size=module.hidden_size,
                      bias=module.bias)
        return _converted(module, cls, config)

    def to_torch(self) -> torch.nn.LSTMCell:
        """A :class:`torch.nn.LSTMCell` equal to this cell; the parameters are copied."""
        _refuse_torch_conversion(self, "LSTMCell")
        config = dict(input_size=self.input_size, hidden_size=self.hidden_size, bias=self.bias)
        return _converted(self, torch.nn.LSTMCell, config)

    def forward(  # type: ignore[override]
        self, input: Tensor, hx: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, Tensor]:
        if input.dim() not in (1, 2):
            raise ValueError(
                f"LSTMCell: Expected input to be 1D or 2D, got {input.dim()}D instead"
            )
        if hx is not None:
            for index, state in enumerate(hx):
                if state.dim() not in (1, 2):
                    raise ValueError(
                        f"LSTMCell: Expected hx[{index}] to be 1D or 2D, got {state.dim()}D instead"
                    )
        is_batched = input.dim() == 2
        if not is_batched:
            input = input.unsqueeze(0)
        if hx is None:
            zeros = torch.zeros(
                input.size(0), self.hidden_size, dtype=input.dtype, device=input.device
            )
            hx = (zeros, zeros)
        elif not is_batched:
            hx = (hx[0].unsqueeze(0), hx[1].unsqueeze(0))
        weights = (self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)
        cast_to = functional.autocast_dtype(input.device, cell=True)
        if self.variant.changes_forward:
            prefixes = self.variant.parameter_shapes(self.hidden_size)
            extras = {prefix: getattr(self, prefix) for prefix in prefixes}
            h, c = functional.lstm_cell(
                input, hx, *weights, variant=self.variant, variant_weights=extras,
                train=self.training,
            )
        elif cast_to is None:
            h, c = functional.lstm_cell(input, hx, *weights)
        else:
            # Under torch.autocast on CUDA, lstm_cell computes in the lower precision.
            input = functional.autocast_cast(input, cast_to)
            hx = tuple(functional.autocast_cast(state, cast_to) for state in hx)
            weights = tuple(functional.autocast_cast(w, cast_to) for w in weights)
            with torch.autocast(input.device.type, enabled=False):
                h, c = functional.lstm_cell(input, hx, *weights)
        if not is_batched:
            return h.squeeze(0), c.squeeze(0)
        return h, c


def _gru_config(module: RNNBase) -> dict:
    """The constructor arguments (but device and dtype) of a torch.nn.GRU or lstm_ext.GRU."""
    return dict(
        input_size=module.input_size,
        hidden_size=module.hidden_size,
        num_layers=module.num_layers,
        bias=module.bias,
        batch_first=module.batch_first,
        dropout=module.dropout,
        bidirectional=module.bidirectional,
    )


def _gru_autocast(
    device: torch.device, state_dtype: torch.dtype
) -> tuple[torch.dtype | None, torch.dtype | None]:
    """How torch.nn.GRU and GRUCell run under torch.autocast: (cast_to, result_dtype).

    Measured on torch 2.13. On CUDA, cuDNN's GRU (and ``gru_cell``) is on the lower-precision
    list: everything is cast, cast_to is the autocast dtype, as for the LSTM. On the CPU no GRU
    op is on a list; torch's native GRU autocasts only its GEMMs, whose results meet the hidden
    state in the pointwise math, so its outputs come out in
    ``promote_types(autocast dtype, h_0's dtype)`` (float32 for a float32 or absent h_0), padded
    or packed, GRU or GRUCell alike. lstm_ext computes in the weights' dtype there (cast_to None:
    lower-precision inputs and states are cast up to it) and returns that result dtype.
    (None, None) when autocast is off for the device.
    """
    kind = device.type
    if kind not in ("cpu", "cuda") or not torch.is_autocast_enabled(kind):
        return None, None
    lower = torch.get_autocast_dtype(kind)
    if kind == "cuda":
        return lower, None
    if not state_dtype.is_floating_point or state_dtype == torch.float64:
        return None, None  # autocast leaves it alone
    return None, torch.promote_types(lower, state_dtype)


def _to_compute_dtype(tensor: Tensor, dtype: torch.dtype) -> Tensor:
    # Under CPU autocast: a lower-precision input or state joins the weights' dtype.
    if tensor.dtype != dtype and tensor.is_floating_point() and tensor.dtype != torch.float64:
        return tensor.to(dtype)
    return tensor


class GRU(RNNBase):
    """Multi-layer GRU on fused kernels; a drop-in for :class:`torch.nn.GRU`.

    Same constructor, parameters (``weight_ih_l{k}`` ``[3H, C_k]``, ``weight_hh_l{k}``
    ``[3H, H]``, ``bias_ih_l{k}``, ``bias_hh_l{k}`` ``[3H]``, ``*_reverse``; gates r, z, n),
    initialization, forward signature and return structure: ``output, h_n = gru(input, h_0)``
    with input ``[T, N, C]`` (``[N, T, C]`` if batch_first), unbatched ``[T, C]``, or a
    ``PackedSequence``; output ``[T, N, D*H]`` (a ``PackedSequence`` for packed input); h_n
    ``[L*D, N, H]``.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            "GRU",
            input_size,
            hidden_size,
            num_layers=num_layers,
            bias=bias,
            batch_first=batch_first,
            dropout=dropout,
            bidirectional=bidirectional,
            device=device,
            dtype=dtype,
        )

    @classmethod
    def from_torch(cls, module: torch.nn.GRU) -> GRU:
        """An ``lstm_ext.GRU`` equal to ``module``, a :class:`torch.nn.GRU`.

        Same configuration, device, dtype, parameter values, requires_grad flags and training
        mode. The parameters are copied: the two modules do not share storage afterwards.
        """
        if not isinstance(module, torch.nn.GRU):
            raise TypeError(
                f"lstm_ext.GRU.from_torch expects a torch.nn.GRU, got {type(module).__name__}"
            )
        return _converted(module, cls, _gru_config(module))

    def to_torch(self) -> torch.nn.GRU:
        """A :class:`torch.nn.GRU` equal to this module, e.g. for export or deployment.

        Same configuration, device, dtype, parameter values, requires_grad flags and training
        mode; the parameters are copied.
        """
        return _converted(self, torch.nn.GRU, _gru_config(self))

    def flatten_parameters(self) -> None:
        """Accepted for compatibility; does nothing (lstm_ext reads each parameter as it is)."""

    def _zero_state(self, batch: int | Tensor, input: Tensor) -> Tensor:
        directions = 2 if self.bidirectional else 1
        return torch.zeros(
            self.num_layers * directions, batch, self.hidden_size,
            dtype=input.dtype, device=input.device,
        )

    @overload
    def forward(self, input: Tensor, hx: Tensor | None = None) -> tuple[Tensor, Tensor]: ...

    @overload
    def forward(
        self, input: PackedSequence, hx: Tensor | None = None
    ) -> tuple[PackedSequence, Tensor]: ...

    def forward(self, input, hx=None):  # type: ignore[override]
        """Runs the GRU; see the class docstring for shapes. Mirrors torch.nn.GRU.forward."""
        if isinstance(input, PackedSequence):
            return self._forward_packed(input, hx)
        if input.dim() not in (2, 3):
            raise ValueError(f"GRU: Expected input to be 2D or 3D, got {input.dim()}D instead")
        is_batched = input.dim() == 3
        batch_dim = 0 if self.batch_first else 1
        if not is_batched:
            input = input.unsqueeze(batch_dim)
            if hx is not None:
                if hx.dim() != 2:
                    raise RuntimeError(
                        f"For unbatched 2-D input, hx should also be 2-D but got {hx.dim()}-D "
                        "tensor"
                    )
                hx = hx.unsqueeze(1)
        elif hx is not None and hx.dim() != 3:
            raise RuntimeError(
                f"For batched 3-D input, hx should also be 3-D but got {hx.dim()}-D tensor"
            )
        if hx is None:
            hx = self._zero_state(input.size(0) if self.batch_first else input.size(1), input)
        self.check_forward_args(input, hx, None)
        output, h_n = self._run(input, hx, None)
        if not is_batched:
            return output.squeeze(batch_dim), h_n.squeeze(1)
        return output, h_n

    def _forward_packed(
        self, packed: PackedSequence, hx: Tensor | None
    ) -> tuple[PackedSequence, Tensor]:
        lstm_onnx.check_packed_input()  # torch.onnx.export: packing has no ONNX form here
        data, batch_sizes, sorted_indices, unsorted_indices = packed
        if hx is None:
            hx = self._zero_state(int(batch_sizes[0]), data)
        else:
            # hx is given in the caller's batch order; the kernels run in sorted order. torch
            # permutes before it checks, so a mistake gets torch's answer.
            hx = self.permute_hidden(hx, sorted_indices)
        self.check_forward_args(data, hx, batch_sizes)
        output, h_n = self._run(data, hx, batch_sizes)
        output_packed = PackedSequence(output, batch_sizes, sorted_indices, unsorted_indices)
        return output_packed, self.permute_hidden(h_n, unsorted_indices)

    def _run(
        self, input: Tensor, hx: Tensor, batch_sizes: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        weights = _current_weights(self)
        cast_to, result_dtype = _gru_autocast(input.device, hx.dtype)
        if cast_to is None and result_dtype is None:
            return self._gru(input, hx, weights, batch_sizes)
        if cast_to is not None:
            # CUDA: compute in the lower precision, as cuDNN's GRU does under autocast.
            input = functional.autocast_cast(input, cast_to)
            hx = functional.autocast_cast(hx, cast_to)
            weights = [functional.autocast_cast(w, cast_to) for w in weights]
        else:
            input = _to_compute_dtype(input, weights[0].dtype)
            hx = _to_compute_dtype(hx, weights[0].dtype)
        with torch.autocast(input.device.type, enabled=False):
            output, h_n = self._gru(input, hx, weights, batch_sizes)
        if result_dtype is not None:
            output, h_n = output.to(result_dtype), h_n.to(result_dtype)
        return output, h_n

    def _gru(
        self, input: Tensor, hx: Tensor, weights: list[Tensor], batch_sizes: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        return functional.gru(
            input,
            hx,
            weights,
            self.bias,
            self.num_layers,
            self.dropout,
            self.training,
            self.bidirectional,
            self.batch_first,
            batch_sizes=batch_sizes,
        )


class GRUCell(RNNCellBase):
    """One GRU step on fused kernels; a drop-in for :class:`torch.nn.GRUCell`.

    ``h_1 = cell(input, h_0)`` with input ``[N, C]`` or unbatched ``[C]``, state ``[N, H]`` (or
    ``[H]``). Parameters ``weight_ih [3H, C]``, ``weight_hh [3H, H]``, ``bias_ih``,
    ``bias_hh [3H]``, initialized as torch's.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(input_size, hidden_size, bias, num_chunks=3, device=device, dtype=dtype)

    @classmethod
    def from_torch(cls, module: torch.nn.GRUCell) -> GRUCell:
        """An ``lstm_ext.GRUCell`` equal to ``module``, a :class:`torch.nn.GRUCell`.

        Same sizes, bias, device, dtype, parameter values, requires_grad flags and training
        mode; the parameters are copied.
        """
        if not isinstance(module, torch.nn.GRUCell):
            raise TypeError(
                "lstm_ext.GRUCell.from_torch expects a torch.nn.GRUCell, got "
                f"{type(module).__name__}"
            )
        config = dict(input_size=module.input_size, hidden_size=module.hidden_size,
                      bias=module.bias)
        return _converted(module, cls, config)

    def to_torch(self) -> torch.nn.GRUCell:
        """A :class:`torch.nn.GRUCell` equal to this cell; the parameters are copied."""
        config = dict(input_size=self.input_size, hidden_size=self.hidden_size, bias=self.bias)
        return _converted(self, torch.nn.GRUCell, config)

    def forward(self, input: Tensor, hx: Tensor | None = None) -> Tensor:  # type: ignore[override]
        """One step; mirrors torch.nn.GRUCell.forward."""
        if input.dim() not in (1, 2):
            raise ValueError(f"GRUCell: Expected input to be 1D or 2D, got {input.dim()}D instead")
        if hx is not None and hx.dim() not in (1, 2):
            raise ValueError(f"GRUCell: Expected hidden to be 1D or 2D, got {hx.dim()}D instead")
        is_batched = input.dim() == 2
        if not is_batched:
            input = input.unsqueeze(0)
        if hx is None:
            hx = torch.zeros(
                input.size(0), self.hidden_size, dtype=input.dtype, device=input.device
            )
        elif not is_batched:
            hx = hx.unsqueeze(0)
        # Read by name, for torch.func.functional_call.
        weights = (self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)
        cast_to, result_dtype = _gru_autocast(input.device, hx.dtype)
        if cast_to is None and result_dtype is None:
            h = functional.gru_cell(input, hx, *weights)
        else:
            if cast_to is not None:
                # CUDA: gru_cell is on autocast's lower-precision list.
                input = functional.autocast_cast(input, cast_to)
                hx = functional.autocast_cast(hx, cast_to)
                weights = tuple(functional.autocast_cast(w, cast_to) for w in weights)
            else:
                input = _to_compute_dtype(input, self.weight_ih.dtype)
                hx = _to_compute_dtype(hx, self.weight_ih.dtype)
            with torch.autocast(input.device.type, enabled=False):
                h = functional.gru_cell(input, hx, *weights)
            if result_dtype is not None:
                h = h.to(result_dtype)
        if not is_batched:
            return h.squeeze(0)
        return h
