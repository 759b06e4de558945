"""Self-contained pickles of network objects, in the format of NVlabs' EDM / StyleGAN code.

A class decorated with `@persistent_class` pickles as a call
`_reconstruct_persistent_obj(meta)`, where `meta` holds the full source of the module that
defined the class. Loading executes that source as a fresh module, so a pickle loads even where
the original module (e.g. EDM's `training.networks`) does not exist. The released EDM checkpoints
reconstruct through exactly this function name, with meta keys
`type, version, module_src, class_name, state`.
"""

import copy
import hashlib
import inspect
import io
import pickle
import sys
import types

_version = 6                  # the meta version written by NVlabs' code; we read and write it
_src_to_module = {}           # module source -> module object created from it
_module_to_src = {}           # module object -> its source
_reconstructed_prefix = '_imported_module_'


def persistent_class(orig_class):
    """Make instances of `orig_class` pickle together with the source of its module."""
    assert isinstance(orig_class, type)
    if is_persistent(orig_class):
        return orig_class
    orig_module = sys.modules[orig_class.__module__]
    orig_module_src = _module_to_src_text(orig_module)

    class Decorator(orig_class):
        _orig_module_src = orig_module_src
        _orig_class_name = orig_class.__name__

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            # Kept so that a loaded object can be rebuilt (as EDM does); copies avoid aliasing.
            self._init_args = copy.deepcopy(args)
            self._init_kwargs = copy.deepcopy(kwargs)

        @property
        def init_args(self):
            return copy.deepcopy(self._init_args)

        @property
        def init_kwargs(self):
            return copy.deepcopy(self._init_kwargs)

        def __reduce__(self):
            fields = list(super().__reduce__())
            fields += [None] * max(3 - len(fields), 0)
            if fields[0] is not _reconstruct_persistent_obj:
                meta = dict(type='class', version=_version, module_src=self._orig_module_src,
                            class_name=self._orig_class_name, state=fields[2])
                fields[0] = _reconstruct_persistent_obj
                fields[1] = (meta,)
                fields[2] = None
            return tuple(fields)

    Decorator.__name__ = orig_class.__name__
    Decorator.__qualname__ = orig_class.__qualname__
    Decorator.__module__ = orig_class.__module__
    Decorator.__doc__ = orig_class.__doc__
    return Decorator


def is_persistent(obj):
    cls = obj if isinstance(obj, type) else type(obj)
    return hasattr(cls, '_orig_module_src') and hasattr(cls, '_orig_class_name')


def _module_to_src_text(module):
    src = _module_to_src.get(module)
    if src is None:
        src = inspect.getsource(module)
        _module_to_src[module] = src
        _src_to_module[src] = module
    return src


def _src_to_module_obj(module_src):
    """Execute `module_src` once as a new module (cached by source text)."""
    module = _src_to_module.get(module_src)
    if module is None:
        name = _reconstructed_prefix + hashlib.sha1(module_src.encode()).hexdigest()
        module = types.ModuleType(name)
        sys.modules[name] = module
        _module_to_src[module] = module_src
        _src_to_module[module_src] = module
        try:
            exec(compile(module_src, f'<persistent module {name}>', 'exec'), module.__dict__)  # noqa: S102
        except BaseException:
            # Forget the half-executed module, so that a later load (e.g. after installing a
            # missing import) executes the source again instead of reusing a broken module.
            del _src_to_module[module_src], _module_to_src[module]
            sys.modules.pop(name, None)
            raise
    return module


def _reconstruct_persistent_obj(meta):
    """Called by pickle for every persistent object (the name is part of the file format)."""
    meta = dict(meta)
    if meta.get('type') != 'class':
        raise pickle.UnpicklingError(f'unsupported persistent object type {meta.get("type")!r}')
    if int(meta.get('version', 0)) > _version:
        raise pickle.UnpicklingError(f'persistent object version {meta["version"]} is newer than {_version}')
    module = _src_to_module_obj(meta['module_src'])
    cls = getattr(module, meta['class_name'])
    if not is_persistent(cls):
        raise pickle.UnpicklingError(f'class {meta["class_name"]} in the embedded source is not persistent')
    obj = cls.__new__(cls)
    state = meta.get('state')
    if state is not None:
        setstate = getattr(obj, '__setstate__', None)
        if callable(setstate):
            setstate(state)
        else:
            obj.__dict__.update(state)
    return obj


# ----------------------------------------------------------------------------------------------
# Loading pickles written by other numpy versions.

class _CompatUnpickler(pickle.Unpickler):
    """Unpickler that maps numpy 1.x module paths (`numpy.core.*`, used by the released EDM
    pickles) to their numpy 2 homes (`numpy._core.*`) and back, whichever numpy is installed."""

    def find_class(self, module, name):
        import numpy
        if module.startswith('numpy.core') and not hasattr(numpy, '_core'):
            pass
        elif module.startswith('numpy.core'):
            module = 'numpy._core' + module[len('numpy.core'):]
        elif module.startswith('numpy._core') and not hasattr(numpy, '_core'):
            module = 'numpy.core' + module[len('numpy._core'):]
        return super().find_class(module, name)


def load(file):
    """Unpickle from a binary file object or bytes, with the numpy compatibility mapping."""
    if isinstance(file, (bytes, bytearray)):
        file = io.BytesIO(file)
    return _CompatUnpickler(file).load()
