"""`finetune predict MODEL --input FILE --output FILE`: score a whole file, streaming, in order, resumable.

The input (csv, tsv, jsonl or parquet) is read a chunk of rows at a time (never whole); each chunk goes
through the task definition (`Task.inputs_from_rows`, then the `Predictor`, which batches by length; the next
chunk is read and tokenised in a thread while the model runs) and is written out with the input's columns and
the answers' fields (`pred_label`, `pred_score`, ...; nested values
as JSON text outside jsonl), one output row per input row, in input order. A row the model cannot read gets
empty predictions and the reason in `pred_error`.

Resuming: the output grows in `OUTPUT.partial` (text formats) or `OUTPUT.parts/` (parquet, one file per
chunk), and after every chunk `OUTPUT.progress.json` records, atomically, how many rows are done and how many
bytes of the output hold them. Running the same command again after an interruption (even SIGKILL) cuts the
output back to that point and continues from the next row, so nothing is lost or written twice. When the
job ends the output is renamed (or, for parquet, merged) into OUTPUT and the progress file removed.

A job resumes only on the same content: the progress file records a digest of the model as loaded (weights or
ONNX file, tokenizer, finetune.json's settings) and a running SHA-256 of the input rows done, which the resumed
job recomputes from the file before it writes anything. Another model (a registry alias that moved, a folder
retrained in place) or an input whose done rows changed is refused with the reason; --overwrite starts again.

Safety: the progress file is read with a bound (finetune.files); nothing is written through a link planted at
OUTPUT, its partial, parts or progress files; OUTPUT itself is never replaced unless --overwrite, even by a file
that appeared while the job ran. An input over `MAX_INPUT_CHARS` characters (the server's limit) gets empty
predictions and the reason in `pred_error` instead of being tokenised, and csv/tsv cells are made safe to open
in a spreadsheet (`spreadsheet_cell`); jsonl and parquet keep every value as it is.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import queue
import shutil
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from finetune.data.readers import decoding_problem, is_utf8, reading_encoding
from finetune.errors import DataError, InputError
from finetune.files import (MAX_INPUT_CHARS, RefusedDocument, RefusedWrite, move_new, open_existing, open_new,
                            read_json, refuse_link, spreadsheet_cell, write_atomic)
from finetune.models.predictor import Predictor
from finetune.tasks import PostprocessOptions

FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".parquet": "parquet"}
PREFIX = "pred_"
ERROR_COLUMN = f"{PREFIX}error"
PROGRESS_VERSION = 2
CSV_BLOCK_BYTES = 1 << 20
"""What the csv/tsv reader parses at a time: a row longer than this is refused with a message (memory stays bounded)."""
MAX_LINE_BYTES = 8 << 20
"""The longest jsonl line read: a longer one is answered with the reason in `pred_error`, without being held whole."""
MAX_PROGRESS_BYTES = 1 << 16


def file_format(path: Path, option: str) -> str:
    try:
        return FORMATS[Path(path).suffix.lower()]
    except KeyError:
        raise DataError(f"{option}: {path} has the ending {Path(path).suffix or '(none)'!r}; allowed: "
                        f"{', '.join(FORMATS)}") from None


@dataclass
class ScoreSettings:
    """What decides the output; a job resumes only with the same settings."""

    model: str
    runtime: str
    columns: dict[str, Any]
    quoting: str = "minimal"
    column_names: list[str] | None = None
    encoding: str = "utf-8"
    """How the input's bytes are read (csv, tsv, jsonl); the output is always UTF-8."""
    chunk_rows: int = 2048
    batch_size: int = 32


@dataclass
class ScoreReport:
    output: Path
    rows: int
    seconds: float
    rows_per_second: float
    errors: int
    resumed_from: int = 0
    columns: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------


def undecodable(path: Path, encoding: str) -> DataError:
    """The error for an input file `encoding` cannot read: file, line, byte, and the encoding that would fit."""
    return DataError(decoding_problem(path, encoding, "--encoding")
                     or f"--encoding: {path} cannot be read as {encoding} text")


def _header(path: Path, delimiter: str, quoting: str, encoding: str = "utf-8") -> list[str]:
    with open(path, newline="", encoding=reading_encoding(encoding)) as f:
        reader = csv.reader(f, delimiter=delimiter, quoting=csv.QUOTE_NONE if quoting == "none" else csv.QUOTE_MINIMAL)
        try:
            return next(reader)
        except StopIteration:
            raise DataError(f"--input: {path} is empty (not even a header row)") from None
        except UnicodeDecodeError:
            raise undecodable(path, encoding) from None


