"""Small models the pruning tests share."""
import pytest
import torch
import torch.nn as nn


class MLP(nn.Module):
    def __init__(self, sizes=(16, 32, 24, 8)):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))

    def forward(self, x):
        for index, layer in enumerate(self.layers):
            x = layer(x)
            if index < len(self.layers) - 1:
                x = torch.relu(x)
        return x


@pytest.fixture
def mlp():
    torch.manual_seed(0)
    return MLP()
