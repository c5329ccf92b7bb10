"""The hand-written backward pass against autograd."""

import itertools

import pytest
import torch

from gdlab import model as M

COMBOS = [
    (act, head, loss)
    for act, head, loss in itertools.product(M.ACTIVATIONS, M.HEADS, M.LOSSES)
    if M.LOSS_FOR_HEAD.get(loss, head) == head
]


def make(depth, activation, head, loss, n=13, n_features=3, n_classes=3, seed=0):
    torch.manual_seed(seed)
    n_out = 1 if head == "sigmoid" else n_classes
    sizes = M.layer_sizes(n_features, depth, [5, 4, 6, 3][:depth], n_out)
    model = M.MLP(sizes, activation, head, loss)
    M.initialize(model, "normal", 0.8)
    with torch.no_grad():
        for _, b in model.layers:
            b.normal_()  # nonzero biases, so db and the activations' kinks are exercised
    model = model.double()
    X = torch.randn(n, n_features, dtype=torch.float64)
    y = torch.randint(0, 2 if head == "sigmoid" else n_classes, (n,))
    T = M.encode_targets(y, head, n_classes, torch.float64)
    return model, X, T


def autograd_grads(model, X, T):
    model.zero_grad()
    model.loss(model(X), T).backward()
    return [p.grad.clone() for p in model.parameters()]


def manual_grads(model, X, T):
    model.zero_grad()
    loss, _ = model.manual_loss(X, T)
    loss.backward()
    return [p.grad.clone() for p in model.parameters()]


def test_every_valid_combination_is_covered():
    assert len(COMBOS) == 12  # 3 activations x (sigmoid: bce, mse; softmax: ce, mse)


@pytest.mark.parametrize("depth", range(5))
@pytest.mark.parametrize(("activation", "head", "loss"), COMBOS)
def test_manual_backprop_equals_autograd(depth, activation, head, loss):
    model, X, T = make(depth, activation, head, loss)
    expected = autograd_grads(model, X, T)
    got = manual_grads(model, X, T)
    assert len(got) == 2 * (depth + 1)
    for g, e in zip(got, expected, strict=True):
        assert g.abs().max() > 0 or e.abs().max() == 0
        torch.testing.assert_close(g, e, rtol=0, atol=1e-10)


def test_manual_loss_value_equals_autograd_loss():
    model, X, T = make(2, "tanh", "softmax", "mse")
    manual, _ = model.manual_loss(X, T)
    assert abs(manual.item() - model.loss(model(X), T).item()) < 1e-14


@pytest.mark.parametrize(("activation", "head", "loss"), COMBOS)
def test_gradcheck_on_manual_path(activation, head, loss):
    model, X, T = make(2, activation, head, loss, n=6)

    def manual_loss(*params):
        return M.ManualBackprop.apply(model, X, T, None, *params)[0]

    assert torch.autograd.gradcheck(manual_loss, tuple(model.parameters()), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize(("activation", "head", "loss"), COMBOS)
def test_row_weights_give_each_member_the_loss_and_gradient_of_its_own_rows(activation, head, loss):
    """k-fold members: a stack of 3 whose rows are weighted (each member its own rows, summing to 1) has,
    for each member, the loss and the gradient of that member trained on its rows alone, by autograd and
    by the hand-written backward."""
    single, X, T = make(2, activation, head, loss, n=12)
    model = M.MLP.stack([single, single, single])
    rows = [torch.tensor([i % 3 != p for i in range(12)]) for p in range(3)]  # member p leaves out every 3rd
    weights = torch.stack([r.double() / r.sum() for r in rows]).unsqueeze(-1)  # (3, 12, 1)
    for manual in (False, True):
        model.zero_grad()
        losses = model.manual_loss(X, T, weights)[0] if manual else model.loss(model(X), T, weights)
        losses.sum().backward()
        for p, mask in enumerate(rows):
            expected_loss = single.loss(single(X[mask]), T[mask])
            assert losses[p].item() == pytest.approx(expected_loss.item(), abs=1e-13)
            expected = autograd_grads(single, X[mask], T[mask])
            got = [
                param.grad[p].reshape(e.shape) for param, e in zip(model.parameters(), expected, strict=True)
            ]
            for g, e in zip(got, expected, strict=True):
                torch.testing.assert_close(g, e, rtol=0, atol=1e-12)


def test_classic_sigmoid_derivative_bug_is_caught(monkeypatch):
    """Applying sigmoid' to the activation as if it were the pre-activation must fail the check."""
    model, X, T = make(2, "sigmoid", "sigmoid", "bce")
    expected = autograd_grads(model, X, T)
    sigmoid, _ = M.ACTIVATIONS["sigmoid"]
    buggy = (sigmoid, lambda Z, A: torch.sigmoid(A) * (1 - torch.sigmoid(A)))
    monkeypatch.setitem(M.ACTIVATIONS, "sigmoid", buggy)
    got = manual_grads(model, X, T)
    worst = max(float((g - e).abs().max()) for g, e in zip(got, expected, strict=True))
    assert worst > 1e-3
    with pytest.raises(AssertionError):
        for g, e in zip(got, expected, strict=True):
            torch.testing.assert_close(g, e, rtol=0, atol=1e-10)


def test_init_schemes_have_their_scales():
    torch.manual_seed(0)
    model = M.MLP([400, 300, 1], "relu", "sigmoid", "bce")
    for scheme, std in [
        ("small", 0.01),
        ("normal", 1.0),
        ("he", (2 / 400) ** 0.5),
        ("xavier", (2 / 700) ** 0.5),
    ]:
        M.initialize(model, scheme, std if scheme in ("small", "normal") else None)
        W1 = model.layers[0][0]
        assert abs(W1.std().item() / std - 1) < 0.02, scheme
        assert model.layers[0][1].abs().max().item() == 0.0
    M.initialize(model, "zeros")
    assert all(p.abs().max().item() == 0 for p in model.parameters())


def test_torch_default_init_matches_nn_linear_draws():
    torch.manual_seed(42)
    fc1, fc2 = torch.nn.Linear(2, 16), torch.nn.Linear(16, 1)
    torch.manual_seed(42)
    model = M.MLP([2, 16, 1], "relu", "sigmoid", "bce")
    M.initialize(model, "torch_default")
    (W1, b1), (W2, b2) = model.layers
    assert torch.equal(W1, fc1.weight.T) and torch.equal(b1, fc1.bias)
    assert torch.equal(W2, fc2.weight.T) and torch.equal(b2, fc2.bias)
