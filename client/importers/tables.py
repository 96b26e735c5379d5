"""The CSV files an import reads (--records, cine.csv, the M&Ms information CSV), read alike.

data.read_table reads them (a byte-order mark ignored, a column named twice refused, a
`;`- or tab-separated file named as such). Every row must then have as many fields as the
header: csv.DictReader would otherwise put the extra fields of a row under the key None
and leave missing ones None, so values land in the wrong columns. A ragged row refuses
the file in one line naming it, the row (counted from the first row after the header, as
site-check counts), the missing columns, or the column split at an unquoted decimal comma
("72,5" read as 72 and 5) where only one column can be. Decimal commas are refused, not
read: "1,250" may be 1250 or 1.25, so a value is written with a decimal point (the
message about a quoted "72,5" says so).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from pathlib import Path

from fedsynth.common.data import read_table
from fedsynth.common.errors import FedsynthError

_WHOLE = re.compile(r"\s*[+-]?\d+\s*")
_DIGITS = re.compile(r"\d+\s*")


def read_csv(path: Path, required: Sequence[str], hint: str = "") -> tuple[list[str], list[dict]]:
    """Header and rows (column -> text) of a CSV file with the `required` columns (`hint`
    added to data.read_table's message when one is missing), every row as long as the
    header. Raises FedsynthError naming the file and what is wrong where."""
    header, rows = read_table(path, required, hint)
    for number, row in enumerate(rows, start=1):
        extra = row.get(None)
        missing = [name for name in header if row.get(name) is None]
        if extra:
            fields = [row[name] for name in header] + list(extra)
            raise FedsynthError(f"{path}: row {number} {_more_fields(header, fields)}")
        if missing:
            raise FedsynthError(
                f"{path}: row {number} has {len(header) - len(missing)} fields, the header "
                f"{len(header)}: no {', '.join(missing)} (an empty cell still needs its comma)"
            )
    return header, rows


def _more_fields(header: Sequence[str], fields: Sequence[str]) -> str:
    """Why a row has more fields than the header: the column whose value was split at a
    decimal comma where only one pair of neighbouring fields can be (a whole number, then
    digits), else an unquoted comma somewhere in the row."""
    said = f"has {len(fields)} fields, more than the header's {len(header)}"
    split = [
        (header[column], f"{whole.strip()},{decimals.strip()}")
        for column, (whole, decimals) in enumerate(itertools.pairwise(fields))
        if column < len(header) and _WHOLE.fullmatch(whole) and _DIGITS.fullmatch(decimals)
    ]
    if len(split) == 1:
        ((column, number),) = split
        return (
            f"{said}: a decimal comma in column {column} ({number})? write "
            f"{number.replace(',', '.')}, with a decimal point"
        )
    return (
        f"{said}: an unquoted comma inside a value (a decimal comma as in 72,5, a comma in a "
        "path)? write decimals with a point and put values holding commas in double quotes"
    )
