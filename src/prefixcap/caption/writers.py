"""Output shards of `prefixcap caption --output_dir`: interchangeable jsonl / parquet / webdataset writers.

Every writer has the same two methods (clip-retrieval's writer pattern): `write(results)` appends a
batch of results in input order, `close(complete)` either renames the temporary file into place
(complete) or deletes it. A writer only ever writes `.{name}.{pid}.tmp`, so a process killed
mid-shard leaves a temporary file that no reader mistakes for a shard.

Rows and samples (one per input item; a broken item keeps its key and says why):
  jsonl       {"key", "caption" | "captions", "score" | "scores"} or {"key", "error"}
  parquet     key, caption, score, error, shard (the input shard's name) [+ captions, scores lists
              when several captions are returned]
  webdataset  {key}.{caption member} (the best caption) and {key}.{json member} (all captions,
              scores, the model and the decoding settings, or the error); with copy_members the
              input sample's own members first, in their order. Items that are not samples (a
              repeated tar member, a truncated tar) are reported in the shard's stats only.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from prefixcap.caption.pipeline import Result
from prefixcap.data.decode import NOT_SAMPLE_REASONS

logger = logging.getLogger(__name__)

EXTENSIONS = {"jsonl": ".jsonl", "parquet": ".parquet", "webdataset": ".tar"}
OUTPUT_FORMATS = tuple(EXTENSIONS)
_REASON = re.compile(r"^([a-z][a-z0-9_]*):")


def reason_of(error: str | None) -> str | None:
    """The reason name an error message starts with ("truncated: ..." -> "truncated"); model failures have none."""
    if error is None:
        return None
    match = _REASON.match(error)
    return match.group(1) if match else "caption_error"


def result_row(result: Result, num_return_sequences: int) -> dict[str, Any]:
    """One JSON line: key, then caption(s) and score(s), or the error."""
    row: dict[str, Any] = {"key": result.key}
    if result.error is not None:
        row["error"] = result.error
        return row
    many = num_return_sequences > 1
    row["captions" if many else "caption"] = result.captions if many else result.captions[0]
    if result.scores is not None:
        scores = [round(s, 5) for s in result.scores]
        row["scores" if many else "score"] = scores if many else scores[0]
    return row


@dataclass
class WriterOptions:
    """What every output shard records besides the captions."""

    output_format: str = "jsonl"
    num_return_sequences: int = 1
    caption_member: str = "prefixcap.txt"  # webdataset: the member holding the caption
    copy_members: bool = False  # webdataset: copy each input sample's members into the output
    model: str = ""
    generation: dict[str, Any] = field(default_factory=dict)  # decoding settings, in each sample's json

    @property
    def json_member(self) -> str:
        """prefixcap.txt -> prefixcap.json: the member with scores and settings."""
        stem = self.caption_member.rsplit(".", 1)[0] if "." in self.caption_member else self.caption_member
        return f"{stem}.json"


def caption_member_problem(name: str) -> str | None:
    """Why a --caption_member value cannot be a tar member suffix, or None."""
    if not name or "/" in name or name.startswith(".") or name.endswith("."):
        return f"--caption_member {name!r} must be a member suffix such as prefixcap.txt (no '/', no leading dot)"
    if WriterOptions(caption_member=name).json_member == name:
        return f"--caption_member {name!r} would collide with its json member; use e.g. prefixcap.txt"
    return None


class ShardWriter(Protocol):
    """One output shard being written."""

    def write(self, results: Sequence[Result]) -> None:
        """Append one batch of results, in input order."""

    def close(self, complete: bool) -> None:
        """complete: rename the temporary file into place; else delete it."""


class _TempFile:
    """A binary file written under a temporary name in the shard's folder and renamed on completion."""

    def __init__(self, path: Path):
        self.path = path
        self.tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
        self.file = open(self.tmp, "wb")  # noqa: SIM115 - closed in close()

    def _commit(self, complete: bool) -> None:
        try:
            if complete:
                self.file.flush()
                os.fsync(self.file.fileno())
        finally:
            self.file.close()
        if complete:
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)


class JsonlShardWriter(_TempFile):
    def __init__(self, path: Path, options: WriterOptions, source: str):
        super().__init__(path)
        self.n = options.num_return_sequences

    def write(self, results: Sequence[Result]) -> None:
        self.file.write("".join(json.dumps(result_row(r, self.n), ensure_ascii=False) + "\n"
                                for r in results).encode("utf-8"))

    def close(self, complete: bool) -> None:
        self._commit(complete)


