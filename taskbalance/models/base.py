"""Multi-task models: a shared ``trunk``, one head per task, ``forward(x) -> (features, predictions)``."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from torch import Tensor, nn

from ..data.tasks import Task

__all__ = ["MultiTaskModel", "make_head", "mlp"]

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
}


def activation(name: str) -> nn.Module:
    """An activation module by name (``relu``, ``silu``, ``tanh``, ``gelu``)."""
    if name not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {name!r}")
    return _ACTIVATIONS[name]()


def mlp(
    in_features: int,
    hidden: Sequence[int],
    *,
    act: str = "relu",
    dropout: float = 0.0,
    activate_last: bool = True,
) -> nn.Sequential:
    """``Linear → act (→ Dropout)`` per width in ``hidden``; no last activation unless ``activate_last``."""
    if in_features < 1:
        raise ValueError(f"in_features must be >= 1, got {in_features}")
    if any(int(w) < 1 for w in hidden):
        raise ValueError(f"hidden widths must be >= 1, got {tuple(hidden)}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    layers: list[nn.Module] = []
    width = in_features
    for i, out in enumerate(hidden):
        layers.append(nn.Linear(width, int(out)))
        if activate_last or i < len(hidden) - 1:
            layers.append(activation(act))
            if dropout:
                layers.append(nn.Dropout(dropout))
        width = int(out)
    return nn.Sequential(*layers)


def make_head(task: Task, in_features: int, hidden: Sequence[int] = (), act: str = "relu") -> nn.Module:
    """A task head: an optional MLP of widths ``hidden``, then a linear layer to ``task.output_size``."""
    body = mlp(in_features, hidden, act=act) if hidden else nn.Sequential()
    width = int(hidden[-1]) if hidden else in_features
    return nn.Sequential(*body, nn.Linear(width, task.output_size))


class MultiTaskModel(nn.Module):
    """Hard parameter sharing: ``features = trunk(x)``, ``predictions[task] = heads[task](features)``.

    Predictions of regression and binary tasks are ``(B,)`` (one output, squeezed); multiclass ones
    ``(B, num_classes)`` logits, which is what :meth:`Task.loss` expects.

    With a balancer::

        features, predictions = model(x)
        losses = present_losses(data.tasks, predictions, y, mask)
        balancer.backward(losses, shared=model.shared_parameters(), features=features)

    ``shared_parameters()`` is ``trunk.parameters()`` here, and ``features`` (the trunk output every head
    reads) is the representation for gradient methods in feature mode. The model keeps no tensor of a
    forward pass, so it can be deep-copied (best-epoch snapshots) at any time.
    """

    def __init__(
        self, tasks: Sequence[Task], trunk: nn.Module, heads: nn.ModuleDict, feature_size: int
    ) -> None:
        super().__init__()
        names = [t.name for t in tasks]
        if sorted(names) != sorted(heads.keys()):
            raise ValueError(f"heads {sorted(heads.keys())} do not match tasks {sorted(names)}")
        self.tasks: tuple[Task, ...] = tuple(tasks)
        self.trunk = trunk
        self.heads = heads
        self.feature_size = int(feature_size)

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        """The parameters every task's loss depends on (pass as a balancer's ``shared=``)."""
        return self.trunk.parameters()

    def task_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the task heads (each read by one task only)."""
        return self.heads.parameters()

    def predict(self, features: Tensor) -> dict[str, Tensor]:
        """Apply every head to ``features``."""
        out: dict[str, Tensor] = {}
        for task in self.tasks:
            prediction = self.heads[task.name](features)
            out[task.name] = prediction.squeeze(-1) if task.output_size == 1 else prediction
        return out

    def forward(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        features = self.trunk(x)
        return features, self.predict(features)
