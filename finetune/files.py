"""Reading and writing files whose content or place finetune does not control, in one place.

Reading: every YAML or JSON document finetune reads from disk or a command line (recipes, metric specs, a model
folder's finetune.json, recipe.yaml and checksums, adapter configs, progress files) goes through a bounded loader:
at most so many bytes, YAML aliases counted as what they expand to, nesting at most so deep, data only (never
objects). A document over a bound is refused with the reason, before it costs minutes or gigabytes.

Writing: a file finetune writes never follows a link planted where the file goes (`O_NOFOLLOW`), is written beside
its target and renamed into place (a reader never sees half a file, a crash leaves the old one), and never replaces
a file finetune did not make unless the caller was told to (`--overwrite`).
"""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path
from typing import Any

import yaml

MAX_DOCUMENT_BYTES = 1_000_000
"""The largest YAML or JSON document read by default (a recipe, finetune.json, an adapter config: a few KB)."""
MAX_NODES = 100_000
"""The most YAML nodes a document may expand to once its aliases are counted as copies."""
MAX_DEPTH = 64
"""The deepest a document may nest."""


class RefusedDocument(ValueError):
    """A document too large, too large once expanded, too deep, referring to itself, or not valid YAML/JSON."""


# --- reading -------------------------------------------------------------------------------------------------

def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def _check_expansion(root: yaml.Node, max_nodes: int, max_depth: int) -> None:
    """Refuse a composed document whose aliases expand to more than `max_nodes` nodes, or that nests too deep.

    An alias is the node its anchor names, shared: nine aliases of a list of nine aliases ... compose quickly but
    expand to 9**9 nodes in everything that walks the data afterwards (validation, merging, error messages).
    Sizes are counted over the shared nodes with memoisation, so counting costs as much as composing, and
    iteratively, so a deep document cannot exhaust Python's stack here.
    """
    sizes: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool, int]] = [(root, False, 1)]
    while stack:
        node, children_done, depth = stack.pop()
        key = id(node)
        if children_done:
            on_path.discard(key)
            sizes[key] = 1 + sum(sizes[id(child)] for child in _children(node))
            if sizes[key] > max_nodes:
                raise RefusedDocument(f"it expands to more than {max_nodes} YAML nodes (its aliases repeat parts of it)")
            continue
        if key in sizes:
            continue
        if depth > max_depth:
            raise RefusedDocument(f"it nests deeper than {max_depth} levels")
        on_path.add(key)
        stack.append((node, True, depth))
        for child in _children(node):
            if id(child) in on_path:
                raise RefusedDocument(f"an alias at line {child.start_mark.line + 1} refers to a node that contains it")
            if id(child) not in sizes:
                stack.append((child, False, depth + 1))


def _bounded_loader(max_nodes: int, max_depth: int) -> type:
    class BoundedLoader(yaml.SafeLoader):
        """yaml.SafeLoader (data only, never objects) that checks a document's expanded size before constructing it."""

        def compose_document(self) -> yaml.Node:
            node = super().compose_document()
            _check_expansion(node, max_nodes, max_depth)
            return node

    return BoundedLoader


def short(text: str, limit: int = 80) -> str:
    """Text cut to `limit` characters, so no message repeats a long value in full."""
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def yaml_problem(error: yaml.YAMLError) -> str:
    """What PyYAML found and where, without the quoted line of the document it appends (which could be anything)."""
    if isinstance(error, yaml.reader.ReaderError):  # a character YAML does not allow, e.g. NUL or other control codes
        return f"{error.reason} (character #x{error.character:x} at position {error.position})"
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    problem = getattr(error, "problem", None) or getattr(error, "context", None) or type(error).__name__
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    return f"{short(str(problem), 120)}{where}"


def load_yaml(text: str, max_nodes: int = MAX_NODES, max_depth: int = MAX_DEPTH,
              max_bytes: int = MAX_DOCUMENT_BYTES) -> Any:
    """yaml.safe_load, bounded; raises RefusedDocument saying why (not valid YAML included)."""
    if len(text) > max_bytes:
        raise RefusedDocument(f"it is {len(text)} characters; at most {max_bytes}")
    try:
        return yaml.load(text, Loader=_bounded_loader(max_nodes, max_depth))  # a SafeLoader: data only
    except RecursionError:  # PyYAML composes recursively: a document nested thousands deep
        raise RefusedDocument(f"it nests deeper than {max_depth} levels") from None
    except yaml.YAMLError as e:
        raise RefusedDocument(f"not valid YAML: {yaml_problem(e)}") from None


