"""The MLP, its losses, and a hand-written backward pass.

Weights are stored as the labs write them: ``W[l]`` has shape (fan_in, fan_out), so a layer is
``Z = A_prev @ W + b`` and the backward pass is ``dW = A_prev.T @ dZ``, ``db = sum_rows(dZ)``,
``dA_prev = dZ @ W.T``.

Every function here reduces over the last two axes (rows, outputs) only, so the same code trains a
population (`MLP.stack`): weights with a leading member axis, W (P, fan_in, fan_out), b (P, 1, fan_out),
and one loss per member.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# name -> (g, g') with g'(Z, A) the derivative at the pre-activation Z, given A = g(Z) to reuse.
ACTIVATIONS = {
    "sigmoid": (torch.sigmoid, lambda Z, A: A * (1 - A)),
    "tanh": (torch.tanh, lambda Z, A: 1 - A * A),
    "relu": (torch.relu, lambda Z, A: (Z > 0).to(Z.dtype)),
}
HEADS = ("sigmoid", "softmax")
LOSSES = ("bce", "ce", "mse")
LOSS_FOR_HEAD = {"bce": "sigmoid", "ce": "softmax"}  # mse fits either head
INITS = ("small", "normal", "xavier", "he", "torch_default", "zeros")


def head_output(Z: Tensor, head: str) -> Tensor:
    """The network's prediction from the last layer's logits."""
    return torch.sigmoid(Z) if head == "sigmoid" else torch.softmax(Z, dim=-1)


def encode_targets(y: Tensor, head: str, n_classes: int, dtype: torch.dtype) -> Tensor:
    """Class indices -> targets shaped like the logits: (N, 1) for a sigmoid head, one-hot for softmax."""
    if head == "sigmoid":
        return y.to(dtype).unsqueeze(1)
    return F.one_hot(y, n_classes).to(dtype)


def compute_loss(Z: Tensor, T: Tensor, head: str, loss: str, weights: Tensor | None = None) -> Tensor:
    """Mean loss over the batch (one per member for a population). bce and ce work on the logits.

    With `weights` (P, N, 1): each member's own rows (k-fold cross-validation), as weights that sum to 1
    over its rows and are 0 elsewhere: its loss is the mean over its rows only."""
    if loss == "bce":
        per_output = F.binary_cross_entropy_with_logits(Z, T.expand_as(Z), reduction="none")
    elif loss == "ce":
        per_row = -(T * torch.log_softmax(Z, dim=-1)).sum(dim=-1)
        return per_row.mean(dim=-1) if weights is None else (per_row * weights.squeeze(-1)).sum(dim=-1)
    else:
        per_output = (head_output(Z, head) - T) ** 2  # mse: 1/n sum (y - y_hat)^2, lab 000
    if weights is None:
        return per_output.mean(dim=(-2, -1))
    return (per_output.mean(dim=-1, keepdim=True) * weights).sum(dim=(-2, -1))


def output_delta(Z: Tensor, T: Tensor, head: str, loss: str, weights: Tensor | None = None) -> Tensor:
    """dZ at the last layer: the derivative of ``compute_loss`` with respect to the logits (each row's
    share of the mean is 1/n, or its weight)."""
    Y_hat = head_output(Z, head)
    n_rows, n_outputs = Z.shape[-2:]
    if loss in ("bce", "ce"):
        return (Y_hat - T) / n_rows if weights is None else (Y_hat - T) * weights
    if weights is None:
        dY_hat = 2 * (Y_hat - T) / (n_rows * n_outputs)
    else:  # each row's share of the mean is its weight
        dY_hat = 2 * (Y_hat - T) * weights / n_outputs
    if head == "sigmoid":
        return dY_hat * Y_hat * (1 - Y_hat)
    return Y_hat * (dY_hat - (dY_hat * Y_hat).sum(dim=-1, keepdim=True))  # softmax Jacobian


def accuracy(Z: Tensor, T: Tensor, head: str, weights: Tensor | None = None) -> Tensor:
    if head == "sigmoid":
        correct = ((Z > 0).to(T.dtype) == T).to(Z.dtype)
    else:
        correct = T.expand_as(Z).gather(-1, Z.argmax(dim=-1, keepdim=True))  # T is one-hot
    return correct.mean(dim=(-2, -1)) if weights is None else (correct * weights).sum(dim=(-2, -1))


class MLP(nn.Module):
    """depth hidden layers of `activation`, then a linear layer whose logits feed `head`."""

    def __init__(
        self, sizes: list[int], activation: str, head: str, loss: str, population: int | None = None
    ):
        super().__init__()
        self.sizes, self.activation, self.head, self.loss_name = list(sizes), activation, head, loss
        # Parameters W1, b1, W2, b2, ... as in the labs; `layers` keeps them in a plain list
        # because ParameterList indexing costs more than the matmul on these tiny networks.
        self.layers: list[tuple[nn.Parameter, nn.Parameter]] = []
        for l, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True), start=1):
            W_shape, b_shape = (fan_in, fan_out), (fan_out,)
            if population is not None:  # one W, b per member; b keeps a row axis to broadcast over rows
                W_shape, b_shape = (population, fan_in, fan_out), (population, 1, fan_out)
            W, b = nn.Parameter(torch.empty(W_shape)), nn.Parameter(torch.zeros(b_shape))
            self.register_parameter(f"W{l}", W)
            self.register_parameter(f"b{l}", b)
            self.layers.append((W, b))
        self.n_layers = len(self.layers)

    def forward(self, X: Tensor, cache: list | None = None) -> Tensor:
        """Logits of the last layer. With `cache`, keeps (A_prev, Z, A) per layer for `backward`."""
        g, _ = ACTIVATIONS[self.activation]
        last = self.n_layers - 1
        A = X
        for l, (W, b) in enumerate(self.layers):
            Z = affine(A, W, b)
            A_next = g(Z) if l < last else Z
            if cache is not None:
                cache.append((A, Z, A_next))
            A = A_next
        return Z

    def loss(self, Z: Tensor, T: Tensor, weights: Tensor | None = None) -> Tensor:
        return compute_loss(Z, T, self.head, self.loss_name, weights)

    def accuracy(self, Z: Tensor, T: Tensor, weights: Tensor | None = None) -> Tensor:
        return accuracy(Z, T, self.head, weights)

    def predict_proba(self, X: Tensor) -> Tensor:
        with torch.no_grad():
            return head_output(self(X), self.head)

    def backward(self, cache: list, T: Tensor, dloss: Tensor | None = None,
                 weights: Tensor | None = None) -> list[tuple[Tensor, Tensor]]:  # fmt: skip
        """Hand-written backpropagation: [(dW, db)] per layer, from the forward `cache`.

        `dloss` is the upstream gradient per member (autograd's ones for ``losses.sum()``); the chain
        is linear in dZ, so it scales dZ once at the output layer. `weights`: each member's rows, as in
        `compute_loss`."""
        layers = self.layers
        one_member = layers[0][0].dim() == 3 and layers[0][0].shape[0] == 1
        if one_member:  # the same math on 2D views: a matmul is cheaper than a batch-of-one bmm
            cache = [tuple(t[0] if t.dim() == 3 else t for t in entry) for entry in cache]
            layers = [(W[0], b[0]) for W, b in layers]
            weights = weights[0] if weights is not None else None
        _, g_prime = ACTIVATIONS[self.activation]
        _, Z_L, _ = cache[-1]
        dZ = output_delta(Z_L, T, self.head, self.loss_name, weights)
        if dloss is not None:
            dZ = dZ * (dloss.reshape(()) if one_member else per_member(dloss, dZ))
        grads = [None] * self.n_layers
        for l in reversed(range(self.n_layers)):
            A_prev, _, _ = cache[l]
            W, b = layers[l]
            dW = A_prev.mT @ dZ
            db = dZ.sum_to_size(b.shape)  # summed over the rows b was broadcast to
            grads[l] = (dW, db)
            if l > 0:
                dA = dZ @ W.mT
                _, Z_prev, A_prev_act = cache[l - 1]
                dZ = dA * g_prime(Z_prev, A_prev_act)
        if one_member:
            grads = [(dW.unsqueeze(0), db.unsqueeze(0)) for dW, db in grads]
        return grads

    def manual_loss(self, X: Tensor, T: Tensor, weights: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(loss, logits) whose gradient comes from `backward`, not from autograd's graph."""
        return ManualBackprop.apply(self, X, T, weights, *self.parameters())

    def grad_norms(self) -> Tensor:
        """[|dW1|, |db1|, |dW2|, ...] per member from the current .grad: (2 * layers, P)."""
        grads = [p.grad for layer in self.layers for p in layer]
        if grads[0].shape[0] == 1:  # one member: a single fused call
            return torch.stack(torch._foreach_norm(grads)).unsqueeze(1)
        return torch.stack([g.flatten(1).norm(dim=1) for g in grads])

    @classmethod
    def stack(cls, members: list[MLP]) -> MLP:
        """P members' MLPs as one model: W (P, fan_in, fan_out), b (P, 1, fan_out)."""
        first = members[0]
        model = cls(first.sizes, first.activation, first.head, first.loss_name, population=len(members))
        model.to(first.layers[0][0].dtype)
        with torch.no_grad():
            for l, (W, b) in enumerate(model.layers):
                W.copy_(torch.stack([m.layers[l][0] for m in members]))
                b.copy_(torch.stack([m.layers[l][1] for m in members]).unsqueeze(1))
        return model

    def member(self, p: int) -> MLP:
        """Member p of a stacked model as a standalone MLP (a copy of its weights, on the CPU)."""
        W_all = self.layers[0][0]
        model = MLP(self.sizes, self.activation, self.head, self.loss_name).to(W_all.dtype)
        with torch.no_grad():
            for (W, b), (W_p, b_p) in zip(model.layers, self.layers, strict=True):
                W.copy_(W_p[p])
                b.copy_(b_p[p, 0])
        return model


class ManualBackprop(torch.autograd.Function):
    """Routes the hand-written gradients into `.grad`, so both gradient modes share one training loop."""

    @staticmethod
    def forward(ctx, model: MLP, X: Tensor, T: Tensor, weights: Tensor | None, *params: Tensor):
        cache: list = []
        Z = model.forward(X, cache)
        ctx.model, ctx.cache, ctx.T, ctx.weights = model, cache, T, weights
        ctx.mark_non_differentiable(Z)
        return model.loss(Z, T, weights), Z

    @staticmethod
    def backward(ctx, dloss: Tensor, _dZ: Tensor):
        grads = ctx.model.backward(ctx.cache, ctx.T, dloss, ctx.weights)
        # parameters() yields W1, b1, W2, b2, ... (registration order)
        return (None, None, None, None, *(d for layer in grads for d in layer))


def affine(A: Tensor, W: Tensor, b: Tensor) -> Tensor:
    """Z = A @ W + b as one fused call: addmm for one network, baddbmm per member for a stack
    (the stack's rows are shared: X (N, fan_in) is viewed as (P, N, fan_in) without a copy)."""
    if W.dim() == 2:
        return torch.addmm(b, A, W)
    if A.dim() == 2:
        A = A.expand(W.shape[0], *A.shape)
    return torch.baddbmm(b, A, W)


def per_member(values: Tensor, like: Tensor) -> Tensor:
    """Per-member values (shape (P,), or () for a single run) shaped to broadcast against `like`."""
    return values.reshape(values.shape + (1,) * (like.dim() - values.dim()))


def layer_sizes(n_features: int, depth: int, width, n_outputs: int) -> list[int]:
    widths = [width] * depth if isinstance(width, int) else list(width)
    return [n_features, *widths, n_outputs]


@torch.no_grad()
def initialize(model: MLP, scheme: str, std: float | None = None) -> None:
    """Draw W in float32 and in layer order (W1, [b1], W2, ...), so a seed gives the labs' numbers."""
    for W, b in model.layers:
        fan_in, fan_out = W.shape
        W_drawn, b_drawn = draw_layer(fan_in, fan_out, scheme, std)
        W.copy_(W_drawn)
        b.copy_(b_drawn)


def draw_layer(fan_in: int, fan_out: int, scheme: str, std: float | None = None) -> tuple[Tensor, Tensor]:
    """One layer's (W, b) from torch's generator, in float32, as `initialize` draws them."""
    b = torch.zeros(fan_out)
    if scheme in ("small", "normal"):
        return torch.randn(fan_in, fan_out) * std, b
    if scheme == "xavier":
        return torch.randn(fan_in, fan_out) * math.sqrt(2.0 / (fan_in + fan_out)), b
    if scheme == "he":
        return torch.randn(fan_in, fan_out) * math.sqrt(2.0 / fan_in), b
    if scheme == "torch_default":  # nn.Linear's own reset_parameters, in its order: weight, then bias
        weight, bias = torch.empty(fan_out, fan_in), torch.empty(fan_out)
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
        bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
        nn.init.uniform_(bias, -bound, bound)
        return weight.T, bias
    if scheme == "zeros":
        return torch.zeros(fan_in, fan_out), b
    raise ValueError(f"unknown init scheme {scheme!r}")
