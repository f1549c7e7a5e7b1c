"""LSTM with projections (proj_size > 0) and PackedSequence input against torch.nn.LSTM.

Outputs, final states and every gradient (input, h_0, c_0, each parameter), both directions,
several layers, sorted and unsorted packed batches, with and without an initial state.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close, paired_lstms
from test_modules import _OpRecorder
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

import lstm_ext

DTYPES = [torch.float64, torch.float32]


def _loss(output: torch.Tensor, h_n: torch.Tensor, c_n: torch.Tensor) -> torch.Tensor:
    # Distinct weights per output so that a gradient routed to the wrong place shows.
    return output.square().sum() + (2 * h_n).sum() + (c_n * c_n.detach().sign()).sum()


def _compare(theirs, ours, make_input, hx, dtype, leaves) -> None:
    """Runs both modules on the same input; compares outputs, states and the leaves' gradients."""
    results = []
    for module in (theirs, ours):
        x = make_input()
        output, (h_n, c_n) = module(x, hx) if hx is not None else module(x)
        if isinstance(output, PackedSequence):
            assert isinstance(x, PackedSequence)
            assert torch.equal(output.batch_sizes, x.batch_sizes)
            for a, b in ((output.sorted_indices, x.sorted_indices),
                         (output.unsorted_indices, x.unsorted_indices)):
                assert (a is None and b is None) or torch.equal(a, b)
            output = output.data
        grads = torch.autograd.grad(_loss(output, h_n, c_n), [*leaves, *module.parameters()])
        results.append((output, h_n, c_n, *grads))
    names = ["output", "h_n", "c_n", *(f"grad of leaf {i}" for i in range(len(leaves))),
             *(f"grad of {n}" for n, _ in ours.named_parameters())]
    for name, e, a in zip(names, *results):
        assert a.shape == e.shape, name
        assert_close(a, e, dtype, name)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "num_layers,bidirectional,batch_first,bias,with_state",
    [
        (1, False, False, True, True),
        (1, True, False, True, False),
        (2, False, True, False, True),
        (2, True, True, True, True),
        (3, True, False, False, False),
    ],
)
def test_projection_parity(dtype, num_layers, bidirectional, batch_first, bias, with_state):
    steps, batch, features, hidden, proj = 5, 3, 4, 7, 3
    theirs, ours = paired_lstms(dtype, input_size=features, hidden_size=hidden,
                                num_layers=num_layers, bias=bias, batch_first=batch_first,
                                bidirectional=bidirectional, proj_size=proj)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    directions = 2 if bidirectional else 1
    x = torch.randn((batch, steps, features) if batch_first else (steps, batch, features),
                    dtype=dtype, requires_grad=True)
    hx = None
    if with_state:
        hx = (torch.randn(num_layers * directions, batch, proj, dtype=dtype, requires_grad=True),
              torch.randn(num_layers * directions, batch, hidden, dtype=dtype,
                          requires_grad=True))
    _compare(theirs, ours, lambda: x, hx, dtype, [x, *(hx or ())])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_projection_unbatched_and_hidden_sizes_around_simd_width(dtype):
    # 8/16 floats per AVX2/AVX-512 vector: H = 17 has a vector body and a tail; P = 1 is the
    # narrowest recurrent GEMM.
    for hidden, proj in ((17, 1), (16, 9)):
        theirs, ours = paired_lstms(dtype, input_size=3, hidden_size=hidden, num_layers=2,
                                    bidirectional=True, proj_size=proj)
        x = torch.randn(4, 3, dtype=dtype, requires_grad=True)
        hx = (torch.randn(4, proj, dtype=dtype, requires_grad=True),
              torch.randn(4, hidden, dtype=dtype, requires_grad=True))
        _compare(theirs, ours, lambda x=x: x, hx, dtype, [x, *hx])


def test_projection_state_dict_and_repr_match_torch():
    theirs = torch.nn.LSTM(4, 6, num_layers=2, bidirectional=True, proj_size=2)
    ours = lstm_ext.LSTM(4, 6, num_layers=2, bidirectional=True, proj_size=2)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in theirs.state_dict().items()
    }
    assert ours.weight_hr_l1_reverse.shape == (2, 6)
    assert repr(ours) == repr(theirs)


