"""Small utilities shared across the project, named after NVlabs' `dnnlib` so that EDM pickles
(whose embedded sources may import it) and EDM users find the same names."""

from .util import EasyDict, UserError, open_url, run_cli  # noqa: F401
