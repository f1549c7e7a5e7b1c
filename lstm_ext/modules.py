"""``lstm_ext.LSTM`` and ``lstm_ext.LSTMCell``: drop-ins for ``torch.nn.LSTM`` / ``torch.nn.LSTMCell``.

They subclass torch's ``RNNBase`` / ``RNNCellBase``, so the constructor, its argument checks, the
parameter names, shapes and initialization, ``state_dict``, ``repr`` and ``flatten_parameters()`` are
torch's own, and a ``state_dict`` moves between the two implementations without conversion. Only
``forward`` differs: it runs lstm_ext's fused operators.

Why not subclass ``torch.nn.LSTM`` itself: ``torch.compile`` refuses to trace any instance of
``torch.nn.LSTM`` (Dynamo graph-breaks on RNN/GRU/LSTM), which would make ``fullgraph=True`` fail.

Shapes: ``T`` time, ``N`` batch, ``C`` input size, ``H`` hidden size, ``L`` layers, ``D`` directions.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.modules.rnn import RNNBase, RNNCellBase
from torch.nn.utils.rnn import PackedSequence

from lstm_ext import functional

__all__ = ["LSTM", "LSTMCell"]


class LSTM(RNNBase):
    """Multi-layer LSTM on fused kernels; a drop-in for :class:`torch.nn.LSTM`.

    Same constructor, parameters (``weight_ih_l{k}``, ``weight_hh_l{k}``, ``bias_ih_l{k}``,
    ``bias_hh_l{k}``, ``*_reverse``), initialization, forward signature and return structure:
    ``output, (h_n, c_n) = lstm(input, (h_0, c_0))`` with input ``[T, N, C]`` (``[N, T, C]`` if
    batch_first) or unbatched ``[T, C]``; output ``[T, N, D*H]``; h_n, c_n ``[L*D, N, H]``.

    Not yet supported: ``proj_size > 0`` and ``PackedSequence`` input (``NotImplementedError``).
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
    ) -> None:
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
        if self.proj_size > 0:
            raise NotImplementedError(
                "lstm_ext.LSTM does not support proj_size > 0 (LSTM with projections) yet; "
                "use torch.nn.LSTM for projections"
            )

    def check_forward_args(  # type: ignore[override]
        self, input: Tensor, hidden: tuple[Tensor, Tensor], batch_sizes: Tensor | None
    ) -> None:
        """torch.nn.LSTM's checks: input dtype, rank and size, then the shapes of h_0 and c_0."""
        self.check_input(input, batch_sizes)
        expected = self.get_expected_hidden_size(input, batch_sizes)
        self.check_hidden_size(hidden[0], expected, "Expected hidden[0] size {}, got {}")
        self.check_hidden_size(hidden[1], expected, "Expected hidden[1] size {}, got {}")

    def forward(  # type: ignore[override]
        self, input: Tensor, hx: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        if isinstance(input, PackedSequence):
            raise NotImplementedError(
                "lstm_ext.LSTM does not support PackedSequence input yet; pass a padded tensor "
                "or use torch.nn.LSTM for packed sequences"
            )
        if input.dim() not in (2, 3):
            raise ValueError(f"LSTM: Expected input to be 2D or 3D, got {input.dim()}D instead")
        is_batched = input.dim() == 3
        batch_dim = 0 if self.batch_first else 1
        if not is_batched:
            input = input.unsqueeze(batch_dim)
        if hx is None:
            batch = input.size(0) if self.batch_first else input.size(1)
            directions = 2 if self.bidirectional else 1
            zeros = torch.zeros(
                self.num_layers * directions,
                batch,
                self.hidden_size,
                dtype=input.dtype,
                device=input.device,
            )
            hx = (zeros, zeros)
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

        # Read the parameters by name, not from the cached _flat_weights, so that
        # torch.func.functional_call and parametrizations see the tensors they substitute.
        weights = [getattr(self, name) for name in self._flat_weights_names]
        output, h_n, c_n = functional.lstm(
            input,
            hx,
            weights,
            self.bias,
            self.num_layers,
            self.dropout,
            self.training,
            self.bidirectional,
            self.batch_first,
        )
        if not is_batched:
            return output.squeeze(batch_dim), (h_n.squeeze(1), c_n.squeeze(1))
        return output, (h_n, c_n)


class LSTMCell(RNNCellBase):
    """One LSTM step on fused kernels; a drop-in for :class:`torch.nn.LSTMCell`.

    ``h_1, c_1 = cell(input, (h_0, c_0))`` with input ``[N, C]`` or unbatched ``[C]``, states
    ``[N, H]`` (or ``[H]``). Parameters ``weight_ih [4H, C]``, ``weight_hh [4H, H]``, ``bias_ih``,
    ``bias_hh [4H]``, initialized as torch's.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(input_size, hidden_size, bias, num_chunks=4, device=device, dtype=dtype)

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
        h, c = functional.lstm_cell(
            input, hx, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh
        )
        if not is_batched:
            return h.squeeze(0), c.squeeze(0)
        return h, c
