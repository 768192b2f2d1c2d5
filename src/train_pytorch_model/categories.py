"""The rules every class name and class list obeys, whatever it came from: an ImageDirectory's `_schema.json`,
`images.lst` labels, class folders, a table or MLTable column, or a trained model's `training_info.json`.

Class names end up in JSON, CSV, MLflow and column names (`Scored Probabilities_<class>`): each is a non-empty
string of at most MAX_CATEGORY_CHARS characters that UTF-8 can encode. A list holds at most MAX_CLASSES names
(a classification head of that size is ~1 GB of weights with a 2,560-wide backbone), no name twice, and no
two names that differ only in their Unicode normalisation (`café` typed as one code point or as `e` plus an
accent look the same everywhere but would be two classes): refused naming both, never silently renamed.
"""

from __future__ import annotations

import unicodedata
from collections import Counter

from .errors import quote

MAX_CLASSES = 100_000
MAX_CATEGORY_CHARS = 1024


def category_name_problem(name) -> str | None:
    """Why `name` cannot be a class name, or None when it can."""
    if not isinstance(name, str) or isinstance(name, bool):
        return f"{quote(name)} is not a class name (a string)"
    if not name:
        return "an empty class name"
    if len(name) > MAX_CATEGORY_CHARS:
        return f"class name {quote(name)} is longer than {MAX_CATEGORY_CHARS} characters"
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return f"class name {quote(name)} is not valid UTF-8 text"
    return None


def category_list_problem(names: list) -> str | None:
    """Why `names` cannot be a model's class list (count, each name, duplicates, look-alikes), or None. Linear
    in the number of names: 100k names take a fraction of a second."""
    if len(names) > MAX_CLASSES:
        return f"{len(names)} classes, more than the {MAX_CLASSES} allowed"
    for name in names:
        problem = category_name_problem(name)
        if problem:
            return problem
    duplicates = sorted(name for name, count in Counter(names).items() if count > 1)
    if duplicates:
        return f"class names must be unique; {quote(duplicates)} appear more than once"
    if not all(name.isascii() for name in names):
        forms: dict[str, list[str]] = {}
        for name in names:
            forms.setdefault(unicodedata.normalize("NFC", name), []).append(name)
        alike = next((group for group in forms.values() if len(group) > 1), None)
        if alike:
            return (f"class names {' and '.join(ascii(n) for n in alike[:3])} differ only in their Unicode "
                    "normalisation (they look the same); rename them to one spelling")
    return None