def _depth(value: Any, limit: int) -> None:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            raise RefusedDocument(f"it nests deeper than {limit} levels")
        if isinstance(item, dict):
            stack += [(v, depth + 1) for v in item.values()]
        elif isinstance(item, list):
            stack += [(v, depth + 1) for v in item]


def load_json(text: str, max_depth: int = MAX_DEPTH, max_bytes: int = MAX_DOCUMENT_BYTES) -> Any:
    """json.loads, bounded in size and nesting; raises RefusedDocument saying why (not valid JSON included)."""
    if len(text) > max_bytes:
        raise RefusedDocument(f"it is {len(text)} characters; at most {max_bytes}")
    try:
        value = json.loads(text)
    except RecursionError:
        raise RefusedDocument(f"it nests deeper than {max_depth} levels") from None
    except ValueError as e:
        raise RefusedDocument(f"not valid JSON: {short(str(e), 120)}") from None
    _depth(value, max_depth)
    return value


def read_text(path: Path | str, max_bytes: int = MAX_DOCUMENT_BYTES) -> str:
    """A small text file, refused (RefusedDocument) when it is not a regular file, larger than `max_bytes`, or not
    UTF-8; FileNotFoundError passes through."""
    path = Path(path)
    info = path.stat()
    if not stat.S_ISREG(info.st_mode):
        raise RefusedDocument("it is not a regular file")
    if info.st_size > max_bytes:
        raise RefusedDocument(f"it is {info.st_size} bytes; at most {max_bytes}")
    with open(path, "rb") as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:  # it grew between stat and read
        raise RefusedDocument(f"it is more than {max_bytes} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise RefusedDocument("it is not UTF-8 text") from None


def read_json(path: Path | str, max_bytes: int = MAX_DOCUMENT_BYTES, max_depth: int = MAX_DEPTH) -> Any:
    """A JSON file, bounded (see `load_json`, `read_text`)."""
    return load_json(read_text(path, max_bytes), max_depth, max_bytes)


def read_yaml(path: Path | str, max_bytes: int = MAX_DOCUMENT_BYTES, max_nodes: int = MAX_NODES,
              max_depth: int = MAX_DEPTH) -> Any:
    """A YAML file, bounded (see `load_yaml`, `read_text`)."""
    return load_yaml(read_text(path, max_bytes), max_nodes, max_depth, max_bytes)


def parse_scalar(text: str) -> Any:
    """A command-line value as a number, true/false, null or else the text itself: no YAML, so nothing in it can
    expand, nest or name a type."""
    value = text.strip()
    lowered = value.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("null", "none", "~"):
        return None
    try:
        return int(value)
    except ValueError:
        pass
    try:
        number = float(value)
    except ValueError:
        return value
    return number if abs(number) != float("inf") and number == number else value  # nan and infinity: never a setting


# --- writing -------------------------------------------------------------------------------------------------

class RefusedWrite(OSError):
    """A write that would follow a link or replace a file finetune did not make."""


def is_link(path: Path | str) -> bool:
    return os.path.islink(path)


def refuse_link(path: Path | str, what: str = "") -> None:
    """Raise RefusedWrite when `path` is a symbolic link (whatever it points at)."""
    if os.path.islink(path):
        raise RefusedWrite(f"{what or path} is a symbolic link ({path} -> {os.readlink(path)}); finetune does not write "
                           "through links. Remove the link, or choose another path")


def open_new(path: Path | str, mode: str = "w", **kwargs: Any):
    """Open a file that must not exist yet, never through a link (O_EXCL | O_NOFOLLOW): with the user's umask, like
    open(path, 'x'). Raises FileExistsError when anything, a link included, is there."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(path, flags, 0o666)
    try:
        return os.fdopen(fd, mode, **kwargs)
    except BaseException:
        os.close(fd)
        raise


def open_existing(path: Path | str, mode: str = "r+b", **kwargs: Any):
    """Open a regular file finetune made earlier for appending or rewriting, never through a link."""
    flags = (os.O_RDWR if "+" in mode or "r" not in mode else os.O_RDONLY) | getattr(os, "O_NOFOLLOW", 0)
    if "a" in mode:
        flags |= os.O_APPEND
    try:
        fd = os.open(path, flags)
    except OSError as e:
        if os.path.islink(path):
            raise RefusedWrite(f"{path} is a symbolic link; finetune does not write through links") from None
        raise e
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise RefusedWrite(f"{path} is not a regular file")
    return os.fdopen(fd, mode, **kwargs)


def write_atomic(path: Path | str, data: str | bytes, replace: bool = True) -> Path:
    """Write `data` to `path` through a new file beside it, synced and renamed into place: a reader sees the old
    file or the new one, never half of either, and a link at `path` is replaced, never followed. `replace` False
    refuses (FileExistsError) when something is already there."""
    path = Path(path)
    if not replace and (path.exists() or path.is_symlink()):
        raise FileExistsError(f"{path} already exists")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    with open_new(tmp, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def spreadsheet_safe(value: Any) -> Any:
    """A cell for a CSV or TSV file people open in a spreadsheet: text starting with =, +, -, @ (or a tab or carriage
    return before one) would be read as a formula, so it gets a leading apostrophe (OWASP's CSV-injection rule).
    Numbers are left alone, negative ones included."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


# --- added for issue 33: bounds shared with serving, spreadsheet cells, output folders ---------------------

MAX_INPUT_CHARS = 100_000
"""The most characters one input (all its texts together) may have before it is tokenised: `finetune serve
--max-input-chars`' default, and what `finetune predict --input` answers with `pred_error` beyond (a tokeniser
given megabytes of text takes gigabytes)."""

_PLAIN_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def spreadsheet_cell(value: Any) -> Any:
    """`spreadsheet_safe`, except that text which is a plain number ("-5", "+1.5e3", as a CSV column read as text
    holds them) is left as it is: a spreadsheet reads it as that number, not a formula."""
    if isinstance(value, str) and _PLAIN_NUMBER.fullmatch(value):
        return value
    return spreadsheet_safe(value)


def spreadsheet_frame(frame: Any) -> Any:
    """A copy of a pandas DataFrame for a CSV/TSV file people open: every text cell and column name through
    `spreadsheet_cell`."""
    from pandas.api.types import is_object_dtype, is_string_dtype

    safe = frame.rename(columns=lambda name: spreadsheet_cell(name) if isinstance(name, str) else name)
    for i, dtype in enumerate(safe.dtypes):
        if is_object_dtype(dtype) or is_string_dtype(dtype):  # text (numbers and booleans cannot be formulas)
            safe.isetitem(i, safe.iloc[:, i].map(spreadsheet_cell))
    return safe


def move_new(source: Path | str, target: Path | str) -> None:
    """Move the file `source` to `target` (same file system), refusing (FileExistsError) when anything, a link
    included, is at `target`: a hard link then unlinking the source cannot replace what appeared meanwhile, unlike
    a rename. File systems without hard links get a check followed by the rename."""
    try:
        os.link(source, target, follow_symlinks=False)
    except FileExistsError:
        raise FileExistsError(f"{target} already exists") from None
    except OSError:  # no hard links here (EPERM, EXDEV, ENOTSUP ...)
        if os.path.lexists(target):
            raise FileExistsError(f"{target} already exists") from None
        os.rename(source, target)
        return
    os.unlink(source)


OUTPUT_MARKER = ".finetune-output.json"
"""The file that says finetune made an output folder (`finetune evaluate --output-dir`, `label-issues`, `export`)
and which files in it are finetune's, by the kind of output that wrote them."""


def output_files(folder: Path | str) -> dict[str, set[str]]:
    """The files an output folder's marker lists as finetune's, by kind ({} when there is no readable marker finetune
    wrote): what publishing replaces, `finetune runs` shows and `clean` may delete there."""
    folder = Path(folder)
    try:
        marker = read_json(folder / OUTPUT_MARKER)
    except (OSError, RefusedDocument):
        return {}
    if not isinstance(marker, dict) or marker.get("created_by") != "finetune" or not isinstance(marker.get("files"), dict):
        return {}
    owned: dict[str, set[str]] = {}
    for kind, names in marker["files"].items():
        if isinstance(names, list):
            # Only plain relative paths: a marker cannot make finetune touch anything outside its folder.
            owned[str(kind)] = {n for n in names if isinstance(n, str) and n and not os.path.isabs(n)
                                and ".." not in Path(n).parts}
    return owned


def is_output_folder(folder: Path | str) -> bool:
    """Whether `folder` carries finetune's output marker."""
    return os.path.isfile(Path(folder) / OUTPUT_MARKER) and not os.path.islink(Path(folder) / OUTPUT_MARKER) \
        and bool(output_files(Path(folder)))


def check_output_folder(folder: Path | str, what: str, overwrite: bool = False) -> None:
    """Refuse (RefusedWrite, naming `what` and the folder) an output folder that is a link, not a folder, or a
    non-empty folder finetune did not make (no marker), unless `overwrite`. New and empty folders pass."""
    folder = Path(folder)
    refuse_link(folder, what)
    if not folder.exists():
        return
    if not folder.is_dir():
        raise RefusedWrite(f"{what}: {folder} is a file, not a folder; choose a folder")
    if overwrite or is_output_folder(folder):
        return
    entries = sorted(p.name for p in folder.iterdir())
    if entries:
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise RefusedWrite(f"{what}: {folder} already holds files finetune did not write ({shown}) and has no "
                           f"{OUTPUT_MARKER}, so finetune writes nothing in it; choose a new or empty folder")


def staging_folder(folder: Path | str) -> Path:
    """A new private folder beside `folder` (same file system, so its files move into place by rename)."""
    import tempfile

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-staging-"))


_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0)


def _open_folder(name: str, parent: int | None, create: bool) -> int:
    """A folder's descriptor, never through a link (relative to `parent`'s descriptor when given)."""
    if create:
        try:
            os.mkdir(name, 0o777, dir_fd=parent)
        except FileExistsError:
            pass
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=parent)
    except OSError:
        try:
            link = stat.S_ISLNK(os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode)
        except OSError:
            link = False
        if link:
            raise RefusedWrite(f"{name} is a symbolic link; finetune does not write through links") from None
        raise