PACKED_CASES = [
    # (num_layers, bidirectional, enforce_sorted, proj_size, with_state, lengths)
    (1, False, True, 0, False, [6, 4, 4, 1]),
    (1, True, True, 0, True, [6, 6, 6, 6]),
    (2, True, False, 0, True, [3, 6, 1, 4]),
    (2, False, False, 0, False, [2, 5, 5, 6]),
    (3, True, False, 2, True, [1, 6, 3, 6]),
    (2, True, True, 3, False, [6, 5, 2, 1]),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "num_layers,bidirectional,enforce_sorted,proj,with_state,lengths", PACKED_CASES
)
@pytest.mark.parametrize("batch_first", [False, True])
def test_packed_parity(dtype, num_layers, bidirectional, enforce_sorted, proj, with_state,
                       lengths, batch_first):
    hidden, features, batch, steps = 5, 3, len(lengths), max(lengths)
    theirs, ours = paired_lstms(dtype, input_size=features, hidden_size=hidden,
                                num_layers=num_layers, bidirectional=bidirectional,
                                batch_first=batch_first, proj_size=proj)
    padded = torch.randn((batch, steps, features) if batch_first else (steps, batch, features),
                         dtype=dtype, requires_grad=True)

    def make_input() -> PackedSequence:
        return pack_padded_sequence(padded, lengths, batch_first=batch_first,
                                    enforce_sorted=enforce_sorted)

    directions = 2 if bidirectional else 1
    hx = None
    if with_state:
        # In the caller's batch order: the module permutes it to the packed (sorted) order.
        hx = (torch.randn(num_layers * directions, batch, proj or hidden, dtype=dtype,
                          requires_grad=True),
              torch.randn(num_layers * directions, batch, hidden, dtype=dtype,
                          requires_grad=True))
    _compare(theirs, ours, make_input, hx, dtype, [padded, *(hx or ())])


def test_packed_final_states_are_each_sequences_last_step():
    # h_n of the forward direction at each sequence's own last step, of the reverse direction at
    # t = 0; in the caller's batch order (unsorted_indices applied).
    lstm = lstm_ext.LSTM(3, 4, bidirectional=True).double()
    lengths = [2, 5, 3]
    padded = torch.randn(5, 3, 3, dtype=torch.float64)
    output, (h_n, c_n) = lstm(pack_padded_sequence(padded, lengths, enforce_sorted=False))
    unpacked, out_lengths = pad_packed_sequence(output)
    assert out_lengths.tolist() == lengths
    for n, length in enumerate(lengths):
        torch.testing.assert_close(h_n[0, n], unpacked[length - 1, n, :4], rtol=0, atol=0)
        torch.testing.assert_close(h_n[1, n], unpacked[0, n, 4:], rtol=0, atol=0)
        # Each sequence alone gives the same result: padding never leaks into it.
        alone, (h_alone, c_alone) = lstm(padded[:length, n : n + 1])
        torch.testing.assert_close(alone[:, 0], unpacked[:length, n], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(h_alone[:, 0], h_n[:, n], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(c_alone[:, 0], c_n[:, n], rtol=1e-12, atol=1e-12)


def test_packed_runs_one_op_per_layer_and_direction():
    # The packed batch runs in the kernels' time loop, not one sequence at a time.
    lstm = lstm_ext.LSTM(3, 4, num_layers=2, bidirectional=True, proj_size=2)
    padded = torch.randn(6, 5, 3, requires_grad=True)
    packed = pack_padded_sequence(padded, [6, 5, 3, 3, 1])
    with _OpRecorder() as recorder:
        output, (h_n, _) = lstm(packed)
        (output.data.sum() + h_n.sum()).backward()
    assert recorder.ops.count("lstm_ext.lstm_forward.default") == 4
    assert recorder.ops.count("lstm_ext._lstm_backward.default") == 4


def test_packed_dropout_matches_torch_native_path():
    theirs, ours = paired_lstms(torch.float64, input_size=3, hidden_size=4, num_layers=3,
                                dropout=0.5, bidirectional=True)
    packed = pack_padded_sequence(torch.randn(5, 4, 3, dtype=torch.float64), [5, 4, 2, 2])
    with torch.backends.mkldnn.flags(enabled=False):
        torch.manual_seed(5)
        expected = theirs(packed)
    torch.manual_seed(5)
    actual = ours(packed)
    assert_close(actual[0].data, expected[0].data, torch.float64, "packed output with dropout")
    assert_close(actual[1][0], expected[1][0], torch.float64, "h_n with dropout")


def test_packed_bad_hidden_state_raises_runtime_error_like_torch():
    # torch.nn.LSTM raises RuntimeErrors from ATen internals for these; ours are RuntimeErrors
    # with the shape check torch uses for padded input.
    packed = pack_padded_sequence(torch.randn(5, 3, 4), [5, 3, 2])
    cases = {
        "h batch": (torch.zeros(2, 2, 3), torch.zeros(2, 3, 3)),
        "h hidden": (torch.zeros(2, 3, 5), torch.zeros(2, 3, 3)),
        "layers": (torch.zeros(1, 3, 3), torch.zeros(2, 3, 3)),
        "c hidden": (torch.zeros(2, 3, 3), torch.zeros(2, 3, 4)),
    }
    for hx in cases.values():
        with pytest.raises(RuntimeError):
            torch.nn.LSTM(4, 3, 2)(packed, hx)
        with pytest.raises(RuntimeError, match=r"Expected hidden\[[01]\] size"):
            lstm_ext.LSTM(4, 3, 2)(packed, hx)
