"""The lexical explainer and simulator: explanations and predictions from tokens, with no language model.

The explainer reads a feature's train statistics (which tokens it fires on, how reliably, where) and writes a
sentence naming them, e.g. `fires on " Paris", " France" (71% of its activation); mostly after " of"; promotes
" French"`. It is instant and deterministic, and it is the baseline every LLM explainer must beat.

The simulator reads *any* explanation, lexical or written by an LLM, and predicts which tokens it says the feature
fires on: the quoted strings it names (`"..."`, `'...'`, `<<...>>`, backticks), or, when it quotes nothing, its
content words; `position N`; and the classes digits / numbers and punctuation. The part after `promotes` is what
the feature writes (read by the causal scorer), not what it reads, so the simulator ignores it. Tokens match a
name case-insensitively with surrounding spaces ignored (and a plural s).
"""

from __future__ import annotations

import json
import re
import string
from dataclasses import dataclass, field

from modelrecon.explain.examples import FeatureExamples

_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"|<<(.+?)>>|`([^`]+)`|(?<![A-Za-z])\'([^\'\n]{1,40})\'(?![A-Za-z])')
_AFTER = re.compile(r'\b(?:mostly |often |usually )?after\s+("(?:[^"\\]|\\.)*"|\S+)')
_POSITION = re.compile(r"\bposition (\d+)")
_WORD = re.compile(r"[A-Za-z][A-Za-z'-]{2,}")
_STOPWORDS = set(
    """the and for with that this from into onto are was were has have had not but its it's their
there than then they them these those which what when where who whom how why all any each few more most other some
such only own same can will just should now about above after again against also before being below between both
during further here off once over under until very fires fire firing feature features token tokens text texts word
words mentions mention related relating refers references like such including include includes often usually mostly
activates activate activation strongly especially typically context contexts phrase phrases""".split()
)


def quote(text: str) -> str:
    """A token as the explanations write it: a JSON string, so spaces, quotes and newlines survive."""
    return json.dumps(text, ensure_ascii=False)


def _norm(text: str) -> str:
    return text.strip().lower()


def lexical_explanation(ex: FeatureExamples, promotes: list[str] | None = None, max_tokens: int = 6) -> str:
    """A sentence naming the tokens (or the position) the feature fires on in its train prompts, the token it most
    often follows, and, when given, the tokens its decoder promotes."""
    fires_total = sum(s[0] for s in ex.token_stats.values())
    mass_total = sum(s[2] for s in ex.token_stats.values())
    if fires_total == 0 or mass_total <= 0:
        return "never fires in the train prompts"
    occurrences = sum(s[1] for s in ex.token_stats.values())
    parts = []
    position = _position_rule(ex, fires_total)
    if position is not None:
        parts.append(f"fires at position {position}" + (" (the first token of a text)" if position == 0 else ""))
    else:
        names, share = _driving_tokens(ex, mass_total, max_tokens)
        rate = fires_total / max(occurrences, 1)
        if rate > 0.3 and share < 0.5:
            listed = ", ".join(quote(t) for t in names[:3])
            parts.append(f"fires on most tokens ({rate:.0%} of them), most strongly on {listed}")
        else:
            digits = all(_norm(t).isdigit() for t in names) and len(names) > 1
            punct = all(_norm(t) and all(c in string.punctuation for c in _norm(t)) for t in names) and len(names) > 1
            kind = "digits: " if digits else "punctuation: " if punct else ""
            parts.append(f"fires on {kind}{', '.join(quote(t) for t in names)} ({share:.0%} of its activation)")
        after = _common_previous(ex, mass_total)
        if after is not None:
            parts.append(f"mostly after {quote(after)}")
    if promotes:
        parts.append("promotes " + ", ".join(quote(t) for t in promotes[:3]))
    return "; ".join(parts)


def _position_rule(ex: FeatureExamples, fires_total: float) -> int | None:
    """A position holding most of the firing, where the feature fires on most texts: a positional feature."""
    if not ex.position_stats:
        return None
    position, (fires, seen) = max(ex.position_stats.items(), key=lambda kv: kv[1][0])
    if fires >= 0.6 * fires_total and fires >= 0.5 * seen and seen >= 2:
        return position
    return None


def _driving_tokens(ex: FeatureExamples, mass_total: float, max_tokens: int) -> tuple[list[str], float]:
    """Tokens in order of their share of the activation weighted by how reliably they fire, until 80% of it."""
    ranked = sorted(ex.token_stats.items(), key=lambda kv: -(kv[1][2] * (kv[1][0] / kv[1][1])))
    names, covered = [], 0.0
    for text, (fires, seen, mass) in ranked:
        if fires == 0 or len(names) >= max_tokens:
            break
        if fires / seen < 0.2 and names:
            continue  # a frequent token the feature only sometimes fires on says little
        names.append(text)
        covered += mass
        if covered >= 0.8 * mass_total:
            break
    return names, covered / mass_total


def _common_previous(ex: FeatureExamples, mass_total: float) -> str | None:
    if not ex.previous_stats:
        return None
    text, mass = max(ex.previous_stats.items(), key=lambda kv: kv[1])
    return text if mass >= 0.5 * mass_total else None


@dataclass
class Reading:
    """What an explanation says the feature fires on, as the simulator reads it."""

    names: set[str] = field(default_factory=set)
    positions: set[int] = field(default_factory=set)
    digits: bool = False
    punctuation: bool = False
    writes: list[str] = field(default_factory=list)  # the tokens after "promotes": what it writes

    def matches(self, token: str, position: int) -> bool:
        n = _norm(token)
        if position in self.positions:
            return True
        if self.digits and n.isdigit():
            return True
        if self.punctuation and n and all(c in string.punctuation for c in n):
            return True
        return n in self.names or (len(n) > 3 and (n + "s" in self.names or n.rstrip("s") in self.names))

    def predict(self, tokens: list[str], first_position: int = 0) -> list[float]:
        return [1.0 if self.matches(t, first_position + i) else 0.0 for i, t in enumerate(tokens)]


def read_explanation(text: str) -> Reading:
    """Parse an explanation into what it names (module docstring)."""
    reads, writes = (re.split(r"\bpromotes\b", text, maxsplit=1) + [""])[:2]
    reads = _AFTER.sub("", reads)  # the context it follows is not what it fires on
    reading = Reading(writes=_quoted(writes), positions={int(p) for p in _POSITION.findall(reads)})
    quoted = _quoted(reads)
    if quoted:
        reading.names = {_norm(q) for q in quoted}
    elif not reading.positions:
        reading.names = {w.lower() for w in _WORD.findall(reads) if w.lower() not in _STOPWORDS}
    lowered = reads.lower()
    reading.digits = any(w in lowered for w in ("digit", "number", "numeral"))
    reading.punctuation = "punctuation" in lowered
    return reading


def _quoted(text: str) -> list[str]:
    found = []
    for match in _QUOTED.finditer(text):
        double, marked, ticked, single = match.groups()
        if double is not None:
            try:
                found.append(json.loads(f'"{double}"'))
            except json.JSONDecodeError:
                found.append(double)
        else:
            found.append(marked or ticked or single)
    return found
