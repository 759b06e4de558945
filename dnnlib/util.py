"""EasyDict, user-facing errors, the command-line runner and its checks, and cached downloads."""

import hashlib
import os
import re
import sys
import tempfile
import urllib.parse

import click


class EasyDict(dict):
    """A dict whose keys can also be read and written as attributes."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name, value):
        self[name] = value

    def __delattr__(self, name):
        del self[name]


class UserError(Exception):
    """A problem with the user's input or environment. The CLIs print it as one line and exit
    with status 2, without a traceback.

    Under torchrun most errors are raised alike by every process (the same flags, files and
    checks), so only rank 0 prints them. `local=True` marks one that only this process meets
    (e.g. a failed write of its own images): it prints it itself."""

    def __init__(self, message='', local=False):
        super().__init__(message)
        self.local = bool(local)


class PeerFailure(UserError):
    """Another process of the run failed (and reports why): this one stops without a word."""


EXIT_ERROR = 2


def launch_rank():
    """This process's rank under torchrun (RANK), also before the process group exists; 0 alone."""
    try:
        return int(os.environ.get('RANK', '0'))
    except ValueError:
        return 0


def report_error(message, local=False):
    """Print `message` as the one 'Error:' line (rank 0 only, unless `local`), and record it for
    torchrun (`record_error`)."""
    line = f'Error: {message}'
    if local or launch_rank() == 0:
        print(line, file=sys.stderr, flush=True)
    record_error(line)


def record_error(line):
    """Under torchrun, write `line` to this worker's error file (TORCHELASTIC_ERROR_FILE), so that
    torchrun's failure summary quotes it instead of pointing to a traceback that does not exist."""
    error_file = os.environ.get('TORCHELASTIC_ERROR_FILE')
    if error_file:
        import json
        import time
        # torchelastic's own record format; without a 'py_callstack' the summary shows the message.
        record = {'message': {'message': line, 'extraInfo': {'timestamp': str(int(time.time()))}}}
        try:
            with open(error_file, 'w') as f:
                json.dump(record, f)
        except OSError:
            pass


def run_cli(command, args=None):
    """Run a click command so that every usage or input error is one line on stderr, a non-zero
    exit and no traceback (click's own error output spans several lines)."""
    try:
        command.main(args=args, standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        report_error('aborted')
        sys.exit(130)
    except click.ClickException as e:       # the same arguments on every process
        report_error(e.format_message())
        sys.exit(EXIT_ERROR)
    except PeerFailure as e:
        record_error(f'Stopped: {e}')
        sys.exit(EXIT_ERROR)
    except UserError as e:
        report_error(str(e), local=e.local)
        sys.exit(EXIT_ERROR)
    except KeyboardInterrupt:
        report_error('interrupted')
        sys.exit(130)


def explicit_flags(ctx):
    """The options named on the command line of click context `ctx`, as opposed to click's
    defaults: a flag that does not apply to a run is refused only if the user actually gave it."""
    from click.core import ParameterSource
    return {name for name in ctx.params
            if ctx.get_parameter_source(name) not in (None, ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP)}


def refuse_inapplicable(opts, given, rules):
    """The one rule for options that do not apply: `rules` is a sequence of (flags, applies(opts),
    what they need); a flag in `given` whose rule does not apply is refused in one line naming it,
    never silently ignored."""
    for flags, applies, need in rules:
        for flag in flags:
            if flag in given and not applies(opts):
                raise UserError(f'--{flag}: {need}')


def check_writable_file(path, flag):
    """UserError (naming `flag`) unless `path` can be written: not a folder, and its folder exists
    or can be created. Used before long computations whose result goes there."""
    if os.path.isdir(path):
        raise UserError(f'{flag}: "{path}" is a folder; give a file name')
    check_writable_dir(os.path.dirname(os.path.abspath(path)), flag)


def check_writable_dir(path, flag='--outdir'):
    path = os.path.abspath(path)
    probe = path
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f'{flag}: cannot create or write "{path}" ("{probe}" is not a writable folder)')


# ----------------------------------------------------------------------------------------------
# Downloads.

def is_url(path_or_url):
    return re.match(r'^[a-z][a-z0-9+.-]*://', str(path_or_url)) is not None


def url_filename(url):
    """The file name a URL is cached under: the last path component, without the query."""
    name = os.path.basename(urllib.parse.urlparse(url).path)
    if not name:
        name = hashlib.md5(url.encode()).hexdigest()
    return name


def default_cache_dir():
    return os.environ.get('GITS_CACHE_DIR', os.path.join(os.path.expanduser('~'), '.cache', 'gits'))


