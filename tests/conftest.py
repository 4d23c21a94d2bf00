"""Shared fixtures: tiny random models and the shipped toy model, on the CPU, never the network."""

from __future__ import annotations

import pytest
import torch

from pipeline.models import load_model


@pytest.fixture(scope="session")
def toy():
    return load_model("toy", torch.device("cpu"))


@pytest.fixture(scope="session")
def tiny():
    return load_model("random:tiny", torch.device("cpu"), seed=0)