class Unreadable(dict):
    """A row the reader could not hold (a jsonl line over MAX_LINE_BYTES): no columns, and the reason."""

    def __init__(self, reason: str):
        super().__init__()
        self.reason = reason


def hash_rows(digest: Any, rows: list[dict[str, Any]]) -> None:
    """Add rows to a running SHA-256 of an input's content (each row as canonical JSON text, in order)."""
    for row in rows:
        digest.update(json.dumps(row, ensure_ascii=False, default=str, separators=(",", ":")).encode("utf-8") + b"\n")


def _rechunk(batches: Iterator[Any], rows: int, skip: int, skipped: Any) -> Iterator[list[dict[str, Any]]]:
    """Arrow record batches as lists of `rows` row dicts (the last may be shorter), after skipping `skip` rows,
    which go to `skipped(rows, last)` (so a resumed job checks them)."""
    buffered: list[dict[str, Any]] = []
    for batch in batches:
        if skip >= batch.num_rows:
            skip -= batch.num_rows
            skipped(batch.to_pylist(), skip == 0)
            continue
        if skip:
            skipped(batch.slice(0, skip).to_pylist(), True)
            batch, skip = batch.slice(skip), 0
        buffered += batch.to_pylist()
        while len(buffered) >= rows:
            yield buffered[:rows]
            buffered = buffered[rows:]
    if skip:
        skipped([], True)  # the file ends before the rows a resumed job had done
    if buffered:
        yield buffered


