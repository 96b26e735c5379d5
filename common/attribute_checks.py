"""What a manifest row's attributes may say: coded values and physiological consistency.

A coded attribute (its config `unit` lists the codes, e.g. "0=female,1=male" or "0=ED,1=ES")
takes exactly one of its codes, and a refusal names the coding and what the cell held. The
cardiac volumes and ejection fractions of one row must describe a possible heart: an
end-systolic volume above the end-diastolic one, or an ejection fraction that the row's own
volumes contradict, is a transcription error (swapped columns, EF of another visit) that
would teach the model a heart that cannot exist. Each check looks at one row alone.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

from fedsynth.common.config import Attribute

# one code of a coded unit: "<integer>=<meaning>"
_CODE = re.compile(r"\s*(-?\d+)\s*=\s*([^=]*?)\s*")
# an ejection fraction may be this many percentage points off 100 * (EDV - ESV) / EDV: the
# rounding of the three values and contours drawn on another frame stay well within it
EF_TOLERANCE = 5.0
# (EDV, ESV, EF) attribute names of each ventricle
VENTRICLES = (("lvedv", "lvesv", "lvef"), ("rvedv", "rvesv", "rvef"))


def coding(attribute: Attribute) -> dict[float, str] | None:
    """The codes of a coded attribute ({0.0: "female", 1.0: "male"} for "0=female,1=male"),
    or None when its unit is a unit of measure (no "code=meaning" list)."""
    parts = attribute.unit.split(",")
    matches = [_CODE.fullmatch(part) for part in parts]
    if not all(m and m.group(2) for m in matches):
        return None
    return {float(m.group(1)): m.group(2) for m in matches if m}


def alternatives(codes: Mapping[float, str]) -> str:
    """'0 (female) or 1 (male)': the codes as a message lists them."""
    names = [f"{value:g} ({meaning})" for value, meaning in codes.items()]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def parse_coded(text: str | None, attribute: Attribute, codes: Mapping[float, str]) -> float:
    """One manifest cell of a coded attribute -> its code, or ValueError naming the coding
    and what was found ("attribute sex must be 0 (female) or 1 (male); found 'M'")."""
    rule = f"attribute {attribute.name} must be {alternatives(codes)}"
    if text is None or not text.strip():
        raise ValueError(f"{rule}; found nothing (attribute {attribute.name} is missing)")
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if value not in codes or not attribute.min <= value <= attribute.max:
        raise ValueError(f"{rule}; found {text.strip()!r}")
    return value


def describe(value: float, attribute: Attribute) -> str:
    """An attribute value as a message shows it: '1 (male)' for a code, '54 years' else."""
    codes = coding(attribute)
    if codes is not None and value in codes:
        return f"{value:g} ({codes[value]})"
    return f"{value:g} {attribute.unit}"


def check_physiology(values: Mapping[str, float], attributes: Sequence[Attribute]) -> None:
    """Refuse (ValueError, naming the values) a row whose ventricular volumes contradict
    each other: ESV above EDV, or an EF more than EF_TOLERANCE points off the EF its own
    volumes give, 100 * (EDV - ESV) / EDV. Only attributes the config has are checked."""
    by_name = {a.name: a for a in attributes}
    for edv, esv, ef in VENTRICLES:
        if edv not in by_name or esv not in by_name:
            continue
        shown = {name: describe(values[name], by_name[name]) for name in (edv, esv)}
        if values[esv] > values[edv]:
            raise ValueError(
                f"{esv} {shown[esv]} is above {edv} {shown[edv]}: a ventricle holds less blood "
                "at end-systole than at end-diastole (columns swapped?)"
            )
        if ef not in by_name or values[edv] <= 0:
            continue
        implied = 100 * (values[edv] - values[esv]) / values[edv]
        if abs(values[ef] - implied) > EF_TOLERANCE:
            raise ValueError(
                f"{ef} {describe(values[ef], by_name[ef])} is more than {EF_TOLERANCE:g} points "
                f"off the {implied:.1f} that {edv} {shown[edv]} and {esv} {shown[esv]} give "
                "(100 x (EDV - ESV) / EDV)"
            )
