"""The checkpoints of an S3 run, kept beside its adapter so that a new pod resumes from them.

An S3 run trains into the pod's emptyDir (config.py's staging), which a restart loses. Every
checkpoint is therefore uploaded as soon as checkpoints.CompleteCheckpoints has marked it whole,
its COMPLETE marker last: in S3 too a checkpoint counts only once the marker is there, so one whose
upload was cut short is never resumed. The newest save_total_limit whole ones are kept, as
checkpoints.rotate keeps them locally. At start the newest whole one is fetched back into the
staging directory, where checkpoints.find_resume_checkpoint picks it as on a PVC.

    <prefix>/checkpoints/spec-hash            the spec whose run wrote them (checkpoints.claim's file)
    <prefix>/checkpoints/checkpoint-<step>/   every file of that checkpoint, COMPLETE last
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llamaops.api.contract import CHECKPOINTS_DIR, COMPLETE_MARKER
from transformers import TrainerCallback

from llamaops_trainer import distributed, s3
from llamaops_trainer.checkpoints import SPEC_HASH_FILE, find_resume_checkpoint, is_complete
from llamaops_trainer.distributed import WorldInfo
from llamaops_trainer.errors import Retryable

log = logging.getLogger(__name__)

FIELD = "spec.output.s3.uri"
_KEY = re.compile(r"^checkpoint-(\d+)/(.+)$")


@dataclass(frozen=True)
class Remote:
    """Where an S3 run's checkpoints go: s3://<bucket>/<prefix>."""

    client: Any
    bucket: str
    prefix: str  # "<output prefix>/checkpoints/"
    uri: str  # spec.output.s3.uri, for messages

    @classmethod
    def of(cls, location: Any) -> Remote:
        bucket, prefix = s3.directory(location.uri)
        return cls(s3.client(location.endpoint, location.region), bucket, f"{prefix}{CHECKPOINTS_DIR}/",
                   location.uri)

    def checkpoint(self, step: int) -> str:
        return f"{self.prefix}checkpoint-{step}/"


def _step(path: str | Path) -> int:
    return int(Path(path).name.rpartition("-")[2])


def _listing(remote: Remote) -> dict[int, list[str]]:
    """Step -> the keys of that checkpoint, whole or not."""
    steps: dict[int, list[str]] = {}
    for key in s3.list_keys(remote.client, remote.bucket, remote.prefix):
        if m := _KEY.match(key[len(remote.prefix):]):
            steps.setdefault(int(m.group(1)), []).append(key)
    return steps


def _whole(remote: Remote, listing: dict[int, list[str]]) -> list[int]:
    """The steps whose checkpoint was uploaded to the end, oldest first."""
    return sorted(step for step, keys in listing.items() if remote.checkpoint(step) + COMPLETE_MARKER in keys)


def _delete(remote: Remote, keys: list[str]) -> None:
    """Completion files first, so that a checkpoint half deleted never looks whole."""
    markers = [k for k in keys if k.endswith("/" + COMPLETE_MARKER)]
    s3.delete_keys(remote.client, remote.bucket, markers)
    s3.delete_keys(remote.client, remote.bucket, sorted(set(keys) - set(markers)))


def claim(remote: Remote, spec_hash: str) -> bool:
    """checkpoints.claim for S3 (rank 0, before any checkpoint is looked for): another spec's are deleted.

    Returns whether any were.
    """
    key = remote.prefix + SPEC_HASH_FILE
    owner = (s3.read_text(remote.client, remote.bucket, key) or "").strip() or None
    if owner == spec_hash:
        return False
    listing = _listing(remote)
    if listing:
        log.warning("checkpoints under s3://%s/%s belong to another spec (%s): starting over",
                    remote.bucket, remote.prefix, (owner or "unknown")[:12])
        _delete(remote, [k for keys in listing.values() for k in keys])
    remote.client.put_object(Bucket=remote.bucket, Key=key, Body=(spec_hash + "\n").encode())
    return bool(listing)


def newest(remote: Remote) -> int | None:
    """The step of the newest whole checkpoint in S3."""
    whole = _whole(remote, _listing(remote))
    return whole[-1] if whole else None


def upload(remote: Remote, path: Path) -> list[str]:
    """Every file of the whole checkpoint at path, its COMPLETE marker last. Returns the keys written, in order."""
    prefix = remote.checkpoint(_step(path))
    # Saved again at a step already uploaded: it stops looking whole before its files change.
    s3.delete_keys(remote.client, remote.bucket, [prefix + COMPLETE_MARKER])
    return s3.upload_dir(remote.client, path, remote.bucket, prefix, last=COMPLETE_MARKER)


def upload_part(remote: Remote, path: Path) -> list[str]:
    """What a node other than rank 0's wrote into the checkpoint at path (its ranks' RNG states), no marker."""
    return s3.upload_dir(remote.client, path, remote.bucket, remote.checkpoint(_step(path)),
                         exclude=frozenset({COMPLETE_MARKER}))


