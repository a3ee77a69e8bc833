"""Voice files: the torch-free restricted .pt reader, voices.tgz unpacking, caching."""

import io
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from personaplex_fast import torchfile, voices
from personaplex_fast.config import LMConfig
from personaplex_fast.errors import UserError

CFG = LMConfig(dim=8, num_heads=2, text_card=100, card=64)  # n_q = 16: 17 streams


def test_reader_matches_torch_for_plain_tensors(tmp_path):
    t = {
        "embeddings": torch.randn(6, 1, 1, 16).to(torch.bfloat16),
        "cache": torch.arange(120).view(10, 12)[:, 3:9].t(),  # a strided, offset view
        "nested": {"half": torch.randn(3, dtype=torch.float16), "flag": torch.tensor([True, False])},
    }
    torch.save(t, tmp_path / "v.pt")
    got = torchfile.load(tmp_path / "v.pt")
    assert np.array_equal(got["embeddings"], t["embeddings"].float().numpy())
    assert np.array_equal(got["cache"], t["cache"].numpy())
    assert np.array_equal(got["nested"]["half"], t["nested"]["half"].numpy())
    assert got["nested"]["flag"].tolist() == [True, False]


def test_writer_output_loads_in_torch(tmp_path):
    x = {"embeddings": np.random.default_rng(0).standard_normal((4, 1, 1, 8)).astype(np.float32),
         "cache": np.arange(17 * 4).reshape(1, 17, 4)}
    torchfile.save(tmp_path / "w.pt", x, bf16=("embeddings",))
    back = torch.load(tmp_path / "w.pt", weights_only=True)
    assert back["embeddings"].dtype == torch.bfloat16
    np.testing.assert_allclose(back["embeddings"].float().numpy(), x["embeddings"], rtol=8e-3)
    assert np.array_equal(back["cache"].numpy(), x["cache"])
    assert np.array_equal(torchfile.load(tmp_path / "w.pt")["cache"], x["cache"])


class _Exploit:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_code_in_a_pickle_is_refused_not_run(tmp_path):
    sentinel = tmp_path / "pwned"
    torch.save({"embeddings": torch.zeros(1), "x": _Exploit(sentinel)}, tmp_path / "evil.pt")
    with pytest.raises(UserError, match="refusing to load .*system"):
        torchfile.load(tmp_path / "evil.pt")
    assert not sentinel.exists()
    (tmp_path / "junk.pt").write_bytes(b"not a zip")
    with pytest.raises(UserError, match="cannot read PyTorch file"):
        torchfile.load(tmp_path / "junk.pt")


def test_archive_with_path_traversal_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("PERSONAPLEX_FAST_CACHE", str(tmp_path / "cache"))
    archive = tmp_path / "voices.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        data = b"x"
        info = tarfile.TarInfo("voices/../../evil.pt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(UserError, match="unsafe archive member"):
        voices.unpack(archive)
    assert not (tmp_path / "evil.pt").exists()


def test_packaged_voice_is_cached_as_safetensors(tmp_path, monkeypatch):
    monkeypatch.setenv("PERSONAPLEX_FAST_CACHE", str(tmp_path / "cache"))
    E, dim = 5, 8
    emb = np.random.default_rng(1).standard_normal((E, 1, 1, dim)).astype(np.float32)
    ring = np.random.default_rng(2).integers(0, 50, (1, 17, 4))
    folder = tmp_path / "voices"
    folder.mkdir()
    torchfile.save(folder / "NATF2.pt", {"embeddings": emb, "cache": ring})
    with tarfile.open(tmp_path / "voices.tgz", "w:gz") as tar:
        tar.add(folder, arcname="voices")
    v = voices.load_voice("NATF2", tmp_path, CFG)
    assert np.array_equal(v.embeddings, emb.reshape(E, dim))
    # PersonaPlex saved the ring at offset E + 1 (ring of 4): positions E and E + 1.
    assert np.array_equal(v.ring_tokens, np.stack([ring[0, :, E % 4], ring[0, :, (E + 1) % 4]]))
    cached = list((tmp_path / "cache").rglob("NATF2.safetensors"))
    assert len(cached) == 1
    again = voices.load_voice("NATF2", tmp_path, CFG)
    assert np.array_equal(again.embeddings, v.embeddings)
    with pytest.raises(UserError, match="not in .*voices.tgz"):
        voices.load_voice("VARM4", tmp_path, CFG)
    with pytest.raises(UserError, match="no voices.tgz"):
        voices.load_voice("NATF2", tmp_path / "voices", CFG)


class _StorageRef:
    pass


class _View:
    """Pickles as a tensor view (size, stride, offset) of the crafted file's storage."""

    def __init__(self, size, stride, offset=0):
        self.args = (offset, tuple(size), tuple(stride))

    def __reduce__(self):
        import collections

        return (torch._utils._rebuild_tensor_v2,
                (_StorageRef(), *self.args, False, collections.OrderedDict()))


def _save_crafted(path, obj, storage=np.arange(4, dtype=np.int64), compress=False):
    import pickle
    import zipfile

    class Pickler(pickle.Pickler):
        def persistent_id(self, o):
            return ("storage", torch.LongStorage, "0", "cpu", 4) if isinstance(o, _StorageRef) else None

    buf = io.BytesIO()
    Pickler(buf, protocol=2).dump(obj)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED) as z:
        z.writestr("x/data.pkl", buf.getvalue())
        z.writestr("x/data/0", storage.tobytes())