class Reader:
    """The rows of an input file, chunk by chunk, from row `skip` on; `names` is its column order.

    `digest` is a running SHA-256 of the rows skipped (`hash_rows`): with `expected`, the hex digest an interrupted
    job recorded for them, reading the first chunk raises DataError when the skipped rows are not those rows.
    """

    def __init__(self, path: Path, settings: ScoreSettings, skip: int = 0, expected: str | None = None):
        import pyarrow as pa

        self.path, self.settings, self.skip, self.expected = Path(path), settings, skip, expected
        self.digest = hashlib.sha256()
        self.skipped_rows = 0
        self.format = file_format(self.path, "--input")
        self.schema: Any = None
        if self.format in ("csv", "tsv"):
            delimiter = "\t" if self.format == "tsv" else ","
            self.names = (list(settings.column_names) if settings.column_names
                          else _header(self.path, delimiter, settings.quoting, settings.encoding))
            self.schema = pa.schema([(n, pa.string()) for n in self.names])
        elif self.format == "parquet":
            import pyarrow.parquet as pq

            self.schema = pq.ParquetFile(self.path).schema_arrow
            self.names = list(self.schema.names)
        else:
            self.names = list(self._first_jsonl_keys())

    def _skipped(self, rows: list[dict[str, Any]], last: bool) -> None:
        """Rows a resumed job had done: hashed, and once they are all read, compared with the job's record."""
        hash_rows(self.digest, rows)
        self.skipped_rows += len(rows)
        if last and self.expected is not None and (self.skipped_rows != self.skip
                                                   or self.digest.hexdigest() != self.expected):
            found = (f"it now has {self.skipped_rows} rows" if self.skipped_rows != self.skip
                     else f"the content of rows 1-{self.skip} changed")
            raise DataError(f"--input: {self.path} is not the input the interrupted job scored {self.skip} rows of "
                            f"({found}; checked by content, not by name or time); pass --overwrite to score it from "
                            "the start")

    def _lines(self) -> Iterator[tuple[int, str | None]]:
        """The jsonl file's non-blank lines with their numbers; a line over MAX_LINE_BYTES as None (never held whole)."""
        with open(self.path, "rb") as f:
            number = 0
            while True:
                line = f.readline(MAX_LINE_BYTES + 1)
                if not line:
                    return
                number += 1
                if len(line) > MAX_LINE_BYTES and not line.endswith(b"\n"):
                    while (rest := f.readline(MAX_LINE_BYTES)) and not rest.endswith(b"\n"):
                        pass
                    yield number, None
                    continue
                try:
                    text = line.decode(self.settings.encoding)
                except UnicodeDecodeError:
                    raise undecodable(self.path, self.settings.encoding) from None
                if number == 1 and is_utf8(self.settings.encoding):
                    text = text.removeprefix("\ufeff")  # a byte-order mark is not part of the first row
                if text.strip():
                    yield number, text

    def _first_jsonl_keys(self) -> dict[str, None]:
        for number, line in self._lines():
            if line is None:
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise DataError(f"--input: {self.path}:{number}: not valid JSON ({str(e)[:120]})") from None
            if not isinstance(row, dict):
                raise DataError(f"--input: {self.path}: each line must be a JSON object, got {line[:80]!r}")
            return dict.fromkeys(row)
        return {}

    def total_rows(self) -> int | None:
        """Rows in the file, for the progress bar (newlines for text formats, so a quoted newline counts twice)."""
        if self.format == "parquet":
            import pyarrow.parquet as pq

            return pq.ParquetFile(self.path).metadata.num_rows
        count = 0
        with open(self.path, "rb") as f:
            while block := f.read(1 << 22):
                count += block.count(b"\n")
        if self.format in ("csv", "tsv") and not self.settings.column_names:
            count -= 1
        return max(count, 0)

    def __iter__(self) -> Iterator[list[dict[str, Any]]]:
        rows = self.settings.chunk_rows
        if self.format == "jsonl":
            yield from self._jsonl(rows)
        elif self.format == "parquet":
            import pyarrow.parquet as pq

            yield from _rechunk(pq.ParquetFile(self.path).iter_batches(batch_size=rows), rows, self.skip, self._skipped)
        else:
            yield from _rechunk(self._csv_batches(), rows, self.skip, self._skipped)

    def _csv_batches(self) -> Iterator[Any]:
        import pyarrow as pa
        import pyarrow.csv as pacsv

        none = self.settings.quoting == "none"
        # Rows already done are skipped after parsing (in `_rechunk`), not with skip_rows_after_names, which also
        # counts the empty lines the reader otherwise ignores.
        # pyarrow reads UTF-8 itself (skipping a byte-order mark); another encoding it decodes with Python's codec.
        read = pacsv.ReadOptions(column_names=self.names, skip_rows=0 if self.settings.column_names else 1,
                                 block_size=CSV_BLOCK_BYTES,
                                 encoding="utf8" if is_utf8(self.settings.encoding) else self.settings.encoding)
        parse = pacsv.ParseOptions(delimiter="\t" if self.format == "tsv" else ",", quote_char=False if none else '"',
                                   newlines_in_values=not none)
        # Every column as text, as written: "007" stays "007" and "NA" is a word, not a missing value.
        convert = pacsv.ConvertOptions(column_types={n: pa.string() for n in self.names}, strings_can_be_null=False,
                                       quoted_strings_can_be_null=False, null_values=[])
        try:
            yield from pacsv.open_csv(self.path, read_options=read, parse_options=parse, convert_options=convert)
        except UnicodeDecodeError:
            raise undecodable(self.path, self.settings.encoding) from None
        except pa.ArrowInvalid as e:
            if "UTF8" in str(e) and (problem := decoding_problem(self.path, self.settings.encoding, "--encoding")):
                raise DataError(problem) from None
            if "straddl" in str(e):  # one row longer than a block: refused rather than read whole
                raise DataError(f"--input: {self.path} has a row of more than {CSV_BLOCK_BYTES >> 20} MiB; an input "
                                f"may have at most {MAX_INPUT_CHARS} characters: shorten or remove that row (rows "
                                "scored so far are kept; run the command again to resume)") from None
            raise DataError(f"--input: {self.path} cannot be read as {self.format} ({e}); for quote characters "
                            "that are plain text (GLUE's TSVs), pass --quoting none") from None

    def _jsonl(self, rows: int) -> Iterator[list[dict[str, Any]]]:
        chunk: list[dict[str, Any]] = []
        skipped: list[dict[str, Any]] = []
        seen = 0
        for number, line in self._lines():
            seen += 1
            row: dict[str, Any]
            if line is None:  # too long to read: answered with the reason, its columns empty
                row = Unreadable(f"line {number} is over {MAX_LINE_BYTES >> 20} MiB; at most {MAX_INPUT_CHARS} "
                                 "characters per input")
            else:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"--input: {self.path}:{number}: not valid JSON ({str(e)[:120]})") from None
                if not isinstance(row, dict):
                    raise DataError(f"--input: {self.path}:{number}: each line must be a JSON object")
            if seen <= self.skip:
                skipped.append(row)
                if len(skipped) >= rows or seen == self.skip:
                    self._skipped(skipped, seen == self.skip)
                    skipped = []
                continue
            chunk.append(row)
            if len(chunk) == rows:
                yield chunk
                chunk = []
        if seen < self.skip:
            self._skipped(skipped, True)
        if chunk:
            yield chunk


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------


