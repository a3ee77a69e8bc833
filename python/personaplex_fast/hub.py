"""Downloads from the Hugging Face Hub, with one-line errors a user can act on.

Both official repos are gated: the user must accept the model license on the
repo page and provide a token (`HF_TOKEN` or `huggingface-cli login`).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from .errors import CheckpointError


def download(repo: str, files: tuple[str, ...], optional: tuple[str, ...] = ()) -> Path | None:
    """Fetch `files` (required) and those `optional` files the repo has (offline: those
    the local cache holds); returns the snapshot dir, None when nothing was found."""
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub import errors as hf_errors
    except ImportError:  # pragma: no cover - it is a declared dependency
        raise CheckpointError("huggingface_hub is not installed: pip install huggingface_hub") from None

    token = os.environ.get("HF_TOKEN") or None
    path = None
    for name in (*files, *optional):
        needed = name not in optional
        try:
            cached = _cached(repo, name, needed)
            if cached is _ABSENT:
                continue
            path = Path(cached or hf_hub_download(repo, name, token=token))
        except hf_errors.GatedRepoError:
            how = ("accept the license on https://huggingface.co/" + repo if token
                   else "set HF_TOKEN (or run `huggingface-cli login`) after accepting its license")
            raise CheckpointError(f"{repo} is gated: {how}") from None
        except hf_errors.RepositoryNotFoundError:
            raise CheckpointError(
                f"{repo}: repository not found on Hugging Face (or private: set HF_TOKEN)") from None
        except hf_errors.LocalEntryNotFoundError:
            if not needed:
                continue
            raise CheckpointError(_offline(repo, name)) from None
        except hf_errors.EntryNotFoundError:
            if not needed:
                continue
            raise CheckpointError(f"{repo}: the repository has no file {name}") from None
        except hf_errors.HfHubHTTPError as e:
            status = getattr(getattr(e, "response", None), "status_code", None)
            if status == 401:
                raise CheckpointError(f"{repo}: not authorized: set HF_TOKEN to a valid token") from None
            raise CheckpointError(f"{repo}: download of {name} failed (HTTP {status})") from None
        except OSError as e:
            raise CheckpointError(f"{repo}: download of {name} failed ({e.strerror or e})") from None
    return None if path is None else path.parent


def _offline(repo: str, name: str) -> str:
    return (f"{repo}: cannot download {name}: huggingface.co is not reachable and the file is "
            "not in the local Hugging Face cache (pass a local checkpoint path instead)")


_ABSENT = object()  # an optional file that is not in the cache, with the Hub out of reach


def _cached(repo: str, name: str, needed: bool):
    """The cached file; else None (download it), or, with the Hub out of reach (offline
    or unreachable), _ABSENT for an optional file and the offline error for a needed one.

    Checking the cache and the host first avoids huggingface_hub's retry loop
    (about 20 s of backoff messages) when there is no network at all.
    """
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub import errors as hf_errors

    try:
        return hf_hub_download(repo, name, local_files_only=True)
    except (hf_errors.LocalEntryNotFoundError, hf_errors.EntryNotFoundError, OSError):
        pass
    if constants.HF_HUB_OFFLINE:
        if not needed:
            return _ABSENT
        raise CheckpointError(_offline(repo, name) + " [HF_HUB_OFFLINE is set]")
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        if not needed:
            return _ABSENT
        raise CheckpointError(_offline(repo, name)) from None
    return None
