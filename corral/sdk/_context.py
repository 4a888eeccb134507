"""What a template build uploads: the build context as a tar, ``.dockerignore`` honoured.

Kept apart from the clients because it is pure local work (walking and reading files) shared
by the blocking and the asyncio client alike. The Dockerfile travels inside the tar: where it
is, when it is an ordinary file of the context, else as ``.corral/Dockerfile`` (a Dockerfile
outside the context, one the ignore file excludes, or text given directly).
"""

from __future__ import annotations

import os
import posixpath
import re
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from corral.errors import CorralError, InvalidRequestError
from corral.sdk._tar import Member, tar_stream, walk_tree

__all__ = [
    "INLINE_DOCKERFILE",
    "BuildContext",
    "DockerIgnore",
    "build_context",
    "check_file",
    "file_chunks",
]

INLINE_DOCKERFILE = ".corral/Dockerfile"
_INLINE_DIR = PurePosixPath(".corral")
_INLINE_FILE = PurePosixPath(INLINE_DOCKERFILE)
_SEND_AT_LEAST = 64 << 10


@dataclass(frozen=True)
class _Pattern:
    regex: re.Pattern[str]
    depth: int  # path components, to compare against a path's leading directories
    negated: bool
    text: str


def _translate(pattern: str) -> str:
    """A ``.dockerignore`` pattern as a regex, as Docker's pattern matcher does it: ``*`` and
    ``?`` stay within one path component, ``**`` crosses any number of them."""
    out = ["^"]
    i, n = 0, len(pattern)
    while i < n:
        ch = pattern[i]
        i += 1
        if ch == "*":
            if i < n and pattern[i] == "*":
                i += 1
                if i < n and pattern[i] == "/":
                    i += 1
                out.append(".*" if i >= n else "(.*/)?")
            else:
                out.append("[^/]*")
        elif ch == "?":
            out.append("[^/]")
        elif ch == "[":
            end = pattern.find("]", i)
            if end < 0:
                out.append(re.escape(ch))
                continue
            body = pattern[i:end]
            i = end + 1
            if body.startswith("!"):
                body = "^" + body[1:]
            out.append("[" + body.replace("\\", "\\\\") + "]")
        elif ch == "\\" and i < n:
            out.append(re.escape(pattern[i]))
            i += 1
        else:
            out.append(re.escape(ch))
    out.append("$")
    return "".join(out)


class DockerIgnore:
    """The patterns of a ``.dockerignore``: one a line, ``#`` comments, ``!`` re-includes.

    A path is excluded when the last pattern matching it, or matching one of its leading
    directories, is not a ``!`` pattern (so ``build`` also excludes ``build/x/y``).
    """

    def __init__(self, lines: Iterable[str] = ()) -> None:
        self._patterns: list[_Pattern] = []
        for raw in lines:
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            negated = line.startswith("!")
            if negated:
                line = line[1:].strip()
            # Like Docker: cleaned, and relative to the context root whatever the slashes.
            text = posixpath.normpath(line).lstrip("/")
            if text in ("", "."):
                continue
            try:
                regex = re.compile(_translate(text), re.DOTALL)
            except re.error as exc:
                raise InvalidRequestError(
                    f".dockerignore: bad pattern {raw.strip()!r}: {exc}"
                ) from exc
            self._patterns.append(_Pattern(regex, text.count("/") + 1, negated, text))

    @classmethod
    def load(cls, context: Path) -> DockerIgnore:
        path = context / ".dockerignore"
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return cls()
        except OSError as exc:
            raise CorralError(f"cannot read {path}: {exc.strerror or exc}") from exc
        return cls(text.splitlines())

    def __bool__(self) -> bool:
        return bool(self._patterns)

    def excluded(self, rel: str) -> bool:
        """Whether the context-relative posix path ``rel`` stays out of the build context."""
        parents = rel.split("/")[:-1]
        matched = False
        for pat in self._patterns:
            if pat.negated != matched:
                continue  # cannot change the outcome
            hit = pat.regex.match(rel) is not None
            if not hit and parents and pat.depth <= len(parents):
                hit = pat.regex.match("/".join(parents[: pat.depth])) is not None
            if hit:
                matched = not pat.negated
        return matched

    def may_include_below(self, rel: str) -> bool:
        """Whether a ``!`` pattern could bring back something inside the excluded directory
        ``rel``, so that the walk has to enter it (otherwise it is skipped whole)."""
        prefix = rel + "/"
        for pat in self._patterns:
            if not pat.negated:
                continue
            if any(c in pat.text for c in "*?[\\") or (pat.text + "/").startswith(prefix):
                return True
        return False


