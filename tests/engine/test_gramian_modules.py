"""Every parametrised module goes through the Gramian engine exactly: recognised layers (Linear, Conv1d/2d/3d,
Embedding), the per-module fallback (GRU, LSTM, MultiheadAttention, a transformer layer, a transposed
convolution, weight norm, Bilinear, PReLU, GroupNorm, a bare parameter in an element-wise op), activation
checkpointing, layers called several times in one forward (weight tying, a reused layer: cross
terms), and in-place operations after a layer. Each model's Gramian and update equal ``J Jᵀ`` and ``wᵀ J`` of
the Jacobian, in float64 (1e-10) and float32 (1e-5), in both batching modes and every form."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from taskbalance.gramian import GramianEngine
from taskbalance.jacobian import parameter_jacobian

K = 3
WIDTH = 6  # every trunk returns (N, WIDTH) features
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}


class Recurrent(nn.Module):
    """nn.GRU (its weights reach the losses through the recurrence: the fallback), a linear layer on top."""

    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(4, WIDTH, batch_first=True)
        self.fc = nn.Linear(WIDTH, WIDTH)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.gru(x)
        return torch.tanh(self.fc(out[:, -1]))


class Attention(nn.Module):
    """nn.MultiheadAttention (packed in-projection, out-projection) on 3-d input, mean-pooled."""

    def __init__(self) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.attention(x, x, x)
        return out.mean(1)[:, :WIDTH]


class ElementwiseParameters(nn.Module):
    """A custom module: bare parameters (a gain and a shift) in element-wise operations after a layer."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, WIDTH)
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, WIDTH))
        self.shift = nn.Parameter(torch.full((WIDTH,), 0.1))

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(self.linear(x)) * self.gain + self.shift


class TransposedAndThreeD(nn.Module):
    """A transposed Conv1d (the fallback) feeding a Conv3d (recognised)."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.ConvTranspose1d(4, 3, 3, stride=2)
        self.conv3d = nn.Conv3d(3, WIDTH, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.up(x))  # (N, 3, 11)
        h = h.reshape(h.shape[0], 3, 1, 1, -1).expand(-1, -1, 2, 2, -1)
        return torch.tanh(self.conv3d(h)).mean((2, 3, 4))


class ReusedConvolution(nn.Module):
    """A depthwise, dilated, circularly padded Conv2d; then one Conv2d called twice with different strides."""

    def __init__(self) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(4, 4, 3, groups=4, dilation=2, padding=2, padding_mode="circular")
        self.conv = nn.Conv2d(4, WIDTH, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.depthwise(x))
        strided = F.conv2d(h, self.conv.weight, self.conv.bias, stride=2)
        return torch.tanh(self.conv(h).mean((2, 3)) + strided.mean((2, 3)))


class TiedEmbedding(nn.Module):
    """Weight tying: the embedding's weight is also the output projection (a linear use)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, WIDTH)

    def forward(self, x: Tensor) -> Tensor:
        logits = F.linear(torch.tanh(self.embed(x)), self.embed.weight)  # (N, T, 10)
        return torch.tanh(logits[..., :WIDTH]).mean(1)


class EmbeddingTwice(nn.Module):
    """One embedding looked up twice: with its padding index, and through F.embedding without one."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, WIDTH, padding_idx=0)
        self.fc = nn.Linear(WIDTH, WIDTH)

    def forward(self, x: Tensor) -> Tensor:
        both = self.embed(x) + F.embedding((x + 3) % 10, self.embed.weight)
        return torch.tanh(self.fc(both)).mean(1)


class EmbeddingTwicePaddedOnlyOnce(nn.Module):
    """The second lookup alone masks a padding index: each use keeps its own."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, WIDTH)
        self.fc = nn.Linear(WIDTH, WIDTH)

    def forward(self, x: Tensor) -> Tensor:
        both = self.embed(x) + F.embedding(x, self.embed.weight, padding_idx=0)
        return torch.tanh(self.fc(both)).mean(1)


class WeightInARegulariser(nn.Module):
    """A layer's weight also used outside the layer (a penalty added to the features)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, WIDTH)

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(self.linear(x)) + 0.1 * self.linear.weight.pow(2).sum()


class InPlaceAfterLayers(nn.Module):
    """In-place operations on layers' outputs: nn.ReLU(inplace=True), ``x += ...``, ``mul_``, a sliced
    in-place update, ``sigmoid_``, ``add_`` and ``relu_`` after a convolution."""

    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(4, WIDTH)
        self.relu = nn.ReLU(inplace=True)
        self.l2 = nn.Linear(WIDTH, WIDTH)
        self.l3 = nn.Linear(WIDTH, WIDTH)
        self.conv = nn.Conv1d(1, 2, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.relu(self.l1(x))
        g = self.l2(h)
        g += h
        g.mul_(1.5)
        z = self.l3(torch.tanh(g))
        z[:, :2] *= 0.5
        torch.sigmoid_(z)
        c = self.conv(z.unsqueeze(1))
        c.add_(1.0)
        return torch.relu_(c).mean(1)


class ConvWeightInARegulariser(nn.Module):
    """A convolution's weight also used outside it: the weight falls back, the bias stays with the layer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, WIDTH, 3)

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(self.conv(x)).mean(-1) + 0.1 * self.conv.weight.pow(2).sum()