def _cell(value: Any) -> Any:
    """A value for csv/tsv/parquet: nested values as JSON text, missing ones empty."""
    if value is None:
        return ""
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, ensure_ascii=False)
    return value


def _sheet_cell(value: Any) -> Any:
    """A csv/tsv cell: `_cell`, and never read as a formula by a spreadsheet (a label or text starting with =)."""
    return spreadsheet_cell(_cell(value))


class TextWriter:
    """csv, tsv or jsonl output appended to a partial file; `commit` makes what is written durable."""

    def __init__(self, path: Path, fmt: str, names: list[str], quoting: str, keep_bytes: int | None,
                 overwrite: bool = False):
        self.path, self.format, self.names, self.overwrite = path, fmt, names, overwrite
        # Bytes underneath, so the committed offset is a byte count, and text on top for the csv module. A new
        # partial file is created exclusively and an old one opened without following links: nothing planted at
        # OUTPUT.partial is written through.
        self.raw = open_new(path, "wb") if keep_bytes is None else open_existing(path, "r+b")
        if keep_bytes is not None:  # resuming: whatever came after the last commit was never recorded as done
            if keep_bytes > os.fstat(self.raw.fileno()).st_size:
                self.raw.close()
                raise DataError(f"--output: {path} is shorter than its progress record says; pass --overwrite to "
                                "start again")
            self.raw.truncate(keep_bytes)
            self.raw.seek(keep_bytes)
        self.file = io.TextIOWrapper(self.raw, encoding="utf-8", newline="")
        if fmt != "jsonl":
            # quoting none (GLUE's TSVs): quote characters are plain text, as the reader took them.
            plain = {"quoting": csv.QUOTE_NONE, "quotechar": None, "escapechar": "\\"} if quoting == "none" else {}
            self.csv = csv.writer(self.file, delimiter="\t" if fmt == "tsv" else ",", lineterminator="\n", **plain)
            if keep_bytes is None:
                self.csv.writerow([spreadsheet_cell(n) for n in names])

    def write(self, rows: list[dict[str, Any]]) -> None:
        if self.format == "jsonl":
            self.file.writelines(json.dumps(row, ensure_ascii=False, default=str) + "\n" for row in rows)
        else:
            self.csv.writerows([_sheet_cell(row.get(n)) for n in self.names] for row in rows)

    def commit(self) -> dict[str, int]:
        self.file.flush()
        os.fsync(self.raw.fileno())
        return {"bytes": self.raw.tell()}

    def finish(self, output: Path) -> None:
        self.commit()
        self.file.close()
        _into_place(self.path, output, self.overwrite)


def _into_place(made: Path, output: Path, overwrite: bool) -> None:
    """Move the finished output into place: over whatever is there (a link replaced, never followed) with
    --overwrite, else only where nothing is, even something that appeared while the job ran."""
    if overwrite:
        os.replace(made, output)
        return
    try:
        move_new(made, output)
    except FileExistsError:
        raise DataError(f"--output: {output} appeared while the job ran; the scored rows are kept in {made}: "
                        "move it away and run the command again, or pass --overwrite") from None


