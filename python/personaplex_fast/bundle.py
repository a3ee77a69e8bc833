"""The web client `serve` serves at /: a folder given with --static (such as the unpacked
official client), the model repo's dist.tgz (NVIDIA's server serves it too), or our page.
Every client talks to the same /api/chat; ours also reads /api/info."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from . import archive
from .errors import UserError

OURS = Path(__file__).parent / "web"
DIST_ARCHIVE = "dist.tgz"
# The official bundle is a few dozen files, a few MB (the Opus decoder's wasm the largest).
LIMITS = archive.Limits(members=2048, member_bytes=32 << 20, total_bytes=128 << 20)


def page_folder(model, static: str | None) -> tuple[Path, str]:
    """(the folder to serve at /, what it is, for the log)."""
    if static == "ours":
        return OURS, "this package's page"
    if static:
        folder = Path(static).expanduser()
        if not (folder / "index.html").is_file():
            raise UserError(f"--static {static}: no index.html in that folder (give the folder of an "
                            "unpacked client bundle, such as the official dist)")
        return folder, f"the client bundle in {folder}"
    path = model.directory / DIST_ARCHIVE
    if not path.exists():
        from .checkpoint import is_hf_name

        if is_hf_name(model.source):
            from .hub import download

            download(model.source, (), optional=(DIST_ARCHIVE,))
    if not path.exists():
        return OURS, "this package's page (the model has no dist.tgz)"
    folder = archive.unpack(path, archive.cache_dir("dist"), "client bundle", _bundle_file, LIMITS)
    root = folder / "dist" if (folder / "dist" / "index.html").is_file() else folder
    if not (root / "index.html").is_file():
        raise UserError(f"{path}: no index.html (or dist/index.html) inside; not a client bundle "
                        "(serve --static ours serves this package's page)")
    return root, f"the model's client bundle ({DIST_ARCHIVE})"


def _bundle_file(name: PurePosixPath) -> str | None:
    return None if name.name.startswith("._") else str(name)  # "._x": macOS resource forks
