"""The mutants of ``scripts/mutation.py``: one plausible bug each, as an exact text substitution.

Each entry names the module by file name (``loop.py``; unique in the package, so the table
survives moves between sub-packages), the exact original snippet (it must occur once),
the mutated snippet, the test files that should catch it, and, for an equivalent mutant, why it
cannot change behaviour. Keep the snippets short and unique; when the code moves, update them
(the script reports a mutant whose snippet is gone as *stale*).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Mutant", "MUTANTS"]


@dataclass(frozen=True)
class Mutant:
    id: str
    file: str
    what: str
    original: str
    mutated: str
    tests: tuple[str, ...]
    equivalent: str = ""


MUTANTS: list[Mutant] = []
