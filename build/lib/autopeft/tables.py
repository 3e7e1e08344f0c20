"""Plain-text tables for the console (pandas), shared by the library's summaries and the commands."""

from __future__ import annotations

__all__ = ["print_table"]


def print_table(rows: list[dict], columns: dict[str, str], *, left: tuple[str, ...] = ()) -> None:
    """Print ``rows`` as a plain-text table with pandas; ``columns`` maps key -> header; the
    ``left`` keys are left-aligned (long text such as plans reads badly right-aligned)."""
    import pandas as pd

    frame = pd.DataFrame(rows, columns=list(columns)).rename(columns=columns)
    formatters = {}
    for key in columns if left else ():
        # Headers are left-justified then: every value is padded to its column's full width, so
        # that a right-aligned number still sits under its header.
        width = max([len(str(v)) for v in frame[columns[key]]] + [len(columns[key])])
        pad = str.ljust if key in left else str.rjust
        formatters[columns[key]] = lambda value, width=width, pad=pad: pad(str(value), width)
    text = frame.to_string(index=False, formatters=formatters or None, justify="left" if left else None)
    print("\n".join(line.rstrip() for line in text.splitlines()))  # no padding after the last column