def test_views_outside_their_storage_are_refused(tmp_path):
    _save_crafted(tmp_path / "oob.pt", {"cache": _View((1 << 20,), (1,))})
    with pytest.raises(UserError, match="outside its storage"):
        torchfile.load(tmp_path / "oob.pt")


@pytest.mark.parametrize("view", [
    _View((1 << 16, 1 << 16), (0, 0)),  # 4 elements repeated 4 billion times
    _View((1000, 4), (0, 1)),  # stride 0 on one axis
    _View((3, 2), (1, 1)),  # overlapping rows: 6 elements of a 4-element storage
    _View((3,), (0,), offset=2),  # more than is left past the offset
])
def test_views_larger_than_their_storage_are_refused(tmp_path, view):
    _save_crafted(tmp_path / "rep.pt", {"cache": view})
    with pytest.raises(UserError, match="more than the .* of its storage"):
        torchfile.load(tmp_path / "rep.pt")


def test_a_legitimate_overlap_free_view_still_loads(tmp_path):
    _save_crafted(tmp_path / "ok.pt", {"cache": _View((2, 2), (1, 2))})  # a transpose
    assert torchfile.load(tmp_path / "ok.pt")["cache"].tolist() == [[0, 2], [1, 3]]


def test_what_a_file_may_cost_is_bounded(tmp_path):
    """Many views of one storage, and a deflated storage that inflates far: both stop
    at the byte budget, before the memory is taken."""
    _save_crafted(tmp_path / "many.pt", {"cache": [_View((4,), (1,)) for _ in range(100)]})
    with pytest.raises(UserError, match="more than 0 MB of tensors"):
        torchfile.load(tmp_path / "many.pt", max_bytes=2000)
    _save_crafted(tmp_path / "bomb.pt", {"cache": _View((4,), (1,))},
                  storage=np.zeros(8 << 20, np.int64), compress=True)
    assert (tmp_path / "bomb.pt").stat().st_size < 200_000
    with pytest.raises(UserError, match="more than 16 MB of tensors"):
        torchfile.load(tmp_path / "bomb.pt", max_bytes=16 << 20)


def test_voice_file_without_the_voice_keys_is_refused(tmp_path):
    torch.save({"weights": torch.zeros(2)}, tmp_path / "w.pt")
    with pytest.raises(UserError, match="not a PersonaPlex voice"):
        voices.read_pt_voice(tmp_path / "w.pt")


def test_macos_resource_forks_are_not_voices(tmp_path, monkeypatch):
    monkeypatch.setenv("PERSONAPLEX_FAST_CACHE", str(tmp_path / "cache"))
    with tarfile.open(tmp_path / "voices.tgz", "w:gz") as tar:
        for name in ("voices/._NATF0.pt", "voices/NATF0.wav"):
            info = tarfile.TarInfo(name)
            info.size = 1
            tar.addfile(info, io.BytesIO(b"x"))
    assert voices.list_voices(voices.unpack(tmp_path / "voices.tgz")) == ["NATF0"]


def _archive_of(tmp_path, members: dict[str, bytes]) -> Path:
    archive = tmp_path / "voices.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return archive


def _pt_bytes(tmp_path, E=5, dim=8, ring=None, streams=17) -> bytes:
    emb = np.random.default_rng(1).standard_normal((E, 1, 1, dim)).astype(np.float32)
    ring = np.random.default_rng(2).integers(0, 50, (1, streams, 4)) if ring is None else ring
    torchfile.save(tmp_path / "tmp.pt", {"embeddings": emb, "cache": ring})
    return (tmp_path / "tmp.pt").read_bytes()


