"""Terminal output of the command line: tables, progress, JSON, optional extras.

rich, tqdm and matplotlib are the ``cli`` extra (``pip install "rotorquant[cli]"``). Every function here
works without them: tables fall back to aligned plain text, progress to nothing, and ``--plot`` asks for the
extra with a one-line error. The extras are imported when used, never at import time, so the core install
stays lean and ``rotorquant info`` starts fast.
"""
from __future__ import annotations

import importlib
import json
import math
import os
import sys
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

CLI_EXTRA = 'pip install "rotorquant[cli]"'


class CliError(Exception):
    """An error reported as one line ``rotorquant <command>: error: <message>`` with an exit code."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


def optional_module(name: str):
    """The module, or None when it is not installed (or blocked, as the fallback tests do)."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def require_matplotlib():
    """pyplot with the non-interactive Agg backend, or a CliError naming the extra."""
    matplotlib = optional_module("matplotlib")
    if matplotlib is None:
        raise CliError(f"--plot needs matplotlib, which is not installed: {CLI_EXTRA}")
    matplotlib.use("Agg", force=True)
    return importlib.import_module("matplotlib.pyplot")


# -- numbers -------------------------------------------------------------------------------
def format_value(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if digits == 0 and math.isfinite(value):
            return f"{value:,.0f}"
        if math.isnan(value):
            return "nan"
        if value == 0.0:
            return "0"
        magnitude = abs(value)
        if magnitude >= 1e5 or magnitude < 10 ** -(digits):
            return f"{value:.{max(digits - 2, 1)}e}"
        if magnitude >= 100:
            return f"{value:.1f}"
        return f"{value:.{digits}f}"
    return str(value)


def json_ready(value: Any) -> Any:
    """Plain JSON types: numpy scalars and arrays become Python numbers and lists, NaN/Inf become None."""
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return json_ready(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def check_output_file(path: str, option: str) -> None:
    """Fails early (exit 2) when ``path`` cannot be written: its folder is missing or it is a folder."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise CliError(f"{option}: folder {folder} does not exist", exit_code=2)
    if os.path.isdir(path):
        raise CliError(f"{option}: {path} is a folder, expected a file name", exit_code=2)


def write_json(path: str, payload: Dict[str, Any]) -> None:
    """Writes the results atomically (a temporary file renamed into place)."""
    check_output_file(path, "--json")
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(json_ready(payload), handle, indent=2, allow_nan=False)
        handle.write("\n")
    os.replace(tmp, path)


def print_report_header(text: str, stream=None) -> None:
    stream = stream or sys.stdout
    print(text, file=stream)
    print(file=stream)


# -- tables --------------------------------------------------------------------------------
class Column:
    """One column of a result table: the row key, its header, and how many digits floats get."""

    def __init__(self, key: str, header: Optional[str] = None, digits: int = 4):
        self.key = key
        self.header = header or key
        self.digits = digits


def print_table(title: str, columns: Sequence[Column], rows: Iterable[Dict[str, Any]], note: str = "",
                plain: bool = False, stream=None) -> None:
    """A table with rich when it is installed (and ``plain`` is false), else aligned plain text."""
    stream = stream or sys.stdout
    rows = list(rows)
    cells = [[format_value(row.get(c.key), c.digits) for c in columns] for row in rows]
    rich_console = None if plain else optional_module("rich.console")
    rich_table = None if plain else optional_module("rich.table")
    if rich_console is not None and rich_table is not None:
        table = rich_table.Table(title=title, title_justify="left", caption=note or None, caption_justify="left")
        for column in columns:
            table.add_column(column.header, justify="right" if _is_numeric_column(rows, column.key) else "left")
        for line in cells:
            table.add_row(*line)
        natural = sum(max([len(c.header)] + [len(line[i]) for line in cells]) + 3 for i, c in enumerate(columns)) + 1
        console = rich_console.Console(file=stream, width=max(natural, _terminal_width()))
        console.print(table)
        console.print()
        return
    widths = [max([len(c.header)] + [len(line[i]) for line in cells]) for i, c in enumerate(columns)]
    numeric = [_is_numeric_column(rows, c.key) for c in columns]
    print(title, file=stream)
    header = "  ".join(c.header.rjust(w) if num else c.header.ljust(w) for c, w, num in zip(columns, widths, numeric))
    print(header.rstrip(), file=stream)
    print("-" * len(header), file=stream)
    for line in cells:
        print("  ".join(cell.rjust(w) if num else cell.ljust(w) for cell, w, num in zip(line, widths, numeric)).rstrip(),
              file=stream)
    if note:
        print(note, file=stream)
    print(file=stream)


def _is_numeric_column(rows: Sequence[Dict[str, Any]], key: str) -> bool:
    """Right-aligned: a column with a number in it, or with no values at all (only "-")."""
    values = [row.get(key) for row in rows if row.get(key) is not None]
    return not values or any(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def _terminal_width() -> int:
    try:
        return os.get_terminal_size().columns
    except OSError:
        return 120


# -- progress ------------------------------------------------------------------------------
class Progress:
    """A progress bar over a known number of steps (tqdm when installed and enabled), else silent."""

    def __init__(self, total: int, description: str, enabled: bool = True):
        self._bar = None
        tqdm = optional_module("tqdm") if enabled else None
        if tqdm is not None:
            # disable=None: silent when stderr is not a terminal (CI logs, pipes)
            self._bar = tqdm.tqdm(total=total, desc=description, unit="step", leave=False, file=sys.stderr,
                                  dynamic_ncols=True, disable=None)

    def step(self, label: str = "") -> None:
        if self._bar is not None:
            if label:
                self._bar.set_postfix_str(label, refresh=False)
            self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress_callback(enabled: bool) -> Callable[..., None]:
    """A ``progress(done, total, label)`` callback for long work in other modules (e.g. the evaluation)."""
    state: Dict[str, Any] = {"bar": None, "done": 0}
    tqdm = optional_module("tqdm") if enabled else None

    def callback(done: int, total: int, label: str = "") -> None:
        if tqdm is None:
            return
        if state["bar"] is None:
            state["bar"] = tqdm.tqdm(total=total, desc="eval", leave=False, file=sys.stderr, dynamic_ncols=True,
                                     disable=None)
        bar = state["bar"]
        if label:
            bar.set_postfix_str(str(label), refresh=False)
        bar.update(max(0, int(done) - state["done"]))
        state["done"] = int(done)
        if done >= total:
            bar.close()
            state["bar"] = None
            state["done"] = 0

    return callback


def rows_to_columns(rows: List[Dict[str, Any]]) -> List[Column]:
    """Columns for rows of unknown layout (every key seen, in first-seen order)."""
    keys: List[str] = []
    for row in rows:
        for key in row:
            if key not in keys:
                keys.append(key)
    return [Column(k) for k in keys]
