"""dnnlib: EasyDict and cached downloads (local HTTP server on 127.0.0.1, file://, plain paths)."""

import http.server
import os
import threading

import pytest

import dnnlib
from dnnlib.util import UserError, open_url, resolve_path

PAYLOAD = os.urandom(300_000)


class _Handler(http.server.BaseHTTPRequestHandler):
    hits = []

    def do_GET(self):  # noqa: N802
        _Handler.hits.append(self.path)
        if self.path.startswith('/missing'):
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header('Content-Length', str(len(PAYLOAD)))
        self.end_headers()
        if self.path.startswith('/truncated'):
            self.wfile.write(PAYLOAD[:1000])      # then close: the client must notice
            self.close_connection = True
            return
        self.wfile.write(PAYLOAD)

    def log_message(self, *args):
        pass


@pytest.fixture(scope='module')
def server():
    httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f'http://127.0.0.1:{httpd.server_address[1]}'
    httpd.shutdown()


def test_easydict():
    d = dnnlib.EasyDict(a=1)
    d.b = 2
    assert d['b'] == 2 and d.a == 1
    with pytest.raises(AttributeError):
        _ = d.c


def test_download_once_then_cached(server, tmp_path):
    _Handler.hits.clear()
    url = server + '/files/net.pkl?x=1'
    path = resolve_path(url, cache_dir=tmp_path, progress=False)
    assert path == str(tmp_path / 'net.pkl')
    assert open(path, 'rb').read() == PAYLOAD
    with open_url(url, cache_dir=tmp_path, progress=False) as f:
        assert f.read() == PAYLOAD
    assert len(_Handler.hits) == 1                      # second use: no network
    assert os.listdir(tmp_path) == ['net.pkl']          # no temporary files left


@pytest.mark.parametrize('path', ['/truncated/net.pkl', '/missing/net.pkl'])
def test_failed_download_leaves_nothing(server, tmp_path, path):
    with pytest.raises(UserError) as e:
        resolve_path(server + path, cache_dir=tmp_path, progress=False)
    msg = str(e.value)
    assert server + path in msg and str(tmp_path / 'net.pkl') in msg and '--model_path' in msg
    assert '\n' not in msg
    assert os.listdir(tmp_path) == []
    # Nor the folders it created for the file (e.g. ./src/<model>/), while existing ones stay.
    with pytest.raises(UserError):
        resolve_path(server + path, cache_dir=tmp_path / 'src' / 'model', progress=False)
    assert os.listdir(tmp_path) == []


def test_unreachable_host_is_one_short_reason(tmp_path):
    with pytest.raises(UserError) as e:
        resolve_path('http://127.0.0.1:9/net.pkl', cache_dir=tmp_path / 'src', progress=False)
    assert 'cannot connect: Connection refused' in str(e.value) and 'HTTPConnectionPool' not in str(e.value)
    assert os.listdir(tmp_path) == []


def test_local_path_and_file_url(tmp_path):
    p = tmp_path / 'w.bin'
    p.write_bytes(b'abc')
    assert resolve_path(str(p)) == str(p)
    assert resolve_path('file://' + str(p)) == str(p)
    with pytest.raises(UserError):
        resolve_path(str(tmp_path / 'nope.bin'))
    with pytest.raises(UserError):
        resolve_path('file://' + str(tmp_path / 'nope.bin'))
