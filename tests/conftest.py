import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# Checkpoint specs and golden outputs: a copy of the project's shared specs kept in the repository
# (tests/README.md says where it comes from and how to refresh it). Nothing outside ROOT is read.
SPECS = os.path.join(ROOT, 'tests', 'data', 'specs')

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope='session')
def gmm():
    import models
    return models.load('gmm')


@pytest.fixture(scope='session')
def gmm_wavelet():
    import models
    return models.load('gmm_wavelet')


@pytest.fixture(scope='session')
def digits():
    import models
    return models.load('digits')
