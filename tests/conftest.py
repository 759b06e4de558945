import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED = os.path.join(os.path.dirname(ROOT), 'shared')
SPECS = os.path.join(SHARED, 'specs')

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
