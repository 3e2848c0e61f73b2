"""Answers to exact repeats: the same model input sent again (a retry, a cache in front of the
service) gets the answer it got the first time, without running the model again.

Keyed by the model file's sha256 and the input's keyed digest (the query-history detector's,
app/fingerprint.py), so the cache holds verdicts, never an image; bounded,
least recently used out first. Only a request whose every input is a repeat is answered from it.
"""

from __future__ import annotations

from collections import OrderedDict

from app.query_history import Judgement
from app.verdict import Verdicts


class ResultCache:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._rows: OrderedDict[tuple[str, bytes], Verdicts] = OrderedDict()

    def get(self, model_sha256: str, judged: Judgement) -> Verdicts | None:
        """The verdicts of these inputs if every one is a cached repeat, else None."""
        if not self.capacity or judged.digests is None or not judged.repeat.all():
            return None
        rows = [self._rows.get((model_sha256, d)) for d in judged.digests]
        if any(r is None for r in rows):
            return None
        for d in judged.digests:
            self._rows.move_to_end((model_sha256, d))
        return Verdicts.concat(rows)  # type: ignore[arg-type]

    def put(self, model_sha256: str, judged: Judgement, v: Verdicts) -> None:
        if not self.capacity or judged.digests is None:
            return
        for i, d in enumerate(judged.digests):
            self._rows[(model_sha256, d)] = v[i: i + 1]
            self._rows.move_to_end((model_sha256, d))
        while len(self._rows) > self.capacity:
            self._rows.popitem(last=False)

    def __len__(self) -> int:
        return len(self._rows)
