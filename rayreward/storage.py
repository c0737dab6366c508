"""Where a run's checkpoints live (`train.storage`), and the check that every node reaches it.

Ray Train copies each checkpoint from the worker that reports it to the run's storage, and a
restarted worker reads it back from there, possibly on another node. So the storage must be one
that every node reaches:

- a local path (default `OUTPUT_DIR/ray`): fine on one machine, or on a cluster whose nodes all
  mount one shared filesystem (NFS, ...) at that path;
- an object-store URI (`s3://bucket/prefix`, `gs://...`, `abfs://...`) through the pyarrow
  filesystems Ray Train accepts; `train.storage_endpoint` points `s3://` at an S3-compatible
  store (MinIO, Ceph, a local test server).

On a cluster of several nodes the driver checks, before the workers start, that each node sees a
probe file it wrote under a local-path storage, and refuses the run (naming `train.storage`) when
one does not; a local path on two machines would otherwise fail at the first checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse

from rayreward.errors import ConfigError

URI_SCHEMES = ("s3", "gs", "gcs", "abfs", "abfss", "hdfs")


def is_uri(location: str) -> bool:
    return urlparse(location).scheme in URI_SCHEMES


def check(storage: str, endpoint: str) -> list[str]:
    """Problems of `train.storage` / `train.storage_endpoint` as written (no I/O)."""
    problems = []
    scheme = urlparse(storage).scheme
    if storage and scheme and scheme not in URI_SCHEMES and len(scheme) > 1:  # "C:" is a drive, not a scheme
        problems.append(f"train.storage: {storage!r} has the scheme {scheme!r}, which Ray Train cannot store to; "
                        f"use a path every node mounts, or a URI of {', '.join(s + '://' for s in URI_SCHEMES)}")
    if endpoint:
        if scheme != "s3":
            problems.append(f"train.storage_endpoint: {endpoint!r} is set, but train.storage {storage!r} is not an "
                            "s3:// URI; the endpoint is for S3-compatible stores")
        if urlparse(endpoint).scheme not in ("http", "https") or not urlparse(endpoint).netloc:
            problems.append(f"train.storage_endpoint: {endpoint!r} is not allowed; give the store's URL, e.g. "
                            "http://127.0.0.1:9000 or https://s3.example.com")
    return problems


@dataclass
class Storage:
    """A run's checkpoint storage: `path` and `filesystem` as Ray Train's RunConfig takes them
    (`filesystem` None: a local path), and `location`, as the user wrote it (for messages)."""

    location: str
    path: str
    filesystem: object | None = None  # a pyarrow.fs.FileSystem for a URI

    @classmethod
    def of(cls, cfg) -> "Storage":
        location = cfg.train.storage or str(Path(cfg.output_dir) / "ray")
        if not is_uri(location):
            return cls(location, str(Path(location).expanduser().resolve()))
        import pyarrow.fs

        parsed = urlparse(location)
        if cfg.train.storage_endpoint:
            end = urlparse(cfg.train.storage_endpoint)
            fs = pyarrow.fs.S3FileSystem(endpoint_override=end.netloc, scheme=end.scheme,
                                         region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"))
            return cls(location, f"{parsed.netloc}{parsed.path}".rstrip("/"), fs)
        fs, path = pyarrow.fs.FileSystem.from_uri(location)
        return cls(location, path.rstrip("/"), fs)

    @property
    def local(self) -> bool:
        return self.filesystem is None

    def run_path(self, name: str) -> str:
        return f"{self.path}/{name}"

    def checkpoints(self, name: str) -> list[str]:
        """The run's checkpoints (paths in this storage), newest first (Ray names them
        checkpoint_<timestamp>)."""
        if self.local:
            root = Path(self.run_path(name))
            found = [str(p) for p in root.glob("checkpoint_*") if p.is_dir()]
        else:
            import pyarrow.fs

            selector = pyarrow.fs.FileSelector(self.run_path(name), allow_not_found=True)
            found = [i.path for i in self.filesystem.get_file_info(selector)
                     if i.type == pyarrow.fs.FileType.Directory and i.base_name.startswith("checkpoint_")]
        return sorted(found, key=lambda p: p.rstrip("/").rpartition("/")[2], reverse=True)

    @contextlib.contextmanager
    def fetched(self, path: str) -> Iterator[Path]:
        """A checkpoint as a local folder: itself for a local path, else a temporary copy."""
        if self.local:
            yield Path(path)
            return
        import pyarrow.fs

        with tempfile.TemporaryDirectory(prefix="rayreward-fetch-") as tmp:
            pyarrow.fs.copy_files(path, tmp, source_filesystem=self.filesystem,
                                  destination_filesystem=pyarrow.fs.LocalFileSystem())
            yield Path(tmp)

    def describe(self, path: str) -> str:
        """A checkpoint's place as the user would write it."""
        if self.local:
            return path
        return f"{urlparse(self.location).scheme}://{path}"

    # -----------------------------------------------------------------------------------------
    # Reachable from every node.

    def check_reachable(self, min_nodes: int = 2, timeout_s: float = 60.0) -> None:
        """On a Ray cluster of `min_nodes` or more alive nodes with CPUs or GPUs, check that each
        sees a probe file the driver writes under a local-path storage; raise ConfigError naming
        train.storage when one does not. Object stores are reached through the network: no check."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        if not self.local:
            self._check_writable()
            return
        nodes = [n for n in ray.nodes() if n.get("Alive") and (n["Resources"].get("CPU", 0) > 0
                                                                or n["Resources"].get("GPU", 0) > 0)]
        here = ray.get_runtime_context().get_node_id()
        if len(nodes) + (0 if any(n["NodeID"] == here for n in nodes) else 1) < min_nodes:
            return
        root = Path(self.path)
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".rayreward-probe-{uuid.uuid4().hex}"
        probe.write_text("rayreward")
        try:
            sees = ray.remote(num_cpus=0)(_sees)
            refs = [sees.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(
                str(probe)) for n in nodes]
            answers = ray.get(refs, timeout=timeout_s)
        finally:
            probe.unlink(missing_ok=True)
        blind = [n["NodeManagerAddress"] for n, seen in zip(nodes, answers) if not seen]
        if blind:
            raise ConfigError([
                f"train.storage: {self.location!r} is a local path that node(s) {', '.join(sorted(blind))} of this "
                f"{len(nodes)}-node cluster cannot see (a probe file the driver wrote there is missing on them), so "
                "the run would fail at its first checkpoint. Set train.storage to a folder every node mounts (a "
                "shared filesystem at the same path) or to an object store URI (s3://bucket/prefix, with "
                "train.storage_endpoint for an S3-compatible store)"])


    def _check_writable(self) -> None:
        """Write, read back and delete a probe object; a store that refuses (no such bucket, no
        credentials, nothing at the endpoint) is named here, before any worker starts."""
        probe = f"{self.path}/.rayreward-probe-{uuid.uuid4().hex}"
        try:
            with self.filesystem.open_output_stream(probe) as f:
                f.write(b"rayreward")
            with self.filesystem.open_input_stream(probe) as f:
                f.read()
            self.filesystem.delete_file(probe)
        except OSError as e:
            hint = (" (is train.storage_endpoint right, and are AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY set "
                    "for the store?)" if urlparse(self.location).scheme == "s3" else "")
            raise ConfigError([f"train.storage: cannot write to {self.location!r}: {str(e).splitlines()[0]}{hint}"]) from None


def _sees(path: str) -> bool:
    return os.path.isfile(path)
