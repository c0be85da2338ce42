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
"""

from __future__ import annotations

import csv
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

from finetune.errors import DataError, InputError
from finetune.models.predictor import Predictor
from finetune.tasks import PostprocessOptions

FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".parquet": "parquet"}
PREFIX = "pred_"
ERROR_COLUMN = f"{PREFIX}error"
PROGRESS_VERSION = 1


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


def _header(path: Path, delimiter: str, quoting: str) -> list[str]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f, delimiter=delimiter, quoting=csv.QUOTE_NONE if quoting == "none" else csv.QUOTE_MINIMAL)
        try:
            return next(reader)
        except StopIteration:
            raise DataError(f"--input: {path} is empty (not even a header row)") from None


def _rechunk(batches: Iterator[Any], rows: int, skip: int) -> Iterator[list[dict[str, Any]]]:
    """Arrow record batches as lists of `rows` row dicts (the last may be shorter), after skipping `skip` rows."""
    buffered: list[dict[str, Any]] = []
    for batch in batches:
        if skip >= batch.num_rows:
            skip -= batch.num_rows
            continue
        if skip:
            batch, skip = batch.slice(skip), 0
        buffered += batch.to_pylist()
        while len(buffered) >= rows:
            yield buffered[:rows]
            buffered = buffered[rows:]
    if buffered:
        yield buffered


class Reader:
    """The rows of an input file, chunk by chunk, from row `skip` on; `names` is its column order."""

    def __init__(self, path: Path, settings: ScoreSettings, skip: int = 0):
        import pyarrow as pa

        self.path, self.settings, self.skip = Path(path), settings, skip
        self.format = file_format(self.path, "--input")
        self.schema: Any = None
        if self.format in ("csv", "tsv"):
            delimiter = "\t" if self.format == "tsv" else ","
            self.names = list(settings.column_names) if settings.column_names else _header(self.path, delimiter, settings.quoting)
            self.schema = pa.schema([(n, pa.string()) for n in self.names])
        elif self.format == "parquet":
            import pyarrow.parquet as pq

            self.schema = pq.ParquetFile(self.path).schema_arrow
            self.names = list(self.schema.names)
        else:
            self.names = list(self._first_jsonl_keys())

    def _first_jsonl_keys(self) -> dict[str, None]:
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    row = json.loads(line)
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

            yield from _rechunk(pq.ParquetFile(self.path).iter_batches(batch_size=rows), rows, self.skip)
        else:
            yield from _rechunk(self._csv_batches(), rows, self.skip)

    def _csv_batches(self) -> Iterator[Any]:
        import pyarrow as pa
        import pyarrow.csv as pacsv

        none = self.settings.quoting == "none"
        # Rows already done are skipped after parsing (in `_rechunk`), not with skip_rows_after_names, which also
        # counts the empty lines the reader otherwise ignores.
        read = pacsv.ReadOptions(column_names=self.names, skip_rows=0 if self.settings.column_names else 1,
                                 block_size=1 << 20)
        parse = pacsv.ParseOptions(delimiter="\t" if self.format == "tsv" else ",", quote_char=False if none else '"',
                                   newlines_in_values=not none)
        # Every column as text, as written: "007" stays "007" and "NA" is a word, not a missing value.
        convert = pacsv.ConvertOptions(column_types={n: pa.string() for n in self.names}, strings_can_be_null=False,
                                       quoted_strings_can_be_null=False, null_values=[])
        try:
            yield from pacsv.open_csv(self.path, read_options=read, parse_options=parse, convert_options=convert)
        except pa.ArrowInvalid as e:
            raise DataError(f"--input: {self.path} cannot be read as {self.format} ({e}); for quote characters "
                            "that are plain text (GLUE's TSVs), pass --quoting none") from None

    def _jsonl(self, rows: int) -> Iterator[list[dict[str, Any]]]:
        chunk: list[dict[str, Any]] = []
        seen = 0
        with open(self.path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                seen += 1
                if seen <= self.skip:
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"--input: {self.path}:{number}: not valid JSON ({e})") from None
                if not isinstance(row, dict):
                    raise DataError(f"--input: {self.path}:{number}: each line must be a JSON object")
                chunk.append(row)
                if len(chunk) == rows:
                    yield chunk
                    chunk = []
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
        return json.dumps(value)
    return value


class TextWriter:
    """csv, tsv or jsonl output appended to a partial file; `commit` makes what is written durable."""

    def __init__(self, path: Path, fmt: str, names: list[str], quoting: str, keep_bytes: int | None):
        self.path, self.format, self.names = path, fmt, names
        # Bytes underneath, so the committed offset is a byte count, and text on top for the csv module.
        self.raw = open(path, "wb" if keep_bytes is None else "r+b")
        if keep_bytes is not None:  # resuming: whatever came after the last commit was never recorded as done
            self.raw.truncate(keep_bytes)
            self.raw.seek(keep_bytes)
        self.file = io.TextIOWrapper(self.raw, encoding="utf-8", newline="")
        if fmt != "jsonl":
            # quoting none (GLUE's TSVs): quote characters are plain text, as the reader took them.
            plain = {"quoting": csv.QUOTE_NONE, "quotechar": None, "escapechar": "\\"} if quoting == "none" else {}
            self.csv = csv.writer(self.file, delimiter="\t" if fmt == "tsv" else ",", lineterminator="\n", **plain)
            if keep_bytes is None:
                self.csv.writerow(names)

    def write(self, rows: list[dict[str, Any]]) -> None:
        if self.format == "jsonl":
            self.file.writelines(json.dumps(row, ensure_ascii=False, default=str) + "\n" for row in rows)
        else:
            self.csv.writerows([_cell(row.get(n)) for n in self.names] for row in rows)

    def commit(self) -> dict[str, int]:
        self.file.flush()
        os.fsync(self.raw.fileno())
        return {"bytes": self.raw.tell()}

    def finish(self, output: Path) -> None:
        self.commit()
        self.file.close()
        os.replace(self.path, output)


class ParquetWriter:
    """parquet output as one file per chunk in a parts folder, merged in order at the end (a parquet file
    cannot be appended to once its writer is gone, so a killed job keeps its finished chunks this way)."""

    def __init__(self, parts: Path, schema: Any, keep_parts: int | None):
        self.parts, self.schema = parts, schema
        self.count = keep_parts or 0
        if keep_parts is None:
            shutil.rmtree(parts, ignore_errors=True)
        parts.mkdir(parents=True, exist_ok=True)
        for stale in parts.glob("part-*"):  # written after the last commit
            if not stale.name.endswith(".parquet") or int(stale.name[5:11]) >= self.count:
                stale.unlink()

    def write(self, rows: list[dict[str, Any]]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        def value(row: dict[str, Any], name: str, as_text: bool) -> Any:
            found = row.get(name)
            return json.dumps(found) if as_text and isinstance(found, (dict, list, tuple)) else found

        texts = {name: self.schema.field(name).type == pa.string() for name in self.schema.names}
        columns = {name: [value(row, name, texts[name]) for row in rows] for name in self.schema.names}
        table = pa.table(columns, schema=self.schema)
        tmp = self.parts / f"part-{self.count:06d}.tmp"
        pq.write_table(table, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, self.parts / f"part-{self.count:06d}.parquet")
        self.count += 1

    def commit(self) -> dict[str, int]:
        return {"parts": self.count}

    def finish(self, output: Path) -> None:
        import pyarrow.parquet as pq

        tmp = output.with_name(output.name + ".tmp")
        with pq.ParquetWriter(tmp, self.schema) as writer:
            for i in range(self.count):
                writer.write_table(pq.read_table(self.parts / f"part-{i:06d}.parquet", schema=self.schema))
        os.replace(tmp, output)
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


def prepare_chunk(predictor: Predictor, rows: list[dict[str, Any]], names: list[str], data: Any) -> Prepared:
    """The model inputs of a chunk of rows, checked and tokenised; a row the model cannot read gets its reason."""
    task = predictor.task
    columns = {n: [row.get(n) for row in rows] for n in names}
    inputs = task.inputs_from_rows(columns, data, predictor.info.text_pair)
    try:
        return Prepared(rows, list(range(len(inputs))), inputs, predictor.encode_inputs(inputs), [""] * len(inputs))
    except InputError:
        pass
    errors = []
    for item in inputs:  # only for a chunk with a bad row: find every one the model cannot read
        try:
            predictor.encode_inputs([item])
            errors.append("")
        except InputError as e:
            errors.append(str(e))
    good = [i for i, e in enumerate(errors) if not e]
    kept = [inputs[i] for i in good]
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


def _identity(path: Path) -> dict[str, Any]:
    stat = path.stat()
    return {"input": str(path.resolve()), "input_size": stat.st_size, "input_mtime_ns": stat.st_mtime_ns}


def _write_progress(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    os.replace(tmp, path)


def _resume_state(input_path: Path, output: Path, settings: ScoreSettings, overwrite: bool) -> dict[str, Any] | None:
    progress, partial, parts = _state_paths(output)
    if overwrite:
        for path in (progress, partial, output):
            path.unlink(missing_ok=True)
        shutil.rmtree(parts, ignore_errors=True)
        return None
    if progress.is_file():
        state = json.loads(progress.read_text())
        wanted = {"version": PROGRESS_VERSION, **_identity(input_path), "settings": asdict(settings)}
        differs = [k for k, v in wanted.items() if state.get(k) != v]
        if differs:
            raise DataError(
                f"--output: {progress} is the record of an interrupted job with another "
                f"{'input file' if any(k.startswith('input') for k in differs) else 'model or options'} "
                f"({', '.join(differs)}); run the same command to resume it, or pass --overwrite to start again")
        return state
    if output.exists():
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
    task, text_pair = predictor.task, predictor.info.text_pair
    state = _resume_state(input_path, output, settings, overwrite)
    progress_path, partial, parts = _state_paths(output)
    if state and not (parts.is_dir() if out_format == "parquet" else partial.is_file()):
        raise DataError(f"--output: {progress_path} records an interrupted job, but its partial output "
                        f"{parts if out_format == 'parquet' else partial} is gone; pass --overwrite to start again")
    done = state["rows_done"] if state else 0
    reader = Reader(input_path, settings, skip=done)
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
    first = next(chunks, [])
    if out_format == "parquet":
        schema = _output_schema(reader, first, input_names, answer_fields)
        writer: Any = ParquetWriter(parts, schema, state["parts"] if state else None)
    else:
        writer = TextWriter(partial, out_format, names, settings.quoting, state["bytes"] if state else None)
    record = {"version": PROGRESS_VERSION, **_identity(input_path), "settings": asdict(settings)}
    started, errors, scored = time.perf_counter(), 0, 0
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
            errors += sum(1 for p in problems if p)
            writer.write(rows)
            done += len(chunk)
            scored += len(chunk)
            _write_progress(progress_path, record | {"rows_done": done, **writer.commit()})
            bar.update(len(chunk))
    writer.finish(output)
    progress_path.unlink(missing_ok=True)
    seconds = time.perf_counter() - started
    return ScoreReport(output, done, seconds, scored / seconds if seconds else 0.0, errors,
                       state["rows_done"] if state else 0, names)


def _chain(first: list, rest: Iterator[list]) -> Iterator[list]:
    if first:
        yield first
    yield from rest
