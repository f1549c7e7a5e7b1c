"""Module hygiene: serialization, copies, dtype/device moves, conversions to and from torch.nn,
train()/eval(), flatten_parameters(), repr, torch.func.functional_call."""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
from conftest import assert_close, paired_lstms

import lstm_ext

CONFIG = dict(input_size=4, hidden_size=6, num_layers=2, bidirectional=True, proj_size=3,
              batch_first=True)


def _outputs(module: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    output, (h_n, c_n) = module(x)
    return [output, h_n, c_n]


def _assert_same_module(a: torch.nn.Module, b: torch.nn.Module) -> None:
    assert type(a) is type(b)
    assert repr(a) == repr(b)
    assert a.training == b.training
    for (name_a, p_a), (name_b, p_b) in zip(a.named_parameters(), b.named_parameters(),
                                            strict=True):
        assert name_a == name_b
        assert torch.equal(p_a, p_b) and p_a.dtype == p_b.dtype, name_a
        assert p_a.requires_grad == p_b.requires_grad, name_a
    x = torch.randn(2, 5, 4, dtype=next(a.parameters()).dtype)
    for out_a, out_b in zip(_outputs(a, x), _outputs(b, x)):
        assert torch.equal(out_a, out_b)


def test_torch_save_load_module_and_state_dict(tmp_path):
    lstm = lstm_ext.LSTM(**CONFIG).eval()
    # The module: pickled by reference to lstm_ext.LSTM, like any nn.Module (so, as for
    # torch.nn.LSTM, torch.load needs weights_only=False, for trusted files only).
    torch.save(lstm, tmp_path / "module.pt")
    _assert_same_module(lstm, torch.load(tmp_path / "module.pt", weights_only=False))
    # The state_dict: tensors only, loadable with weights_only=True, interchangeable with
    # torch.nn.LSTM's in both directions.
    torch.save(lstm.state_dict(), tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    theirs = torch.nn.LSTM(**CONFIG).eval()
    theirs.load_state_dict(state)
    fresh = lstm_ext.LSTM(**CONFIG).eval()
    fresh.load_state_dict(theirs.state_dict())
    _assert_same_module(lstm, fresh)


def test_pickle_and_deepcopy():
    lstm = lstm_ext.LSTM(**CONFIG)
    _assert_same_module(lstm, pickle.loads(pickle.dumps(lstm)))
    clone = copy.deepcopy(lstm)
    _assert_same_module(lstm, clone)
    # A deep copy owns its parameters.
    with torch.no_grad():
        clone.weight_ih_l0.add_(1)
    assert not torch.equal(clone.weight_ih_l0, lstm.weight_ih_l0)
    cell = lstm_ext.LSTMCell(3, 5)
    cell_copy = pickle.loads(pickle.dumps(cell))
    x = torch.randn(2, 3)
    assert torch.equal(cell_copy(x)[0], cell(x)[0])


def test_dtype_moves_match_torch():
    theirs, ours = paired_lstms(torch.float32, **CONFIG)
    x = torch.randn(2, 5, 4, dtype=torch.float64, requires_grad=True)
    theirs.double()
    ours.double()
    assert all(p.dtype == torch.float64 for p in ours.parameters())
    for a, e in zip(_outputs(ours, x), _outputs(theirs, x)):
        assert_close(a, e, torch.float64, "after .double()")
    ours.to(torch.float32)
    theirs.to(torch.float32)
    assert all(p.dtype == torch.float32 for p in ours.parameters())
    for a, e in zip(_outputs(ours, x.float()), _outputs(theirs, x.float())):
        assert_close(a, e, torch.float32, "after .to(float32)")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_and_bfloat16_parameters_on_cpu(dtype):
    # Error against a float64 run at most twice torch.nn.LSTM's in the same dtype.
    theirs, ours = paired_lstms(torch.float32, input_size=8, hidden_size=16, num_layers=2)
    x = torch.randn(12, 3, 8)
    reference = copy.deepcopy(theirs).double()(x.double())
    ours.to(dtype)
    theirs.to(dtype)
    actual, expected = ours(x.to(dtype)), theirs(x.to(dtype))
    assert actual[0].dtype == dtype and actual[1][1].dtype == dtype
    for a, e, r in ((actual[0], expected[0], reference[0]), (actual[1][1], expected[1][1],
                                                            reference[1][1])):
        our_error = (a.double() - r).abs().max()
        their_error = (e.double() - r).abs().max()
        assert our_error <= 2 * their_error + 1e-3, (our_error, their_error)
    # Training works in the reduced dtype too.
    loss = ours(x.to(dtype))[0].float().square().sum()
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == dtype for p in ours.parameters())


def test_meta_device_shapes():
    lstm = lstm_ext.LSTM(**CONFIG).to("meta")
    output, (h_n, c_n) = lstm(torch.empty(2, 5, 4, device="meta"))
    assert output.device.type == "meta"
    assert output.shape == (2, 5, 6) and h_n.shape == (4, 2, 3) and c_n.shape == (4, 2, 6)


def test_flatten_parameters_is_a_no_op():
    lstm = lstm_ext.LSTM(**CONFIG)
    before = [(p.data_ptr(), p.clone()) for p in lstm.parameters()]
    lstm.flatten_parameters()
    for (ptr, value), p in zip(before, lstm.parameters()):
        assert p.data_ptr() == ptr and torch.equal(p, value)


@pytest.mark.parametrize(
    "config",
    [
        dict(input_size=4, hidden_size=6),
        dict(input_size=4, hidden_size=6, num_layers=3, bias=False, batch_first=True,
             dropout=0.25, bidirectional=True, proj_size=2),
    ],
)
def test_repr_like_torch(config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        assert repr(lstm_ext.LSTM(**config)) == repr(torch.nn.LSTM(**config))


def test_train_eval_dropout_semantics_match_torch():
    theirs, ours = paired_lstms(torch.float64, input_size=3, hidden_size=5, num_layers=2,
                                dropout=0.4)
    x = torch.randn(6, 4, 3, dtype=torch.float64)
    assert ours.training and theirs.training
    # eval(): no dropout, deterministic, equal to torch.
    ours.eval()
    theirs.eval()
    assert torch.equal(ours(x)[0], ours(x)[0])
    assert_close(ours(x)[0], theirs(x)[0], torch.float64, "eval")
    # train(): dropout between layers only; the same masks as torch's native path for a seed.
    ours.train()
    theirs.train()
    torch.manual_seed(3)
    first = ours(x)[0]
    torch.manual_seed(3)
    assert torch.equal(ours(x)[0], first)
    with torch.backends.mkldnn.flags(enabled=False):
        torch.manual_seed(3)
        expected = theirs(x)[0]
    assert_close(first, expected, torch.float64, "train")
    # A one-layer LSTM never drops (dropout applies between layers), in either mode.
    with pytest.warns(UserWarning):
        single = lstm_ext.LSTM(3, 5, dropout=0.9).double()
    assert torch.equal(single(x)[0], single.eval()(x)[0])


@pytest.mark.parametrize("training", [True, False])
def test_conversions_to_and_from_torch_lstm(training):
    theirs = torch.nn.LSTM(**CONFIG, dtype=torch.float64).train(training)
    theirs.weight_hh_l1.requires_grad_(False)
    rng_state = torch.random.get_rng_state()
    ours = lstm_ext.LSTM.from_torch(theirs)
    # The conversion draws nothing from the generator (no re-initialization).
    assert torch.equal(torch.random.get_rng_state(), rng_state)
    assert type(ours) is lstm_ext.LSTM and ours.training == training
    assert ours.weight_hh_l0.dtype == torch.float64 and not ours.weight_hh_l1.requires_grad
    back = ours.to_torch()
    assert type(back) is torch.nn.LSTM
    _assert_same_module(theirs.eval(), back.eval())
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    for a, e in zip(_outputs(ours.eval(), x), _outputs(theirs, x)):
        assert_close(a, e, torch.float64, "from_torch")
    # Copies, not views: changing one leaves the other.
    with torch.no_grad():
        ours.weight_ih_l0.zero_()
    assert not torch.equal(theirs.weight_ih_l0, ours.weight_ih_l0)


def test_conversions_to_and_from_torch_lstm_cell():
    theirs = torch.nn.LSTMCell(3, 5, bias=False)
    ours = lstm_ext.LSTMCell.from_torch(theirs)
    assert type(ours) is lstm_ext.LSTMCell and repr(ours) == repr(theirs)
    back = ours.to_torch()
    assert type(back) is torch.nn.LSTMCell
    x = torch.randn(2, 3)
    for a, e in zip(ours(x), theirs(x)):
        assert_close(a, e, torch.float32, "cell from_torch")
    for a, e in zip(back(x), theirs(x)):
        assert torch.equal(a, e)


def test_from_torch_rejects_other_modules():
    with pytest.raises(TypeError, match="expects a torch.nn.LSTM, got GRU"):
        lstm_ext.LSTM.from_torch(torch.nn.GRU(3, 4))
    with pytest.raises(TypeError, match="expects a torch.nn.LSTMCell, got LSTM"):
        lstm_ext.LSTMCell.from_torch(torch.nn.LSTM(3, 4))


def test_functional_call_uses_the_substituted_parameters():
    theirs, ours = paired_lstms(torch.float64, **CONFIG)
    replacement = {name: torch.randn_like(p, requires_grad=True)
                   for name, p in theirs.named_parameters()}
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    expected = torch.func.functional_call(theirs, replacement, (x,))
    actual = torch.func.functional_call(ours, replacement, (x,))
    assert_close(actual[0], expected[0], torch.float64, "functional_call output")
    assert not torch.allclose(actual[0], ours(x)[0])
    grads_e = torch.autograd.grad(expected[0].sum(), list(replacement.values()))
    grads_a = torch.autograd.grad(actual[0].sum(), list(replacement.values()))
    for a, e in zip(grads_a, grads_e):
        assert_close(a, e, torch.float64, "functional_call gradient")