def prune(remote: Remote, keep: int) -> list[int]:
    """Deletes all but the newest `keep` whole checkpoints (at least one), and any cut short before them.

    Returns the steps deleted.
    """
    listing = _listing(remote)
    kept = _whole(remote, listing)[-max(1, keep):]
    if not kept:
        return []
    stale = sorted(step for step in listing if step not in kept and step < kept[-1])
    _delete(remote, [k for step in stale for k in listing[step]])
    return stale


def download(remote: Remote, step: int, checkpoints_dir: Path) -> Path | None:
    """checkpoint-<step>, every file of it, into checkpoints_dir; None if S3 holds no whole one of that step.

    Written beside and renamed into place, so a download cut short leaves nothing that looks like a checkpoint.
    """
    prefix = remote.checkpoint(step)
    keys = [k for k in s3.list_keys(remote.client, remote.bucket, prefix) if not k.endswith("/")]
    if prefix + COMPLETE_MARKER not in keys:
        return None
    checkpoints_dir.mkdir(parents=True, exist_ok=True)
    final = checkpoints_dir / f"checkpoint-{step}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=checkpoints_dir))
    try:
        for key in keys:
            dest = tmp / key[len(prefix):]
            dest.parent.mkdir(parents=True, exist_ok=True)
            s3.download_file(remote.client, remote.bucket, key, dest)
        if final.exists():  # an incomplete local copy
            shutil.rmtree(final)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _local_step(checkpoints_dir: Path) -> int | None:
    found = find_resume_checkpoint(checkpoints_dir)
    return _step(found) if found else None


def restore(remote: Remote, checkpoints_dir: Path, spec_hash: str, world: WorldInfo) -> int | None:
    """Fetches the newest whole checkpoint in S3 into checkpoints_dir, unless one as new is there already.

    Rank 0 claims the prefix and picks the step to resume from. Trainer reads the checkpoint
    (weights, optimizer, state) on every rank, so every node's local rank 0 fetches it into its
    own staging directory; the caller's barrier then holds the node's other ranks until it is there.
    Returns the step fetched on this node.
    """
    target = None
    if world.is_main:
        with s3.errors(FIELD, remote.uri):
            claim(remote, spec_hash)
            in_s3 = newest(remote)
        target = max((s for s in (in_s3, _local_step(checkpoints_dir)) if s is not None), default=None)
    target = distributed.broadcast_object(target, world)
    if target is None or not world.is_local_main or (_local_step(checkpoints_dir) or -1) >= target:
        return None
    with s3.errors(FIELD, remote.uri):
        fetched = download(remote, target, checkpoints_dir)
    if fetched is None:  # only rank 0's staging has it (a checkpoint whose upload failed)
        log.warning("checkpoint-%d is not in s3://%s/%s: this node cannot resume from it",
                    target, remote.bucket, remote.prefix)
        return None
    log.info("fetched %s from s3://%s/%s", fetched.name, remote.bucket, remote.prefix)
    return target


class UploadCheckpoints(TrainerCallback):
    """Uploads each checkpoint as soon as it is saved, then deletes the oldest beyond `keep`.

    Rank 0 writes and uploads all of a checkpoint but the RNG states of the ranks on other nodes:
    each of those nodes' local rank 0 uploads its own first, so the marker comes after every file.
    Synchronous: the other ranks wait at their next collective while rank 0 uploads, about the
    checkpoint's size over the upload bandwidth (LoRA weights with their optimizer state, some 12
    bytes a trainable parameter: 0.5 GB for an 8B model with all-linear r=16). In return every
    checkpoint the run has gone past is durable, the one saved on SIGTERM included.
    After checkpoints.CompleteCheckpoints in the callbacks: it uploads only checkpoints marked whole.
    """

    def __init__(self, remote: Remote, world: WorldInfo, keep: int) -> None:
        self.remote, self.world, self.keep = remote, world, keep

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        distributed.barrier()  # every rank has written its part of the checkpoint
        if self.world.is_local_main and not self.world.is_main and path.is_dir():
            with _warn_only(self.remote, path):
                upload_part(self.remote, path)
        distributed.barrier()  # the other nodes' parts are up before rank 0 writes the marker
        if not self.world.is_main:
            return
        if not is_complete(path):
            log.warning("%s has no %s marker after saving: not uploaded", path, COMPLETE_MARKER)
            return
        with _warn_only(self.remote, path):
            upload(self.remote, path)
            dropped = prune(self.remote, self.keep)
            log.info("uploaded %s to s3://%s/%s%s", path.name, self.remote.bucket, self.remote.prefix,
                     f", deleted checkpoint(s) {dropped}" if dropped else "")


@contextmanager
def _warn_only(remote: Remote, path: Path) -> Iterator[None]:
    """A failed upload is logged and training goes on: the next checkpoint tries again, and a restart before
    it resumes from an older one. A bad bucket or prefix (BadConfig) still ends the run."""
    try:
        with s3.errors(FIELD, remote.uri):
            yield
    except Retryable as exc:
        log.warning("%s not uploaded: %s", path.name, exc)