def resolve_path(url_or_path, cache_dir=None, progress=True, flag='--model_path'):
    """Return a local file path for `url_or_path`.

    Local paths and file:// URLs are used as they are. http(s) URLs are downloaded once into
    `cache_dir` (default: ~/.cache/gits) under the URL's file name; a file already there is used
    without any network access. The download streams into a temporary file in the same folder
    and is renamed into place only when complete, so an interrupted download never leaves a file
    that looks finished.
    """
    url_or_path = str(url_or_path)
    if not is_url(url_or_path):
        if not os.path.isfile(url_or_path):
            raise UserError(f'file not found: {url_or_path}')
        return url_or_path
    parsed = urllib.parse.urlparse(url_or_path)
    if parsed.scheme == 'file':
        path = urllib.parse.unquote(parsed.path)
        if not os.path.isfile(path):
            raise UserError(f'file not found: {url_or_path}')
        return path
    if parsed.scheme not in ('http', 'https'):
        raise UserError(f'unsupported URL scheme "{parsed.scheme}" in {url_or_path}')
    cache_dir = cache_dir or default_cache_dir()
    dest = os.path.join(cache_dir, url_filename(url_or_path))
    if os.path.isfile(dest):
        return dest
    download(url_or_path, dest, progress=progress, flag=flag)
    return dest


def download(url, dest, progress=True, timeout=30, chunk_size=1 << 20, flag='--model_path'):
    """Stream `url` to `dest` atomically (temporary file + rename). Raises UserError with the URL,
    the destination and what to do offline (`flag` names the option that takes a local file)."""
    import requests
    from tqdm import tqdm

    folder = os.path.dirname(os.path.abspath(dest))
    created = _missing_folders(folder)      # removed again if the download fails
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise UserError(f'cannot create the download folder {folder}: {e.strerror}') from None
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix='.' + os.path.basename(dest) + '.', suffix='.part')
    except OSError as e:
        _remove_empty(created)
        raise UserError(f'cannot write into the download folder {folder}: {e.strerror}') from None
    try:
        with os.fdopen(fd, 'wb') as f:
            with requests.get(url, stream=True, timeout=timeout, allow_redirects=True) as r:
                r.raise_for_status()
                total = int(r.headers.get('Content-Length', 0)) or None
                bar = tqdm(total=total, unit='B', unit_scale=True, unit_divisor=1024,
                           desc=f'Downloading {os.path.basename(dest)}', disable=not progress,
                           file=sys.stderr)
                written = 0
                with bar:
                    for chunk in r.iter_content(chunk_size=chunk_size):
                        f.write(chunk)
                        written += len(chunk)
                        bar.update(len(chunk))
                if total is not None and written != total:
                    raise OSError(f'connection closed after {written} of {total} bytes')
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)      # mkstemp files are owner-only
        os.replace(tmp, dest)
    except (requests.RequestException, OSError) as e:
        _remove_quietly(tmp)
        _remove_empty(created)
        raise UserError(
            f'download of {url} failed ({failure_reason(e)}). It was to be saved as {dest}. Offline, copy the '
            f'file there by hand or pass its local path with {flag}.') from None
    except BaseException:
        _remove_quietly(tmp)
        _remove_empty(created)
        raise
    return dest


def failure_reason(e):
    """A short reason for a failed request: requests' connection errors nest urllib3's whole
    retry report; its last line-free, innermost part is what the user needs."""
    import requests
    if isinstance(e, requests.HTTPError) and e.response is not None:
        return f'HTTP {e.response.status_code} {e.response.reason}'
    if isinstance(e, requests.Timeout):
        return 'timed out'
    if isinstance(e, requests.ConnectionError):
        text = str(e)
        inner = re.findall(r"\(\[Errno [^]]*\] ([^)'\"]*)", text) or re.findall(r'\[Errno [^]]*\] ([^)\'"]*)', text)
        return 'cannot connect: ' + (inner[-1].strip() if inner else 'no connection')
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _missing_folders(folder):
    """The folders that os.makedirs(folder) would create, deepest first."""
    out = []
    while folder and not os.path.exists(folder):
        out.append(folder)
        parent = os.path.dirname(folder)
        if parent == folder:
            break
        folder = parent
    return out


def _remove_empty(folders):
    """Remove the folders a failed download created (deepest first), if still empty, so that a
    failure leaves nothing behind (e.g. no empty ./src/<model>/)."""
    for folder in folders:
        try:
            os.rmdir(folder)
        except OSError:
            return


def _remove_quietly(path):
    try:
        os.remove(path)
    except OSError:
        pass


def open_url(url_or_path, cache_dir=None, progress=True, mode='rb'):
    """Open a local path, file:// URL, or http(s) URL (downloaded into the cache first)."""
    return open(resolve_path(url_or_path, cache_dir=cache_dir, progress=progress), mode)
