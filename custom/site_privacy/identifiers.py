"""Identifier values from the site's manifests, matched in anything about to leave the site however they
are written: case, punctuation and whitespace ignored (``MRN-A1234567`` = ``mrn a1234567``), an ID by its
number without its prefix or leading zeros (``1234567``, ``001234567``, also as a number), a name in any word
order (``Doe^John`` = ``john doe`` = ``JohnDoe``), a date in any usual format (``19800307``, ``1980-03-07``,
``07/03/1980``, ``3/7/1980``, ``07.03.1980``, also as the number 19800307) and any of these as an array of
character codes (``[109, 114, 110, ...]``, ints or integral floats). A finding names the field and where it
was found, never the value.

Not matched (too many harmless numbers would match): ID numbers shorter than ``MIN_ID_DIGITS`` digits once
their leading zeros are gone (in text) or shorter than ``MIN_NUMBER_DIGITS`` (as numbers), and dates with
two-digit years.
"""

import itertools
import re
from datetime import date

import numpy as np

MIN_ID_DIGITS = 4  # an ID number shorter than this (after its leading zeros) is only matched with its zeros
MIN_NUMBER_DIGITS = 6  # an ID as a bare number (not text): shorter ones collide with step counts and sizes
MIN_NORMALISED = 4  # a value shorter than this once normalised (e.g. "1") would match harmless text
MAX_CODE_ARRAY = 1 << 16  # longer integer arrays are not decoded as text
NAME_SEPARATORS = re.compile(r"[\^\s,]+")  # DICOM PN Last^First^Middle, "First Last", "Last, First"
DATE_TRIPLE = re.compile(r"(?<!\d)(\d{1,4})[^\w]{1,2}(\d{1,2})[^\w]{1,2}(\d{1,4})(?!\d)")
DIGIT_RUN = re.compile(r"\d+")


def normalise(text: str) -> str:
    """Lower-case letters and digits only."""
    return "".join(ch for ch in text.lower() if ch.isalnum())


def _valid_date(y: int, m: int, d: int) -> date | None:
    try:
        return date(y, m, d) if 1800 <= y <= 2200 else None
    except ValueError:
        return None


def parse_date(text: str) -> date | None:
    """A date written as yyyymmdd or with separators in y-m-d, d-m-y or m-d-y order (None if it is not one)."""
    text = text.strip()
    if re.fullmatch(r"\d{8}", text):
        return _valid_date(int(text[:4]), int(text[4:6]), int(text[6:]))
    match = re.fullmatch(r"(\d{4})[-/.](\d{1,2})[-/.](\d{1,2})", text)
    return _valid_date(*map(int, match.groups())) if match else None


def _dates_in_digits(run: str) -> set[date]:
    """The dates an 8-digit run can be: yyyymmdd, ddmmyyyy, mmddyyyy."""
    if len(run) != 8:
        return set()
    a, b, c = int(run[:4]), int(run[4:6]), int(run[6:])
    d, m, y = int(run[:2]), int(run[2:4]), int(run[4:])
    return {x for x in (_valid_date(a, b, c), _valid_date(y, m, d), _valid_date(y, d, m)) if x}


def _dates_in_triple(p: str, q: str, r: str) -> set[date]:
    p_, q_, r_ = int(p), int(q), int(r)
    if len(p) == 4:
        candidates = [(p_, q_, r_)]
    elif len(r) == 4:
        candidates = [(r_, q_, p_), (r_, p_, q_)]  # d-m-y, m-d-y
    else:
        return set()
    return {x for x in (_valid_date(*c) for c in candidates) if x}