def _cache_files(tmp_path):
    return sorted(p.name for p in (tmp_path / "cache").rglob("*") if p.is_file())


@pytest.mark.parametrize("case, error", [
    ("id past the table", "token 5000 of stream 3 is outside its table"),
    ("id below -1", "token -2 of stream 0 is outside its table"),
    ("16 streams", "has 16 streams, the model has 17"),
    ("width 16", "width 16, the model needs 8"),
    ("800 frames", "has 800 frames; the limit is 750"),
])
def test_voices_that_do_not_fit_the_model_are_refused_before_caching(tmp_path, monkeypatch, case, error):
    monkeypatch.setenv("PERSONAPLEX_FAST_CACHE", str(tmp_path / "cache"))
    ring = np.random.default_rng(2).integers(0, 50, (1, 17, 4))
    kw = {}
    if case == "id past the table":
        ring[0, 3, :] = 5000
    elif case == "id below -1":
        ring[0, 0, :] = -2
    elif case == "16 streams":
        ring = ring[:, :16]
    elif case == "width 16":
        kw = dict(dim=16)
    else:
        kw = dict(E=799)
    _archive_of(tmp_path, {"voices/BAD.pt": _pt_bytes(tmp_path, ring=ring, **kw)})
    with pytest.raises(UserError, match=error) as e:
        voices.load_voice("BAD", tmp_path, CFG)
    assert "\n" not in str(e.value)
    assert _cache_files(tmp_path) == [".complete", "BAD.pt"]  # no safetensors written


def test_a_damaged_cache_entry_is_made_again(tmp_path, monkeypatch):
    monkeypatch.setenv("PERSONAPLEX_FAST_CACHE", str(tmp_path / "cache"))
    _archive_of(tmp_path, {"voices/NATF0.pt": _pt_bytes(tmp_path)})
    first = voices.load_voice("NATF0", tmp_path, CFG)
    (cached,) = (tmp_path / "cache").rglob("NATF0.safetensors")
    cached.write_bytes(b"garbage")
    again = voices.load_voice("NATF0", tmp_path, CFG)
    np.testing.assert_array_equal(again.embeddings, first.embeddings)


@pytest.mark.parametrize("members, error", [
    ({f"voices/V{i}.wav": b"x" for i in range(300)}, "more than 256 members"),
    ({"voices/NATF0.pt": b"x", "voices/BIG.wav": bytes(33 << 20)}, "member 'voices/BIG.wav' has 33 MB"),
    ({"voices/NATF0.wav": b"x", "voices/../../evil.pt": b"x"}, "unsafe archive member"),
])
def test_a_refused_archive_leaves_nothing_in_the_cache(tmp_path, monkeypatch, members, error):
    monkeypatch.setenv("PERSONAPLEX_FAST_CACHE", str(tmp_path / "cache"))
    with pytest.raises(UserError, match=error):
        voices.unpack(_archive_of(tmp_path, members))
    assert _cache_files(tmp_path) == [] and not (tmp_path / "evil.pt").exists()


def test_a_gzip_bomb_stops_at_the_archive_limit(tmp_path, monkeypatch):
    """300 MB of zeros in one skipped member (gzip: ~300 KB): refused from its header
    before it is inflated."""
    monkeypatch.setenv("PERSONAPLEX_FAST_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(voices, "MAX_ARCHIVE_BYTES", 8 << 20)
    archive = tmp_path / "voices.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("voices/README")
        info.size = 64 << 20

        class Zeros(io.RawIOBase):
            def readinto(self, b):
                b[:] = bytes(len(b))
                return len(b)

        tar.addfile(info, Zeros())
    assert archive.stat().st_size < 200_000
    with pytest.raises(UserError, match="more than 256 members or 8 MB"):
        voices.unpack(archive)
    assert _cache_files(tmp_path) == []
    # A member's name is read into memory whole (a GNU long-name record): bounded too.
    with tarfile.open(archive, "w:gz", format=tarfile.GNU_FORMAT) as tar:
        info = tarfile.TarInfo("voices/" + "n" * (12 << 20) + ".wav")
        tar.addfile(info, io.BytesIO())
    with pytest.raises(UserError, match="unpacks to more than 8 MB"):
        voices.unpack(archive)
    assert _cache_files(tmp_path) == []
