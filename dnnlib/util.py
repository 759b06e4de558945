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
    with status 2, without a traceback."""


def run_cli(command, args=None):
    """Run a click command so that every usage or input error is one line on stderr, a non-zero
    exit and no traceback (click's own error output spans several lines)."""
    try:
        command.main(args=args, standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        print('Error: aborted', file=sys.stderr)
        sys.exit(130)
    except click.ClickException as e:
        print(f'Error: {e.format_message()}', file=sys.stderr)
        sys.exit(2)
    except UserError as e:
        print(f'Error: {e}', file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print('Error: interrupted', file=sys.stderr)
        sys.exit(130)


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
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise UserError(f'cannot create the download folder {folder}: {e.strerror}') from None
    fd, tmp = tempfile.mkstemp(dir=folder, prefix='.' + os.path.basename(dest) + '.', suffix='.part')
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
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(
            f'download of {url} failed ({reason}). It was to be saved as {dest}. Offline, copy the '
            f'file there by hand or pass its local path with {flag}.') from None
    except BaseException:
        _remove_quietly(tmp)
        raise
    return dest


def _remove_quietly(path):
    try:
        os.remove(path)
    except OSError:
        pass


def open_url(url_or_path, cache_dir=None, progress=True, mode='rb'):
    """Open a local path, file:// URL, or http(s) URL (downloaded into the cache first)."""
    return open(resolve_path(url_or_path, cache_dir=cache_dir, progress=progress), mode)