class ParquetWriter:
    """parquet output as one file per chunk in a parts folder, merged in order at the end (a parquet file
    cannot be appended to once its writer is gone, so a killed job keeps its finished chunks this way)."""

    def __init__(self, parts: Path, schema: Any, keep_parts: int | None, overwrite: bool = False):
        self.parts, self.schema, self.overwrite = parts, schema, overwrite
        self.count = keep_parts or 0
        refuse_link(parts, "--output's parts folder")
        if keep_parts is None:
            parts.mkdir()  # a new folder (the job's state was checked): never one that was there
        elif not parts.is_dir():
            raise DataError(f"--output: {parts} is not a folder; pass --overwrite to start again")
        for stale in parts.iterdir():  # written after the last commit (or not finetune's: never read)
            number = stale.name[5:11]
            if not (stale.name.startswith("part-") and number.isdigit() and stale.name.endswith(".parquet")
                    and int(number) < self.count) and (stale.is_symlink() or stale.is_file()):
                stale.unlink()

    def write(self, rows: list[dict[str, Any]]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        def value(row: dict[str, Any], name: str, as_text: bool) -> Any:
            found = row.get(name)
            return json.dumps(found, ensure_ascii=False) if as_text and isinstance(found, (dict, list, tuple)) else found

        texts = {name: self.schema.field(name).type == pa.string() for name in self.schema.names}
        columns = {name: [value(row, name, texts[name]) for row in rows] for name in self.schema.names}
        table = pa.table(columns, schema=self.schema)
        tmp = self.parts / f"part-{self.count:06d}.tmp"
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        with open_new(tmp, "wb") as f:
            pq.write_table(table, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.parts / f"part-{self.count:06d}.parquet")
        self.count += 1

    def commit(self) -> dict[str, int]:
        return {"parts": self.count}

    def finish(self, output: Path) -> None:
        import pyarrow.parquet as pq

        tmp = output.with_name(f".{output.name}.{os.getpid()}.tmp")
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        with open_new(tmp, "wb") as f:
            with pq.ParquetWriter(f, self.schema) as writer:
                for i in range(self.count):
                    part = self.parts / f"part-{i:06d}.parquet"
                    refuse_link(part)
                    writer.write_table(pq.read_table(part, schema=self.schema))
            f.flush()
            os.fsync(f.fileno())
        _into_place(tmp, output, self.overwrite)
        shutil.rmtree(self.parts, ignore_errors=True)


def _output_schema(reader: Reader, first: list[dict[str, Any]], input_names: list[str],
                   answer_fields: dict[str, Any]) -> Any:
    """Input columns with the input's types (csv: text; jsonl: as the first chunk has them), then predictions."""
    import pyarrow as pa

    if reader.schema is not None:
        fields = [f for f in reader.schema if f.name in input_names]
    else:
        inferred = pa.Table.from_pylist([{k: _cell(v) if isinstance(v, (dict, list)) else v for k, v in row.items()}
                                         for row in first]).schema if first else pa.schema([])
        fields = [f if not pa.types.is_null(f.type) else pa.field(f.name, pa.string()) for f in inferred
                  if f.name in input_names]

    def arrow_type(value: Any) -> Any:
        if isinstance(value, bool):
            return pa.bool_()
        if isinstance(value, int):
            return pa.int64()
        if isinstance(value, float):
            return pa.float64()
        return pa.string()

    fields += [pa.field(PREFIX + k, arrow_type(v)) for k, v in answer_fields.items()]
    fields.append(pa.field(ERROR_COLUMN, pa.string()))
    return pa.schema(fields)


# ---------------------------------------------------------------------------------------------
# the job
# ---------------------------------------------------------------------------------------------


@dataclass
class Prepared:
    """One chunk read and tokenised, ready for the model: its rows, the inputs the model can read, their
    features, and a reason ("" when none) per row."""

    rows: list[dict[str, Any]]
    good: list[int]
    inputs: list[Any]
    encoded: Any
    errors: list[str]


def characters(value: Any) -> int:
    """The characters of a cell as the model would read it: text, or every text in a list or mapping."""
    if value is None:
        return 0
    if isinstance(value, str):
        return len(value)
    if isinstance(value, (list, tuple)):
        return sum(characters(v) for v in value)
    if isinstance(value, dict):
        return sum(characters(v) for v in value.values())
    return len(str(value))


def prepare_chunk(predictor: Predictor, rows: list[dict[str, Any]], names: list[str], data: Any) -> Prepared:
    """The model inputs of a chunk of rows, checked and tokenised; a row the model cannot read gets its reason.

    An input over MAX_INPUT_CHARS characters (the server's limit) is answered with the reason before anything
    else reads it: a tokeniser given megabytes of text takes gigabytes, and the text would be truncated anyway.
    """
    task = predictor.task
    read = [c for c in task.input_columns(data, predictor.info.text_pair).values() if c]
    errors = [row.reason if isinstance(row, Unreadable) else "" for row in rows]
    for i, row in enumerate(rows):
        if not errors[i]:
            chars = sum(characters(row.get(c)) for c in read)
            if chars > MAX_INPUT_CHARS:
                errors[i] = f"{chars} characters; at most {MAX_INPUT_CHARS} per input (as finetune serve)"
    readable = [i for i, e in enumerate(errors) if not e]
    columns = {n: [rows[i].get(n) for i in readable] for n in names}
    item_of = dict(zip(readable, task.inputs_from_rows(columns, data, predictor.info.text_pair) if readable else []))
    try:
        kept = [item_of[i] for i in readable]
        return Prepared(rows, readable, kept, predictor.encode_inputs(kept) if kept else None, errors)
    except InputError:
        pass
    good = []
    for i in readable:  # only for a chunk with a bad row: find every one the model cannot read
        try:
            predictor.encode_inputs([item_of[i]])
            good.append(i)
        except InputError as e:
            errors[i] = str(e)
    kept = [item_of[i] for i in good]
    return Prepared(rows, good, kept, predictor.encode_inputs(kept) if kept else None, errors)


def answer_chunk(predictor: Predictor, prepared: Prepared, options: PostprocessOptions) -> list[dict[str, Any]]:
    """An answer per row of a prepared chunk ({} for the rows the model cannot read)."""
    answers: list[dict[str, Any]] = [{} for _ in prepared.rows]
    if prepared.encoded is not None:
        outputs = predictor.outputs(prepared.encoded.features)
        for i, answer in zip(prepared.good, predictor.answer(prepared.inputs, prepared.encoded, outputs, options)):
            answers[i] = answer
    return answers


def read_ahead(chunks: Iterator[list[dict[str, Any]]], predictor: Predictor, names: list[str],
               data: Any) -> Iterator[Prepared]:
    """Prepared chunks, reading and tokenising the next one in a thread while the model runs on this one.

    One chunk ahead at most, so memory stays two chunks whatever the file's length. The forward pass
    releases the GIL, so the reading and tokenising overlap it instead of adding to it.
    """
    ahead: queue.Queue = queue.Queue(maxsize=1)
    stop = threading.Event()

    def work() -> None:
        try:
            for chunk in chunks:
                if stop.is_set():
                    return
                ahead.put(prepare_chunk(predictor, chunk, names, data))
            ahead.put(None)
        except BaseException as e:  # handed to the consumer, which raises it
            ahead.put(e)

    thread = threading.Thread(target=work, name="finetune-read-ahead", daemon=True)
    thread.start()
    try:
        while (item := ahead.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # let a producer blocked on a full queue finish
            try:
                ahead.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.1)


def _state_paths(output: Path) -> tuple[Path, Path, Path]:
    return (output.with_name(output.name + ".progress.json"), output.with_name(output.name + ".partial"),
            output.with_name(output.name + ".parts"))


def model_digest(predictor: Predictor) -> str:
    """SHA-256 of what decides a model's answers, as loaded: finetune.json's settings (labels, max_length, task,
    temperature ...), the runtime, the tokenizer and the weights (the ONNX file for ONNX Runtime). Two loads of the
    same content give the same digest whatever path, run id or registry alias named them."""
    digest = hashlib.sha256()
    digest.update(json.dumps(asdict(predictor.info), sort_keys=True, default=str).encode("utf-8"))
    digest.update(predictor.runtime.encode("utf-8"))
    tokenizer = predictor.tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    digest.update(backend.to_str().encode("utf-8") if backend is not None else
                  json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False).encode("utf-8"))
    session = getattr(predictor, "session", None)
    model_path = getattr(session, "_model_path", None) if session is not None else None
    if model_path:
        with open(model_path, "rb") as f:
            while block := f.read(1 << 22):
                digest.update(block)
    elif session is not None:  # a session made from bytes: what it was made from is not at hand
        digest.update(repr([(i.name, i.type, i.shape) for i in session.get_outputs()]).encode("utf-8"))
    else:
        import torch

        for name, tensor in predictor.model.state_dict().items():
            digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode("utf-8"))
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


