"""torch_utils.persistence: EDM-style self-contained pickles.

A pickle of a persistent object must load in a process where the module that defined its class
does not exist (the released EDM pickles name `training.networks`, which we do not ship), and
pickles written under numpy 1.x (`numpy.core.multiarray.scalar`) must load under numpy 2.
"""

import importlib.util
import io
import json
import os
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import dnnlib
from conftest import ROOT
from torch_utils import persistence

# A persistent network and a non-network persistent object (like EDM's loss), in a module that
# only the writing process can import. It imports what EDM's embedded sources import.
MODULE_SRC = textwrap.dedent('''
    import numpy as np
    import torch
    import dnnlib
    from torch_utils import misc, persistence

    @persistence.persistent_class
    class TinyNet(torch.nn.Module):
        def __init__(self, channels, gain=np.sqrt(0.5)):
            super().__init__()
            self.conv = torch.nn.Conv2d(channels, channels, 3, padding=1)
            self.register_buffer('offset', torch.linspace(-1, 1, channels))
            self.gain = gain                       # a numpy float64 in the pickled state
            self.info = dnnlib.EasyDict(kind='tiny')

        def forward(self, x):
            return self.conv(x) * self.gain + self.offset[None, :, None, None]

    @persistence.persistent_class
    class Loss:
        def __init__(self, P_mean=-1.2, P_std=1.2):
            self.P_mean = P_mean
            self.P_std = P_std
''')


def import_temp_module(folder, name, src=MODULE_SRC):
    path = os.path.join(folder, name + '.py')
    with open(path, 'w') as f:
        f.write(src)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module          # inspect.getsource (used by persistent_class) needs it
    spec.loader.exec_module(module)
    return module