@dataclass(frozen=True)
class BuildContext:
    """A checked build context: what to send as the ``dockerfile`` parameter, and the tar."""

    root: Path
    dockerfile: str
    ignore: DockerIgnore
    # The Dockerfile's bytes when it travels as ``.corral/Dockerfile``.
    inline: bytes | None

    def chunks(self, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        """The context as a tar, streamed: files are read as the request body is sent."""
        state = _Walk()
        tar = tar_stream(self.root, self._members(state), self._extra(state), chunk_size=chunk_size)
        # A context of many small files is mostly 512-byte headers: sent one by one they would
        # cost a chunk frame each (and a thread hop each in the asyncio client).
        buf = bytearray()
        for piece in tar:
            buf += piece
            if len(buf) >= _SEND_AT_LEAST:
                yield bytes(buf)
                buf.clear()
        if buf:
            yield bytes(buf)

    def _members(self, state: _Walk) -> Iterator[Member]:
        ignore = self.ignore
        # Directories left out so far, sent after all if something inside them is not.
        pending: dict[PurePosixPath, os.stat_result] = {}

        def descend(rel: PurePosixPath) -> bool:
            return rel not in pending or ignore.may_include_below(str(rel))

        for rel, st in walk_tree(self.root, descend=descend):
            if self.inline is not None and rel == _INLINE_FILE:
                continue  # replaced by the Dockerfile this build uses
            if ignore.excluded(str(rel)):
                if stat.S_ISDIR(st.st_mode):
                    pending[rel] = st
                continue
            for parent in reversed(rel.parents[:-1]):
                if parent in pending:
                    yield state.saw(parent, pending.pop(parent))
            yield state.saw(rel, st)

    def _extra(self, state: _Walk) -> Iterator[tuple[str, bytes | None]]:
        if self.inline is None:
            return
        if state.inline_taken:
            raise InvalidRequestError(
                f"the build context has a file named .corral, where the Dockerfile has to go "
                f"({INLINE_DOCKERFILE}); rename it or list it in .dockerignore"
            )
        if not state.inline_dir_sent:
            yield str(_INLINE_DIR), None
        yield INLINE_DOCKERFILE, self.inline


class _Walk:
    """What the walk sent of ``.corral``, which the inline Dockerfile goes into afterwards."""

    def __init__(self) -> None:
        self.inline_dir_sent = False
        self.inline_taken = False

    def saw(self, rel: PurePosixPath, st: os.stat_result) -> Member:
        if rel == _INLINE_DIR:
            self.inline_dir_sent = stat.S_ISDIR(st.st_mode)
            self.inline_taken = not self.inline_dir_sent
        return rel, st


def build_context(
    context: str | os.PathLike[str],
    dockerfile: str | os.PathLike[str] = "Dockerfile",
    dockerfile_text: str | bytes | None = None,
) -> BuildContext:
    """Check a build context and find its Dockerfile, before anything is sent.

    A relative ``dockerfile`` is relative to ``context``; ``dockerfile_text`` replaces the file.
    """
    root = Path(context)
    if not root.is_dir():
        raise InvalidRequestError(f"the build context {root} is not a directory")
    ignore = DockerIgnore.load(root)
    if dockerfile_text is not None:
        text = dockerfile_text
        return BuildContext(
            root,
            INLINE_DOCKERFILE,
            ignore,
            text.encode("utf-8") if isinstance(text, str) else bytes(text),
        )
    path = root / dockerfile  # an absolute dockerfile stays as it is
    rel = _inside(root, path)
    if rel is not None and not ignore.excluded(rel):
        return BuildContext(root, rel, ignore, None)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise InvalidRequestError(f"there is no Dockerfile at {path}") from None
    except IsADirectoryError:
        raise InvalidRequestError(f"the Dockerfile {path} is a directory") from None
    except OSError as exc:
        raise InvalidRequestError(
            f"cannot read the Dockerfile {path}: {exc.strerror or exc}"
        ) from exc
    return BuildContext(root, INLINE_DOCKERFILE, ignore, data)


def _inside(root: Path, path: Path) -> str | None:
    """``path`` relative to ``root`` when it is a regular file the walk will send as such (no
    symlink on the way), else None (then it travels as ``.corral/Dockerfile``)."""
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(root))
    parts = PurePosixPath(rel.replace(os.sep, "/")).parts
    if not parts or parts[0] == ".." or os.path.isabs(rel):
        return None
    cur = root
    for part in parts:
        cur = cur / part
        try:
            st = os.lstat(cur)
        except OSError:
            return None
        if stat.S_ISLNK(st.st_mode):
            return None
    if not stat.S_ISREG(st.st_mode):
        return None
    return "/".join(parts)


def file_chunks(path: str | os.PathLike[str], chunk_size: int = 1 << 20) -> Iterator[bytes]:
    """A local file's bytes, streamed; the file is open only while they are read."""
    try:
        with open(path, "rb") as f:
            while chunk := f.read(chunk_size):
                yield chunk
    except OSError as exc:
        raise CorralError(f"cannot read {path}: {exc.strerror or exc}") from exc


def check_file(path: str | os.PathLike[str], what: str) -> Path:
    """``path`` if it is a readable regular file, else ``InvalidRequestError`` saying so."""
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise InvalidRequestError(f"there is no {what} at {p}") from None
    except OSError as exc:
        raise InvalidRequestError(f"cannot read the {what} {p}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(st.st_mode):
        raise InvalidRequestError(f"the {what} {p} is not a file")
    return p
