"""What `serve` serves at /: --static DIR, the model's dist.tgz (as NVIDIA's server does), or
our page; a bundle that is not one is refused in one line."""

import io
import os
import subprocess
import sys
import tarfile
import urllib.request

import pytest

from personaplex_fast import bundle
from personaplex_fast.errors import UserError

INDEX = b"<!doctype html><title>official client</title><script src='/assets/index-abc.js'></script>"
SCRIPT = b"console.log('a client bundle');"


def tgz(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def model_with_dist(tmp_path, tiny, members) -> object:
    model = tmp_path / "model"
    model.mkdir()
    for f in tiny.iterdir():
        os.link(f, model / f.name)
    (model / "dist.tgz").write_bytes(tgz(members))
    return model


def serve(model, *args, cache):
    return subprocess.Popen([sys.executable, "-m", "personaplex_fast.cli", "serve", "--model", str(model),
                             "--port", "0", "--max-sessions", "1", *args],
                            env={**os.environ, "PERSONAPLEX_FAST_CACHE": str(cache)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read()


@pytest.mark.parametrize("how", ["dist.tgz", "--static"])
def test_a_client_bundle_is_served_at_the_root(tmp_path, tiny, how):
    if how == "dist.tgz":  # the official archive's layout: a dist/ folder
        model, args = model_with_dist(tmp_path, tiny, {"dist/index.html": INDEX,
                                                       "dist/assets/index-abc.js": SCRIPT}), []
    else:
        folder = tmp_path / "unpacked"
        (folder / "assets").mkdir(parents=True)
        (folder / "index.html").write_bytes(INDEX)
        (folder / "assets" / "index-abc.js").write_bytes(SCRIPT)
        model, args = tiny, ["--static", str(folder)]
    proc = serve(model, *args, cache=tmp_path / "cache")
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving http://"), proc.stderr.read() if proc.poll() is not None else line
        base = line.split()[1].rstrip("/")
        assert get(base + "/") == INDEX and get(base + "/assets/index-abc.js") == SCRIPT
        assert b"NATF0" in get(base + "/api/info")  # the API is there whatever the page
    finally:
        proc.terminate()
        assert proc.wait(10) == 0
    if how == "dist.tgz":  # unpacked once into the cache, not next to the model
        assert sorted(p.name for p in (tmp_path / "cache" / "dist").glob("*/dist/*")) == ["assets", "index.html"]


def test_our_page_without_a_bundle(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("PERSONAPLEX_FAST_CACHE", str(tmp_path / "cache"))

    class Model:
        directory, source = tiny, str(tiny)

    assert bundle.page_folder(Model, None)[0] == bundle.OURS
    assert bundle.page_folder(Model, "ours")[0] == bundle.OURS
    with pytest.raises(UserError, match="--static .*: no index.html in that folder"):
        bundle.page_folder(Model, str(tmp_path))


@pytest.mark.parametrize("members, error", [
    ({"dist/index.html": INDEX, "dist/../../evil.js": SCRIPT}, "refusing unsafe archive member 'dist/../../evil.js'"),
    ({"dist/assets/x.js": SCRIPT}, "no index.html (or dist/index.html) inside; not a client bundle"),
])
def test_a_bad_bundle_stops_serve_in_one_line(tmp_path, tiny, members, error):
    proc = serve(model_with_dist(tmp_path, tiny, members), cache=tmp_path / "cache")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and out == "", err
    lines = err.strip().splitlines()
    assert error in lines[-1] and "dist.tgz" in lines[-1] and "Traceback" not in err, err
    assert not (tmp_path / "evil.js").exists()
    if "unsafe" in error:  # a refused archive leaves nothing in the cache
        assert not list((tmp_path / "cache").rglob("*.js"))