def run_python(code, cwd, extra_path=()):
    """Run `code` in a fresh interpreter that sees the project but not `cwd`'s modules."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, *extra_path]), OMP_NUM_THREADS='1')
    return subprocess.run([sys.executable, '-c', code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture()
def temp_module(tmp_path):
    folder = tmp_path / 'src'
    folder.mkdir()
    name = f'gone_module_{os.getpid()}'
    module = import_temp_module(str(folder), name)
    yield module
    sys.modules.pop(name, None)


def snapshot(module):
    torch.manual_seed(0)
    net = module.TinyNet(4)
    data = dict(ema=net, loss_fn=module.Loss(), augment_pipe=None,
                dataset_kwargs=dnnlib.EasyDict(class_name='training.dataset.ImageFolderDataset', resolution=8))
    return net, data


def test_pickle_loads_where_the_class_module_is_missing(tmp_path, temp_module):
    net, data = snapshot(temp_module)
    pkl = tmp_path / 'snap.pkl'
    with open(pkl, 'wb') as f:
        pickle.dump(data, f)
    x = torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(1))
    torch.save(dict(x=x, y=net(x).detach()), tmp_path / 'io.pt')
    # The subprocess runs from an empty folder with only the project on its path: the
    # defining module cannot be imported there, so the embedded source must be executed.
    code = textwrap.dedent(f'''
        import importlib.util, json, torch
        from torch_utils import persistence
        assert importlib.util.find_spec({temp_module.__name__!r}) is None
        with open({str(pkl)!r}, 'rb') as f:
            data = persistence.load(f)
        net = data['ema']
        io = torch.load({str(tmp_path / 'io.pt')!r}, weights_only=True)
        err = (net(io['x']) - io['y']).abs().max().item()
        print(json.dumps(dict(keys=sorted(data), err=err, module=type(net).__module__,
                              loss=[data['loss_fn'].P_mean, data['loss_fn'].P_std],
                              ds=type(data['dataset_kwargs']).__module__ + '.' + type(data['dataset_kwargs']).__name__,
                              res=data['dataset_kwargs'].resolution, persistent=persistence.is_persistent(net),
                              gain=type(net.gain).__name__, info=net.info.kind)))
    ''')
    empty = tmp_path / 'empty'
    empty.mkdir()
    r = run_python(code, cwd=str(empty))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out['keys'] == ['augment_pipe', 'dataset_kwargs', 'ema', 'loss_fn']
    assert out['err'] == 0.0                       # same weights, same ops, same process type
    assert out['module'].startswith('_imported_module_')
    assert out['loss'] == [-1.2, 1.2]
    assert out['ds'] == 'dnnlib.util.EasyDict' and out['res'] == 8
    assert out['persistent'] and out['gain'] == 'float64' and out['info'] == 'tiny'


def test_reloaded_object_pickles_again_with_its_source(temp_module):
    net, data = snapshot(temp_module)
    once = persistence.load(pickle.dumps(data))
    # Pretend the loaded copy came from elsewhere: it must carry the source itself.
    twice = persistence.load(pickle.dumps(once))
    assert type(twice['ema'])._orig_module_src == MODULE_SRC
    for a, b in zip(net.state_dict().values(), twice['ema'].state_dict().values()):
        assert torch.equal(a, b)
    assert twice['ema'].init_kwargs == {} and twice['ema'].init_args == (4,)


def numpy1_pickle(obj):
    """Pickle `obj` as numpy 1.x would name things (`numpy.core.*`). Protocol 2 spells globals
    as 'c<module>\\n<name>\\n', so the module can be renamed by a byte replacement."""
    data = pickle.dumps(obj, protocol=2)
    count = data.count(b'cnumpy._core.')
    assert count > 0, 'nothing to rewrite: the test would prove nothing'
    return data.replace(b'cnumpy._core.', b'cnumpy.core.')


def test_numpy1_scalar_references_load_under_numpy2(tmp_path):
    value = dict(scale=np.float64(np.sqrt(0.5)), n=np.int64(7), arr=np.arange(3, dtype=np.float32))
    data = numpy1_pickle(value)
    assert b'numpy.core.multiarray\nscalar' in data
    path = tmp_path / 'np1.pkl'
    path.write_bytes(data)
    # Simulate a numpy without the numpy.core compatibility package (numpy 2 deprecates it):
    # plain pickle must fail there, persistence.load must not need it.
    code = textwrap.dedent(f'''
        import pickle, sys, warnings
        warnings.simplefilter('error', DeprecationWarning)
        sys.modules['numpy.core'] = None
        sys.modules['numpy.core.multiarray'] = None
        import numpy as np
        from torch_utils import persistence
        data = open({str(path)!r}, 'rb').read()
        try:
            pickle.loads(data)
            print('plain pickle loaded')
        except ImportError:
            print('plain pickle failed')
        v = persistence.load(data)
        assert type(v['scale']) is np.float64 and v['scale'] == np.sqrt(0.5), v
        assert type(v['n']) is np.int64 and v['n'] == 7
        assert v['arr'].dtype == np.float32 and v['arr'].tolist() == [0, 1, 2]
        print('ok')
    ''')
    r = run_python(code, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ['plain', 'pickle', 'failed', 'ok']


def test_compat_unpickler_maps_numpy_core_names():
    up = persistence._CompatUnpickler(io.BytesIO(b''))
    assert up.find_class('numpy.core.multiarray', 'scalar') is np._core.multiarray.scalar
    assert up.find_class('numpy.core.multiarray', '_reconstruct') is np._core.multiarray._reconstruct
    assert up.find_class('dnnlib.util', 'EasyDict') is dnnlib.EasyDict
    assert up.find_class('dnnlib', 'EasyDict') is dnnlib.EasyDict


def test_easydict_pickles_under_both_names():
    d = dnnlib.EasyDict(path='x.zip', xflip=False)
    data = pickle.dumps(d)
    assert b'dnnlib.util' in data                # the name the released pickles use
    back = persistence.load(data)
    assert type(back) is dnnlib.EasyDict and back.path == 'x.zip' and back == d
    # The same object under the package-level name.
    short = pickle.dumps(d, protocol=2).replace(b'cdnnlib.util\nEasyDict\n', b'cdnnlib\nEasyDict\n')
    assert b'dnnlib.util' not in short
    assert persistence.load(short) == d and type(persistence.load(short)) is dnnlib.EasyDict


def reconstruct(meta):
    return persistence._reconstruct_persistent_obj(meta)


def test_rejects_unknown_meta():
    with pytest.raises(pickle.UnpicklingError, match='type'):
        reconstruct(dict(type='function', version=6, module_src='', class_name='x', state=None))
    with pytest.raises(pickle.UnpicklingError, match='newer'):
        reconstruct(dict(type='class', version=99, module_src='', class_name='x', state=None))
    src = 'class Plain:\n    pass\n'
    with pytest.raises(pickle.UnpicklingError, match='not persistent'):
        reconstruct(dict(type='class', version=6, module_src=src, class_name='Plain', state=None))


def test_failed_module_source_is_not_cached():
    src = 'import module_that_does_not_exist_xyz\n'
    meta = dict(type='class', version=6, module_src=src, class_name='X', state=None)
    for _ in range(2):     # the second attempt executes the source again, raising the same error
        with pytest.raises(ModuleNotFoundError):
            reconstruct(meta)
    assert src not in persistence._src_to_module
    assert not [m for m in sys.modules if m.startswith('_imported_module_') and sys.modules[m] is None]