class Reparametrised(nn.Module):
    """A weight-normalised linear layer (``parametrizations.weight_norm``: its weight is computed, not a
    leaf), Bilinear, PReLU and GroupNorm, and a linear layer on a non-contiguous 3-d input."""

    def __init__(self) -> None:
        super().__init__()
        self.normalised = nn.utils.parametrizations.weight_norm(nn.Linear(4, 4))
        self.bilinear = nn.Bilinear(4, 4, WIDTH)
        self.prelu = nn.PReLU(WIDTH)
        self.norm = nn.GroupNorm(2, WIDTH)
        self.fc = nn.Linear(WIDTH, WIDTH)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.normalised(x))
        h = self.norm(self.prelu(self.bilinear(h, h)))
        h = self.fc(h.unsqueeze(1).expand(-1, 3, -1).transpose(0, 1)).transpose(0, 1)  # (N, 3, WIDTH)
        return torch.tanh(h).mean(1)


class TransformerAndLSTM(nn.Module):
    """nn.TransformerEncoderLayer then nn.LSTM, mean-pooled."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.TransformerEncoderLayer(WIDTH, 2, dim_feedforward=8, dropout=0.0, batch_first=True)
        self.lstm = nn.LSTM(WIDTH, WIDTH, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.lstm(self.encoder(x))
        return out.mean(1)


class Checkpointed(nn.Module):
    """Activation checkpointing (non-reentrant) around two linear layers, a convolution after it."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Linear(4, WIDTH), nn.Tanh(), nn.Linear(WIDTH, WIDTH), nn.Tanh())
        self.conv = nn.Conv1d(1, 1, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = checkpoint(self.block, x, use_reentrant=False)
        return torch.tanh(self.conv(h.unsqueeze(1)).squeeze(1))


def tokens(dtype: torch.dtype) -> Tensor:
    return torch.tensor([[0, 1, 2, 0], [3, 0, 4, 5], [0, 0, 6, 7], [8, 9, 0, 2]])


MODULES: dict[str, tuple[type[nn.Module], Callable[[torch.dtype], Tensor]]] = {
    "gru": (Recurrent, lambda dtype: torch.randn(5, 4, 4, dtype=dtype)),
    "multihead_attention": (Attention, lambda dtype: torch.randn(5, 3, 8, dtype=dtype)),
    "elementwise_parameters": (ElementwiseParameters, lambda dtype: torch.randn(7, 4, dtype=dtype)),
    "conv_transpose_and_conv3d": (TransposedAndThreeD, lambda dtype: torch.randn(5, 4, 5, dtype=dtype)),
    "reused_convolution": (ReusedConvolution, lambda dtype: torch.randn(3, 4, 6, 6, dtype=dtype)),
    "tied_embedding": (TiedEmbedding, tokens),
    "embedding_twice": (EmbeddingTwice, tokens),
    "embedding_twice_padded_once": (EmbeddingTwicePaddedOnlyOnce, tokens),
    "weight_in_a_regulariser": (WeightInARegulariser, lambda dtype: torch.randn(7, 4, dtype=dtype)),
    "in_place_after_layers": (InPlaceAfterLayers, lambda dtype: torch.randn(7, 4, dtype=dtype)),
    "conv_weight_in_a_regulariser": (ConvWeightInARegulariser, lambda d: torch.randn(5, 2, 7, dtype=d)),
    "reparametrised": (Reparametrised, lambda dtype: torch.randn(5, 4, dtype=dtype)),
    "transformer_and_lstm": (TransformerAndLSTM, lambda dtype: torch.randn(4, 3, WIDTH, dtype=dtype)),
    "checkpointed": (Checkpointed, lambda dtype: torch.randn(5, 4, dtype=dtype)),
}


def relative(got: Tensor, expected: Tensor) -> float:
    return float((got - expected).abs().max() / expected.abs().max().clamp_min(1e-300))


def build(name: str, dtype: torch.dtype) -> tuple[nn.Module, Callable[[], Tensor]]:
    torch.manual_seed(0)
    cls, make_input = MODULES[name]
    trunk = cls().to(dtype)
    heads = [nn.Linear(WIDTH, 1).to(dtype) for _ in range(K)]
    x = make_input(dtype)

    def roots() -> Tensor:
        z = trunk(x)
        return torch.stack([(h(z).squeeze(-1) - i).pow(2).mean() for i, h in enumerate(heads)])

    return trunk, roots


@pytest.mark.parametrize("batching", ["vmap", "loop"])
@pytest.mark.parametrize("form", ["auto", "b_side", "direct"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("name", list(MODULES))
def test_gramian_and_update_equal_the_jacobian(name, dtype, form, batching):
    trunk, roots = build(name, dtype)
    shared = list(trunk.parameters())
    jacobian = parameter_jacobian(roots(), shared).to(torch.float64)
    weights = torch.tensor([0.7, -0.2, 1.3], dtype=dtype)
    engine = GramianEngine(form=form, batching=batching)
    step = engine.gramian(roots(), shared)
    assert step.gramian.dtype == torch.float64
    assert relative(step.gramian, jacobian @ jacobian.T) < TOLERANCE[dtype]
    trunk.zero_grad(set_to_none=True)
    engine.apply(step, weights, weights, shared)
    update = torch.cat([p.grad.reshape(-1) for p in shared]).to(torch.float64)
    assert relative(update, weights.to(torch.float64) @ jacobian) < TOLERANCE[dtype]


def kinds(name: str) -> tuple[list[tuple[str, int]], set[str]]:
    """The step's recognised layers (kind, uses) and the names of its fallback parameters."""
    trunk, roots = build(name, torch.float64)
    step = GramianEngine().gramian(roots(), list(trunk.parameters()))
    names = {id(p): n for n, p in trunk.named_parameters()}
    layers = sorted((layer.group.kind, len(layer.group.uses)) for layer in step.layers)
    return layers, {names[id(p)] for p in step.fallback}


def test_modules_the_engine_does_not_recognise_fall_back_to_their_own_per_task_gradients():
    assert kinds("elementwise_parameters") == ([("linear", 1)], {"gain", "shift"})
    layers, fallback = kinds("conv_transpose_and_conv3d")
    assert layers == [("conv", 1)] and fallback == {"up.weight", "up.bias"}
    layers, fallback = kinds("gru")
    assert ("linear", 1) in layers and fallback  # the recurrence's weights: fallback
    assert kinds("weight_in_a_regulariser") == ([("linear", 1)], {"linear.weight"})  # the bias stays B-side
    assert kinds("conv_weight_in_a_regulariser") == ([("conv", 1)], {"conv.weight"})
    layers, fallback = kinds("reparametrised")
    assert {"normalised.parametrizations.weight.original0", "normalised.parametrizations.weight.original1",
            "bilinear.weight", "prelu.weight", "norm.weight", "norm.bias"} <= fallback


def test_a_layer_called_twice_carries_both_uses_in_one_group():
    """Cross terms: the uses of one layer are one group (rows stacked, or per-task gradients summed)."""
    assert ("conv", 2) in kinds("reused_convolution")[0]
    assert kinds("embedding_twice")[0] == [("embedding", 2), ("linear", 1)]
    assert kinds("embedding_twice_padded_once")[0] == [("embedding", 2), ("linear", 1)]


def test_a_weight_tied_across_layer_kinds_falls_back():
    """An embedding weight that is also a linear weight cannot be one group: it takes the fallback (exact)."""
    assert kinds("tied_embedding") == ([], {"embed.weight"})


@pytest.mark.parametrize("batching", ["vmap", "loop"])
def test_a_parameter_listed_twice_in_shared_counts_once(batching):
    """A tied weight listed by both modules that share it (``[*encoder.parameters(), *decoder.parameters()]``
    with a tied embedding): the Gramian and the update are those of the parameter listed once, whether it is a
    recognised layer's weight or falls back."""
    trunk, roots = build("tied_embedding", torch.float64)  # embed.weight: the fallback
    twice = [*trunk.parameters(), trunk.embed.weight]
    normed = nn.Sequential(nn.Linear(4, WIDTH), nn.LayerNorm(WIDTH), nn.Tanh()).double()  # a layer and a norm
    heads = [nn.Linear(WIDTH, 1).double() for _ in range(K)]
    x = torch.randn(6, 4, dtype=torch.float64)

    def normed_roots() -> Tensor:
        z = normed(x)
        return torch.stack([(h(z).squeeze(-1) - i).pow(2).mean() for i, h in enumerate(heads)])

    normed_twice = [*normed.parameters(), normed[0].weight, normed[1].weight]
    cases = [(roots, list(trunk.parameters()), twice),
             (normed_roots, list(normed.parameters()), normed_twice)]
    weights = torch.tensor([0.7, -0.2, 1.3], dtype=torch.float64)
    for roots_of, shared, listed in cases:
        jacobian = parameter_jacobian(roots_of(), shared)
        engine = GramianEngine(batching=batching)
        step = engine.gramian(roots_of(), listed)
        assert relative(step.gramian, jacobian @ jacobian.T) < 1e-12
        for p in shared:
            p.grad = None
        engine.apply(step, weights, weights, listed)
        update = torch.cat([p.grad.reshape(-1) for p in shared])
        assert relative(update, weights @ jacobian) < 1e-12
