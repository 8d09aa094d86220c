"""Where bytes live: fsspec options per URL prefix, whole-object writes, and redaction.

``storage_options`` in the config maps URL prefixes to fsspec options, e.g.::

    storage_options:
      "s3://audits/":  {client_kwargs: {endpoint_url: "http://10.0.0.5:9000"}}
      "s3://images/":  {anon: true}

A URL gets the options of its longest matching prefix (``options_for``); local paths and URLs that
match no prefix get ``{}``, so the filesystem's own defaults apply (for S3: the ``AWS_*``
environment variables and credential files, the recommended place for credentials). The mapping is
made this process's default with :func:`use` by every Prefect task (tasks may run on Dask workers in
other processes) and by the flow entry points; ``RunDir``, image reads, listings and manifests ask
:func:`options_for`. Secret values are replaced by ``"***"`` (:func:`redact`) before a config is
written into ``run.json``.

Writes without rename (``write_whole``): object stores have no atomic rename, but one PUT of a whole
object is atomic for readers (S3 and its clones: a reader sees the old object or the new one, never
part of one; a multipart upload becomes visible only when completed). So on a remote filesystem a
file is written as one object, never appended or streamed in parts that readers could see; on local
disk it goes to a temporary name and is moved into place (``rename`` is atomic there).
"""

from __future__ import annotations

import os
import uuid

import fsspec
from fsspec.implementations.local import LocalFileSystem

SECRET_WORDS = ("key", "secret", "token", "password", "credential", "sas", "signature")
_PREFIXES: dict[str, dict] = {}


def use(mapping: dict[str, dict] | None) -> None:
    """Make ``mapping`` (URL prefix -> fsspec options) this process's storage options (one
    assignment: threads that read the old mapping meanwhile are not disturbed)."""
    global _PREFIXES
    _PREFIXES = dict(mapping or {})


def options_for(url: str, mapping: dict[str, dict] | None = None) -> dict:
    """The options of the longest prefix of ``url`` in ``mapping`` (default: the process's, see
    :func:`use`); ``{}`` for local paths and unmatched URLs. Prefixes end at a ``/``: ``s3://a``
    covers ``s3://a/x`` but not ``s3://ab/x``. Returns a copy."""
    url = str(url)
    if "://" not in url or url.startswith("file://"):
        return {}
    prefixes = _PREFIXES if mapping is None else mapping
    matches = [p for p in prefixes if url.rstrip("/") == p.rstrip("/") or url.startswith(p.rstrip("/") + "/")]
    return dict(prefixes[max(matches, key=len)]) if matches else {}


def is_local_path(url: str) -> bool:
    """A plain local path (no ``scheme://``): read with the builtins, which cost a fraction of
    fsspec's URL handling per file."""
    return "://" not in str(url)


def url_to_fs(url: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """``(filesystem, path)`` for a local path or URL with its options (``options_for`` by default)."""
    options = options_for(url) if storage_options is None else storage_options
    return fsspec.core.url_to_fs(str(url), **options)


def open_url(url: str, mode: str = "rb"):
    """``fsspec.open`` with the URL's options."""
    return fsspec.open(str(url), mode, **options_for(url))


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def write_whole(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Publish ``data`` at ``path`` so that readers see the old content or the new, never a part:
    temporary file + rename on local disk, one whole-object PUT elsewhere (see the module doc)."""
    if is_local(fs):
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        temporary = f"{path}.tmp-{uuid.uuid4().hex}"
        fs.pipe_file(temporary, data)
        fs.mv(temporary, path)
    else:
        fs.pipe_file(path, data)


def create_whole(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> bool:
    """Publish ``data`` at ``path`` only if nothing is there; True when this call created it. Local
    disk: a hard link of a complete temporary file (atomic, fails if the name exists); object
    stores: a conditional PUT (``If-None-Match: *``), or, where the filesystem has no exclusive
    create, a write that is read back and compared."""
    if is_local(fs):
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        temporary = f"{path}.tmp-{uuid.uuid4().hex}"
        fs.pipe_file(temporary, data)
        try:
            os.link(temporary, path)
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(temporary)
    try:
        fs.pipe_file(path, data, mode="create")
        return True
    except FileExistsError:
        return False
    except (TypeError, NotImplementedError):  # no exclusive create here: write, then read back
        if fs.exists(path):
            return False
        fs.pipe_file(path, data)
        try:
            return fs.cat_file(path) == data
        except FileNotFoundError:
            return False


def redact(value):
    """A copy of a JSON-like value with the values of secret-looking keys (``key``, ``secret``,
    ``token``, ``password``, ...) replaced by ``"***"``."""
    if isinstance(value, dict):
        return {k: "***" if _is_secret(k) and v is not None else redact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value


def _is_secret(name) -> bool:
    name = str(name).lower()
    return any(word in name for word in SECRET_WORDS)