def _write_progress(path: Path, state: dict[str, Any]) -> None:
    write_atomic(path, json.dumps(state, indent=2))  # a link planted at the progress file is replaced, not followed


def _read_progress(progress: Path) -> dict[str, Any]:
    """An interrupted job's record, read with a bound and checked field by field."""
    try:
        state = read_json(progress, max_bytes=MAX_PROGRESS_BYTES)
    except (RefusedDocument, OSError) as e:
        raise DataError(f"--output: {progress} cannot be read as a progress record ({e}); pass --overwrite to "
                        "start again") from None
    counts = ("rows_done", "bytes", "parts")
    if not isinstance(state, dict) or not all(isinstance(state.get(k), int) and not isinstance(state.get(k), bool)
                                              and state[k] >= 0 for k in counts if k in state) \
            or not isinstance(state.get("rows_done"), int):
        raise DataError(f"--output: {progress} is not a progress record finetune wrote; pass --overwrite to start "
                        "again")
    return state


def _remove_own(path: Path) -> None:
    """Remove an interrupted job's partial output (a link there is removed, never followed)."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def _resume_state(input_path: Path, output: Path, settings: ScoreSettings, overwrite: bool,
                  model: str) -> dict[str, Any] | None:
    """The record of the interrupted job to continue, None to start afresh; refuses what would mix two jobs or
    replace a file finetune did not make."""
    progress, partial, parts = _state_paths(output)
    if overwrite:
        for path in (progress, partial, parts):
            _remove_own(path)
        return None
    if os.path.lexists(progress):
        if progress.is_symlink() or not progress.is_file():
            raise DataError(f"--output: {progress} is not a file finetune wrote (a link or a folder); remove it, or "
                            "pass --overwrite")
        state = _read_progress(progress)
        if state.get("version") != PROGRESS_VERSION:
            raise DataError(f"--output: {progress} is the record of an interrupted job of another finetune version "
                            "(or not finetune's); pass --overwrite to start again")
        # The model is compared by content below, not by the path or name that found it.
        wanted = {k: v for k, v in asdict(settings).items() if k != "model"}
        recorded = state.get("settings") if isinstance(state.get("settings"), dict) else {}
        differs = sorted(k for k, v in wanted.items() if recorded.get(k) != v)
        if differs:
            raise DataError(
                f"--output: {progress} is the record of an interrupted job with other options ({', '.join(differs)}); "
                "run the same command to resume it, or pass --overwrite to start again")
        if state.get("model_sha256") != model:
            raise DataError(
                f"--output: {progress} is the record of an interrupted job of another model: the model "
                f"{settings.model} now has other weights, tokenizer or settings than the rows already scored "
                "(retrained, or a registry alias that moved), so resuming would mix two models' predictions in one "
                "file; pass --overwrite to score the whole file with this model")
        if not isinstance(state.get("input_sha256"), str):
            raise DataError(f"--output: {progress} does not record its input's content; pass --overwrite to start "
                            "again")
        if state["rows_done"] == 0:  # killed before the first chunk: nothing to keep
            for path in (partial, parts):
                refuse_link(path, "--output's partial output")
                _remove_own(path)
            return None
        return state
    for path in (partial, parts):
        if os.path.lexists(path):
            raise DataError(f"--output: {path} exists without a progress record, so it is not known to be "
                            "finetune's; remove it, or pass --overwrite")
    if os.path.lexists(output):
        raise DataError(f"--output: {output} exists; pass --overwrite to replace it")
    return None


def score_file(predictor: Predictor, input_path: Path, output: Path, data: Any, settings: ScoreSettings,
               overwrite: bool = False, progress: bool = True) -> ScoreReport:
    """Score every row of `input_path` into `output` (see the module docstring); resumes an interrupted job."""
    from tqdm.auto import tqdm

    input_path, output = Path(input_path), Path(output)
    out_format = file_format(output, "--output")
    if not input_path.is_file():
        raise DataError(f"--input: file not found: {input_path} (resolved to {input_path.resolve()})")
    if output.resolve() == input_path.resolve():
        raise DataError("--output: the output must be another file than the input")
    if output.is_dir() and not output.is_symlink():
        raise DataError(f"--output: {output} is a folder; give a file name")
    task, text_pair = predictor.task, predictor.info.text_pair
    model = model_digest(predictor)
    try:
        state = _resume_state(input_path, output, settings, overwrite, model)
    except RefusedWrite as e:
        raise DataError(str(e)) from None
    progress_path, partial, parts = _state_paths(output)
    if state and not (parts.is_dir() and not parts.is_symlink() if out_format == "parquet"
                      else partial.is_file() and not partial.is_symlink()):
        raise DataError(f"--output: {progress_path} records an interrupted job, but its partial output "
                        f"{parts if out_format == 'parquet' else partial} is gone; pass --overwrite to start again")
    done = state["rows_done"] if state else 0
    reader = Reader(input_path, settings, skip=done, expected=state["input_sha256"] if state else None)
    for key, column in task.input_columns(data, text_pair).items():
        if column is None or column not in reader.names:
            from finetune.evaluation.data import option_name

            found = f"column {column!r} is not in {input_path}" if column else "this model needs it"
            raise DataError(f"{option_name(key)}: {found}; columns found: {', '.join(reader.names)}")
    options = PostprocessOptions(threshold=predictor.info.threshold)
    example = predictor.predict([task.example_input(text_pair)], options)[0]
    answer_fields = {k: v for k, v in example.items()}
    predicted = {PREFIX + k for k in answer_fields} | {ERROR_COLUMN}
    input_names = [n for n in reader.names if n not in predicted]
    names = input_names + [PREFIX + k for k in answer_fields] + [ERROR_COLUMN]
    chunks = iter(reader)
    first = next(chunks, [])  # a resumed job checks here that the rows it had done are the same, before writing
    digest = reader.digest  # covers the rows done so far; the chunks written below are added to it
    record = {"version": PROGRESS_VERSION, "input": str(input_path.resolve()), "model_sha256": model,
              "settings": asdict(settings)}
    try:
        if state is None:
            # The record first, then the partial output: a partial output without a record is never finetune's.
            _write_progress(progress_path, record | {"rows_done": 0, "input_sha256": digest.hexdigest(),
                                                     "bytes": 0, "parts": 0})
        if out_format == "parquet":
            schema = _output_schema(reader, first, input_names, answer_fields)
            writer: Any = ParquetWriter(parts, schema, state["parts"] if state else None, overwrite)
        else:
            writer = TextWriter(partial, out_format, names, settings.quoting, state["bytes"] if state else None,
                                overwrite)
    except (RefusedWrite, FileExistsError) as e:
        raise DataError(f"--output: {e}; remove it, or pass --overwrite") from None
    started, errors, scored, committed = time.perf_counter(), 0, 0, done
    try:
        committed = _score_rows(tqdm, reader, progress, done, first, chunks, predictor, data, options, predicted,
                                input_names, answer_fields, writer, digest, progress_path, record)
    except KeyboardInterrupt:
        # What the progress file records is what a rerun resumes from (a chunk cut off by the key is redone).
        raise ScoringInterrupted(_read_progress_rows(progress_path, committed), output) from None
    scored, errors = committed.scored, committed.errors
    done = committed.done
    writer.finish(output)
    progress_path.unlink(missing_ok=True)
    seconds = time.perf_counter() - started
    return ScoreReport(output, done, seconds, scored / seconds if seconds else 0.0, errors,
                       state["rows_done"] if state else 0, names)


class ScoringInterrupted(KeyboardInterrupt):
    """Ctrl-C while scoring a file: the rows written so far are kept, and the same command resumes after them.
    A KeyboardInterrupt still (whoever stops on Ctrl-C stops on it); its text is the one line the user sees."""

    def __init__(self, rows: int, output: Path):
        super().__init__(f"interrupted: {rows} rows written (toward {output}); run the same command again to resume")
        self.rows = rows


def _read_progress_rows(progress: Path, fallback: Any) -> int:
    try:
        return int(_read_progress(progress)["rows_done"])
    except Exception:  # no record yet, or one a kill cut short: the count the loop had reached
        return int(getattr(fallback, "done", fallback))


@dataclass
class _Counts:
    done: int
    scored: int = 0
    errors: int = 0


def _score_rows(tqdm: Any, reader: "Reader", progress: bool, done: int, first: list, chunks: Iterator[list],
                predictor: Predictor, data: Any, options: PostprocessOptions, predicted: set[str],
                input_names: list[str], answer_fields: dict[str, Any], writer: Any, digest: Any,
                progress_path: Path, record: dict[str, Any]) -> "_Counts":
    counts = _Counts(done)
    with tqdm(total=reader.total_rows() if progress else None, initial=done, unit="rows", unit_scale=True,
              desc="scoring", disable=not progress or None, smoothing=0.1) as bar:
        for prepared in read_ahead(_chain(first, chunks), predictor, reader.names, data):
            chunk, problems = prepared.rows, prepared.errors
            answers = answer_chunk(predictor, prepared, options)
            rows = []
            for row, answer, problem in zip(chunk, answers, problems):
                # jsonl rows keep every key they have (columns are those of the first row elsewhere).
                out = ({k: v for k, v in row.items() if k not in predicted} if reader.format == "jsonl"
                       else {n: row.get(n) for n in input_names})
                out |= {PREFIX + k: answer.get(k) for k in answer_fields}
                out[ERROR_COLUMN] = problem
                rows.append(out)
            writer.write(rows)
            hash_rows(digest, chunk)
            done += len(chunk)
            _write_progress(progress_path, record | {"rows_done": done, "input_sha256": digest.hexdigest(),
                                                     **writer.commit()})
            counts.done, counts.scored = done, counts.scored + len(chunk)
            counts.errors += sum(1 for p in problems if p)
            bar.update(len(chunk))
    return counts


def _chain(first: list, rest: Iterator[list]) -> Iterator[list]:
    if first:
        yield first
    yield from rest