class ParquetShardWriter(_TempFile):
    """Rows are kept until close (a shard is one input shard: thousands of short rows)."""

    def __init__(self, path: Path, options: WriterOptions, source: str):
        super().__init__(path)
        self.many = options.num_return_sequences > 1
        self.source = source
        self.rows: dict[str, list[Any]] = {name: [] for name in self._columns()}

    def _columns(self) -> list[str]:
        return ["key", "caption", "score", "error", "shard"] + (["captions", "scores"] if self.many else [])

    def write(self, results: Sequence[Result]) -> None:
        for r in results:
            ok = r.error is None
            self.rows["key"].append(r.key)
            self.rows["caption"].append(r.caption if ok else None)
            self.rows["score"].append(r.scores[0] if ok and r.scores else None)
            self.rows["error"].append(r.error)
            self.rows["shard"].append(self.source)
            if self.many:
                self.rows["captions"].append(list(r.captions) if ok else None)
                self.rows["scores"].append(list(r.scores) if ok and r.scores else None)

    def close(self, complete: bool) -> None:
        if complete:
            import pyarrow as pa
            import pyarrow.parquet as pq

            types = {"key": pa.string(), "caption": pa.string(), "score": pa.float64(), "error": pa.string(),
                     "shard": pa.string(), "captions": pa.list_(pa.string()), "scores": pa.list_(pa.float64())}
            table = pa.table({k: pa.array(v, types[k]) for k, v in self.rows.items()})
            pq.write_table(table, self.file)
        self._commit(complete)


def sample_groups(url: str) -> Iterator[tuple[str, list[tuple[str, bytes]]]]:
    """An input tar's samples as (key, [(member name, bytes)]), grouped exactly as webdataset groups them;
    a repeated member keeps its first copy (as the reader does), a truncated tar ends the samples."""
    from webdataset.gopen import gopen
    from webdataset.tariterators import base_plus_ext, tar_file_iterator

    stream = gopen(url, "rb")
    key: str | None = None
    members: list[tuple[str, bytes]] = []
    seen: set[str] = set()
    try:
        for member in tar_file_iterator(stream):
            prefix, suffix = base_plus_ext(member["fname"])
            if prefix is None:
                continue
            if prefix != key:
                if key is not None:
                    yield key, members
                key, members, seen = prefix, [], set()
            if suffix.lower() not in seen:
                seen.add(suffix.lower())
                members.append((member["fname"], member["data"]))
    except (tarfile.TarError, OSError, EOFError, ValueError) as err:
        logger.debug("%s ends early (%s); its readable samples are copied", url, err)  # the reader reports it
    finally:
        stream.close()
    if key is not None:
        yield key, members


def tar_key(key: str) -> str:
    """A key webdataset reads back as the same sample: no leading '/', no '.' in its last path part."""
    head, _, tail = key.lstrip("/").rpartition("/")
    tail = tail.replace(".", "_") or "_"
    return f"{head}/{tail}" if head else tail


class WebDatasetShardWriter(_TempFile):
    """A tar with each sample's caption and json members (after its own members, with copy_members)."""

    def __init__(self, path: Path, options: WriterOptions, source: str):
        super().__init__(path)
        self.options = options
        self.tar = tarfile.open(fileobj=self.file, mode="w", format=tarfile.PAX_FORMAT)
        self.groups = sample_groups(source) if options.copy_members else None
        self.own = (options.caption_member, options.json_member)

    def _add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = len(data), 0o644, 0  # fixed: a redone shard is byte-identical
        self.tar.addfile(info, io.BytesIO(data))

    def _originals(self, key: str) -> list[tuple[str, bytes]]:
        """The input members of `key`; samples before it that the reader did not yield are copied as not_read."""
        for group_key, members in self.groups or ():
            if group_key == key:
                return members
            logger.warning("sample %r of the input was not read; copied without a caption", group_key)
            self._copy(group_key, members, {"key": group_key, "error": "not_read: the reader skipped this sample"})
        return []

    def _copy(self, key: str, members: list[tuple[str, bytes]], meta: dict[str, Any]) -> None:
        for name, data in members:
            if not name.endswith(tuple(f".{m}" for m in self.own)):  # a rerun on our own output replaces them
                self._add(name, data)
        if "error" not in meta:
            self._add(f"{key}.{self.options.caption_member}", meta["caption"].encode("utf-8"))
        self._add(f"{key}.{self.options.json_member}", json.dumps(meta, ensure_ascii=False).encode("utf-8"))

    def write(self, results: Sequence[Result]) -> None:
        n = self.options.num_return_sequences
        for r in results:
            if reason_of(r.error) in NOT_SAMPLE_REASONS:
                continue  # not a sample: listed in the shard's stats
            members = self._originals(r.key) if self.groups is not None else []
            meta = {**result_row(r, n), "model": self.options.model, "generation": self.options.generation}
            if r.error is None and n > 1:
                meta["caption"] = r.caption  # the best one, as in the caption member
            self._copy(tar_key(r.key), members, meta)

    def close(self, complete: bool) -> None:
        try:
            if complete and self.groups is not None:
                for key, members in self.groups:  # trailing samples the reader did not yield
                    self._copy(key, members, {"key": key, "error": "not_read: the reader skipped this sample"})
            self.tar.close()
        finally:
            self._commit(complete)


WRITERS: dict[str, type] = {"jsonl": JsonlShardWriter, "parquet": ParquetShardWriter,
                            "webdataset": WebDatasetShardWriter}


def make_writer(folder: str | Path, name: str, options: WriterOptions, source: str) -> ShardWriter:
    """The writer of output shard `name` (extension added) in folder; `source` is the input shard it mirrors."""
    return WRITERS[options.output_format](Path(folder) / f"{name}{EXTENSIONS[options.output_format]}",
                                          options, source)
