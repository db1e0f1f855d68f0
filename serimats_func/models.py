"""Built-in model templates: plain ``torch.nn.Module``s.

Any ``nn.Module`` can be an experiment's template; these two are the usual ones for MNIST-like data.
Each handles one batch of one learner; the library vmaps them over learners.

>>> import torch
>>> MLP(widths=(32,))(torch.zeros(5, 40)).shape
torch.Size([5, 10])
>>> sum(p.numel() for p in Lenet5().parameters())
61706
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class MLP(nn.Sequential):
    """Flatten, then Linear + activation for each hidden width, then a Linear to ``num_classes``.

    ``in_features=None`` infers the input size from the data (the first layer is an
    ``nn.LazyLinear`` until the experiment shows it one example). ``dropout > 0`` adds an
    ``nn.Dropout`` after each hidden activation (per-learner masks under the library).

    >>> MLP(widths=(100, 100), in_features=40)[1].out_features
    100
    """

    def __init__(
        self,
        widths: Sequence[int] = (100, 100),
        num_classes: int = 10,
        in_features: int | None = None,
        activation: type[nn.Module] = nn.ReLU,
        dropout: float = 0.0,
    ):
        layers: list[nn.Module] = [nn.Flatten()]
        previous = in_features
        for width in widths:
            layers.append(nn.LazyLinear(width) if previous is None else nn.Linear(previous, width))
            layers.append(activation())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            previous = width
        layers.append(nn.LazyLinear(num_classes) if previous is None else nn.Linear(previous, num_classes))
        super().__init__(*layers)


class Lenet5(nn.Module):
    """LeNet-5 for 1x28x28 images: conv 1->6 k5 pad 2, max-pool, conv 6->16 k5, max-pool,
    then 400-120-84-10 with ReLU (61,706 parameters)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, kernel_size=5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, kernel_size=5)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, 1, 28, 28)
        x = self.pool(torch.relu(self.conv1(x)))  # (B, 6, 14, 14)
        x = self.pool(torch.relu(self.conv2(x)))  # (B, 16, 5, 5)
        x = torch.flatten(x, 1)  # (B, 400)
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        return self.fc3(x)  # (B, num_classes)
