"""Multi-label rows: each image's set of category ids, stored compactly.

Row i's categories are `members[offsets[i]:offsets[i + 1]]` (sorted, no repeats): two flat integer arrays,
8 bytes per row plus 4 per label, whatever the number of classes (a multi-hot matrix would be rows x classes).
Torch-free: the data layer and `evaluate` use it without importing torch.
"""

from __future__ import annotations

import json
from array import array
from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass
class LabelSets:
    offsets: array = field(default_factory=lambda: array("q", [0]))  # rows + 1 entries
    members: array = field(default_factory=lambda: array("l"))  # category ids, row after row

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, row: int) -> array:
        return self.members[self.offsets[row]:self.offsets[row + 1]]

    def append(self, ids: Iterable[int]) -> None:
        self.members.extend(sorted(set(ids)))
        self.offsets.append(len(self.members))

    @classmethod
    def of_single_labels(cls, labels: Iterable[int]) -> LabelSets:
        """One-element sets from single-label ids (-1, an unlabeled row, becomes the empty set)."""
        sets = cls()
        for label in labels:
            sets.append((label,) if label >= 0 else ())
        return sets

    def subset(self, rows: Iterable[int]) -> LabelSets:
        sets = LabelSets()
        for row in rows:
            sets.append(self[row])
        return sets

    def renumbered(self, new_id) -> LabelSets:
        """The same sets with every id `i` replaced by `new_id[i]` (rows re-sorted)."""
        sets = LabelSets()
        for row in range(len(self)):
            sets.append(new_id[i] for i in self[row])
        return sets

    def counts(self, num_categories: int) -> list[int]:
        """Images per category id."""
        counts = [0] * num_categories
        for category in self.members:
            counts[category] += 1
        return counts

    def names(self, row: int, categories: list[str]) -> list[str]:
        return [categories[i] for i in self[row]]


def as_label_list(value) -> list | None:
    """The list a label cell holds, or None for a single label: a list (JSON Lines, Parquet) or JSON list text
    (`["can", "milk_bottle"]` in a CSV cell). Text that starts with `[` but is not a JSON list is a plain name."""
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, str) and value.startswith("[") and value.endswith("]"):
        try:
            parsed = json.loads(value)
        except ValueError:
            return None
        return parsed if isinstance(parsed, list) else None
    return None


def label_set_text(names: list[str]) -> str:
    """A label set as one table cell: JSON list text (what `score` writes and `evaluate` reads back)."""
    return json.dumps(list(names), ensure_ascii=False)