def publish_files(staged: Path | str, folder: Path | str, kind: str, what: str, overwrite: bool = False) -> list[Path]:
    """Move every file under the staging folder `staged` into `folder` at the same relative path, and record them
    in `folder`'s marker as finetune's (of `kind`); `staged` is removed. Returns the files' paths in `folder`.

    Refused (RefusedWrite, before anything moves) when `folder` or a folder inside it is a link, or a file would
    replace one finetune did not write there (not in the marker) unless `overwrite`. Each file moves by rename
    through descriptors opened without following links, so nothing planted is written through; files of this
    `kind` that an earlier output listed and this one lacks are removed (they would contradict the new ones).
    """
    import shutil

    staged, folder = Path(staged), Path(folder)
    check_output_folder(folder, what, overwrite)
    names = sorted(p.relative_to(staged).as_posix() for p in staged.rglob("*")
                   if p.is_file() and not p.is_symlink() and p.name != OUTPUT_MARKER)
    owned = output_files(folder) if folder.is_dir() else {}
    mine = set().union(*owned.values()) if owned else set()
    foreign = []
    for name in names:
        target = folder / name
        for parent in list(reversed(Path(name).parents))[1:]:
            refuse_link(folder / parent, what)
        if os.path.lexists(target):
            if os.path.isdir(target) and not os.path.islink(target):
                raise RefusedWrite(f"{what}: {target} is a folder where finetune writes a file; move it away")
            if name not in mine and not overwrite:
                foreign.append(name)
    if foreign:
        raise RefusedWrite(f"{what}: {folder} holds files finetune did not write there "
                           f"({', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}); finetune does not "
                           "replace them: move them away or choose another folder")
    folder.parent.mkdir(parents=True, exist_ok=True)
    root = _open_folder(str(folder), None, create=True)
    try:
        for name in names:
            parts = Path(name).parts
            fd = root
            opened = []
            try:
                for part in parts[:-1]:
                    fd = _open_folder(part, fd, create=True)
                    opened.append(fd)
                os.replace(staged / name, parts[-1], dst_dir_fd=fd)
            finally:
                for f in opened:
                    os.close(f)
        for stale in sorted(owned.get(kind, set()) - set(names)):
            try:
                info = os.stat(stale, dir_fd=root, follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISREG(info.st_mode) or stat.S_ISLNK(info.st_mode):
                # An earlier output's file the new one lacks (e.g. model.int8.onnx): only through real folders.
                if all(not os.path.islink(folder / p) for p in Path(stale).parents if str(p) != "."):
                    os.unlink(folder / stale)
        kinds = {k: sorted(v) for k, v in owned.items()} | {kind: names}
        marker = {"created_by": "finetune", "files": kinds}
        data = json.dumps(marker, indent=2).encode()
        tmp = f".{OUTPUT_MARKER}.{os.getpid()}.tmp"
        try:
            os.unlink(tmp, dir_fd=root)
        except FileNotFoundError:
            pass
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o666, dir_fd=root)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, OUTPUT_MARKER, src_dir_fd=root, dst_dir_fd=root)
    finally:
        os.close(root)
    shutil.rmtree(staged, ignore_errors=True)
    return [folder / name for name in names]