class IdentifierIndex:
    """The site's identifier values (``{value: origin}``, origin e.g. ``PatientID (train.csv)``), ready to match."""

    def __init__(self, values: dict[str, str]):
        self.normalised: dict[str, str] = {}  # normalised value (and name word orders) -> origin
        self.id_numbers: dict[str, str] = {}  # digits of an ID without leading zeros -> origin
        self.padded_numbers: dict[str, str] = {}  # short ID numbers, as written (with their zeros)
        self.dates: dict[date, str] = {}
        self.names: dict[str, dict[frozenset, str]] = {}  # a word of a name -> {the name's words: origin}
        for value, origin in values.items():
            self._add(value, origin)
        self.lengths = sorted({len(n) for n in self.normalised})

    def _add(self, value: str, origin: str) -> None:
        when = parse_date(value)
        if when:
            self.dates.setdefault(when, origin)
        norm = normalise(value)
        if len(norm) >= MIN_NORMALISED:
            self.normalised.setdefault(norm, origin)
        words = [normalise(w) for w in NAME_SEPARATORS.split(value) if normalise(w)]
        if len(words) >= 2 and all(w.isalpha() for w in words) and len(words) <= 4:
            self.names.setdefault(words[0], {}).setdefault(frozenset(words), origin)
            for order in itertools.permutations(words):
                joined = "".join(order)
                if len(joined) >= MIN_NORMALISED:
                    self.normalised.setdefault(joined, origin)
        if when is None:
            runs = DIGIT_RUN.findall(value)
            if runs:
                number = runs[-1]  # the number of MRN-A1234567, patient00042
                stripped = number.lstrip("0")
                if len(stripped) >= MIN_ID_DIGITS:
                    self.id_numbers.setdefault(stripped, origin)
                elif len(number) >= MIN_ID_DIGITS:
                    self.padded_numbers.setdefault(number, origin)

    def match_text(self, text: str) -> str | None:
        """Origin of an identifier written anywhere in ``text``; None if none."""
        norm = normalise(text)
        for length in self.lengths:
            if length > len(norm):
                break
            for start in range(len(norm) - length + 1):
                origin = self.normalised.get(norm[start : start + length])
                if origin:
                    return origin
        for run in DIGIT_RUN.findall(text):
            origin = self._match_digits(run)
            if origin:
                return origin
        for triple in DATE_TRIPLE.findall(text):
            for when in _dates_in_triple(*triple):
                if when in self.dates:
                    return self.dates[when]
        if self.names:
            words = {normalise(w) for w in re.split(r"[^A-Za-z]+|(?<=[a-z])(?=[A-Z])", text) if w}
            for word in words:
                for name, origin in self.names.get(word, {}).items():
                    if name <= words:
                        return origin
        return None

    def _match_digits(self, run: str) -> str | None:
        origin = self.padded_numbers.get(run) or self.id_numbers.get(run.lstrip("0"))
        if origin:
            return origin
        for when in _dates_in_digits(run):
            if when in self.dates:
                return self.dates[when]
        return None

    def match_number(self, value) -> str | None:
        """Origin of an ID number or a date written as the number ``value`` (an int or integral float)."""
        try:
            number = float(value)
        except (TypeError, ValueError, OverflowError):
            return None
        if not np.isfinite(number) or number != int(number) or abs(number) >= 1e15:
            return None
        digits = str(abs(int(number)))
        if len(digits) == 8 and any(when in self.dates for when in _dates_in_digits(digits)):
            return next(self.dates[when] for when in _dates_in_digits(digits) if when in self.dates)
        return self.id_numbers.get(digits) if len(digits) >= MIN_NUMBER_DIGITS else None

    def match_codes(self, values) -> str | None:
        """Origin of an identifier spelt as character codes (a sequence of ints or integral floats)."""
        array = np.asarray(values)
        if array.dtype.kind not in "iuf" or not 3 <= array.size <= MAX_CODE_ARRAY:
            return None
        flat = array.ravel()
        if array.dtype.kind == "f" and not np.all(np.isfinite(flat)):
            return None
        if flat.min() < 9 or flat.max() > 0x2FFFF or (array.dtype.kind == "f" and np.any(flat != np.round(flat))):
            return None
        return self.match_text("".join(chr(int(code)) for code in flat))
