"""Text normalisation for WER/CER, applied identically to references and hypotheses.

:class:`EnglishTextNormalizer` follows the spirit of Whisper's English normalizer (lowercase,
bracketed/parenthesised spans removed, contractions and titles expanded, punctuation removed,
numbers canonicalised) with one deliberate difference: numbers are spelled out as words
(``"press 1"`` → ``"press one"``, ``"21st"`` → ``"twenty first"``, ``"1995"`` → ``"nineteen
ninety five"``) instead of words being turned into digits. Both sides go through the same
function, so either direction is consistent; spelling out is simpler to get right and keeps
the text readable. British→American spelling is not mapped.

:class:`BasicTextNormalizer` is for other languages (es, fr): lowercase, bracketed spans
removed, accents stripped, punctuation removed, whitespace collapsed.

``normalizer_for(language)`` picks one; :func:`wer_cer` scores lists of pairs with jiwer.
"""

from __future__ import annotations

import math
import re
import unicodedata
from typing import Callable, Iterable, Sequence

__all__ = [
    "BasicTextNormalizer",
    "EnglishTextNormalizer",
    "number_to_words",
    "normalizer_for",
    "wer_cer",
]

_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
         "sixteen seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_SCALES = ((10**12, "trillion"), (10**9, "billion"), (10**6, "million"), (1000, "thousand"), (100, "hundred"))
_ORDINAL_WORDS = {
    "one": "first", "two": "second", "three": "third", "five": "fifth", "eight": "eighth", "nine": "ninth",
    "twelve": "twelfth",
}


def number_to_words(n: int) -> str:
    """Cardinal English words for a non-negative integer, without "and": 121 → "one hundred twenty one"."""
    if n < 0:
        return "minus " + number_to_words(-n)
    if n < 20:
        return _ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return _TENS[tens] + ("" if ones == 0 else " " + _ONES[ones])
    for value, name in _SCALES:
        if n >= value:
            head, rest = divmod(n, value)
            words = f"{number_to_words(head)} {name}"
            return words if rest == 0 else f"{words} {number_to_words(rest)}"
    raise AssertionError("unreachable")


def _ordinal_words(n: int) -> str:
    words = number_to_words(n).split()
    last = words[-1]
    if last in _ORDINAL_WORDS:
        words[-1] = _ORDINAL_WORDS[last]
    elif last.endswith("y"):
        words[-1] = last[:-1] + "ieth"
    else:
        words[-1] = last + "th"
    return " ".join(words)


def _year_words(n: int) -> str:
    """Years are read in pairs: 1995 → "nineteen ninety five", 1900 → "nineteen hundred"."""
    high, low = divmod(n, 100)
    if low == 0:
        return f"{number_to_words(high)} hundred"
    if low < 10:
        return f"{number_to_words(high)} oh {number_to_words(low)}"
    return f"{number_to_words(high)} {number_to_words(low)}"


def _digits_words(digits: str) -> str:
    return " ".join(_ONES[int(d)] for d in digits)


def _spell_number(token: str, year_like: bool = True) -> str:
    """Spell a digit string (commas allowed as thousands separators, one decimal point)."""
    token = token.replace(",", "")
    if "." in token:
        whole, _, frac = token.partition(".")
        head = number_to_words(int(whole)) if whole else "zero"
        return f"{head} point {_digits_words(frac)}" if frac else head
    if len(token) > 1 and token.startswith("0"):
        return _digits_words(token)  # codes, PINs: "007" → "zero zero seven"
    value = int(token)
    if year_like and len(token) == 4 and (1100 <= value <= 1999 or 2010 <= value <= 2099):
        return _year_words(value)
    if len(token) > 15:
        return _digits_words(token)
    return number_to_words(value)


_CONTRACTIONS = [
    (r"\bwon't\b", "will not"), (r"\bcan't\b", "can not"), (r"\bcannot\b", "can not"), (r"\blet's\b", "let us"),
    (r"\bain't\b", "aint"), (r"\by'all\b", "you all"), (r"\bwanna\b", "want to"), (r"\bgotta\b", "got to"),
    (r"\bgonna\b", "going to"), (r"\bma'am\b", "madam"),
    (r"'d been\b", " had been"), (r"'s been\b", " has been"), (r"'d gone\b", " had gone"),
    (r"'s gone\b", " has gone"), (r"'d done\b", " had done"), (r"'s got\b", " has got"),
    (r"n't\b", " not"), (r"'re\b", " are"), (r"'s\b", " is"), (r"'d\b", " would"), (r"'ll\b", " will"),
    (r"'t\b", " not"), (r"'ve\b", " have"), (r"'m\b", " am"),
]
_TITLES = [
    (r"\bmr\b\.?", "mister"), (r"\bmrs\b\.?", "missus"), (r"\bms\b\.?", "miss"), (r"\bdr\b\.?", "doctor"),
    (r"\bprof\b\.?", "professor"), (r"\bst\b\.?", "saint"), (r"\bjr\b\.?", "junior"), (r"\bsr\b\.?", "senior"),
    (r"\bvs\b\.?", "versus"),
]
_SPELLINGS = {"ok": "okay", "thru": "through", "tho": "though", "alright": "all right", "til": "till"}
_FILLERS = {"hmm", "mm", "mhm", "mmm", "uh", "um", "er", "ah", "eh", "uhm", "erm"}
_SYMBOLS = [("%", " percent "), ("&", " and "), ("@", " at "), ("+", " plus "), ("*", " star "), ("#", " pound ")]
_CURRENCY = {"$": "dollars", "£": "pounds", "€": "euros"}

_BRACKETS = re.compile(r"\[[^\]]*\]|\([^)]*\)|<[^>]*>|\{[^}]*\}")
_NUMBER = re.compile(r"\d+(?:,\d{3})*(?:\.\d+)?")


def _strip_accents(text: str) -> str:
    return "".join(ch for ch in unicodedata.normalize("NFKD", text) if not unicodedata.combining(ch))


def _remove_punctuation(text: str, keep: str = "") -> str:
    """Replace every character that is not a letter, digit, mark or in ``keep`` with a space."""
    return "".join(
        ch if ch in keep or unicodedata.category(ch)[0] in "LNM" else " " for ch in text
    )


class BasicTextNormalizer:
    """Language-neutral: lowercase, bracketed spans removed, accents stripped, punctuation removed."""

    def __call__(self, text: str) -> str:
        text = unicodedata.normalize("NFKC", text).lower()
        text = _BRACKETS.sub(" ", text)
        text = _strip_accents(text)
        text = _remove_punctuation(text)
        return " ".join(text.split())


class EnglishTextNormalizer:
    """Whisper-style English normalizer with numbers spelled out as words (see the module doc)."""

    def __init__(self) -> None:
        self._contractions = [(re.compile(p), r) for p, r in _CONTRACTIONS]
        self._titles = [(re.compile(p), r) for p, r in _TITLES]

    def __call__(self, text: str) -> str:
        text = unicodedata.normalize("NFKC", text).lower()
        text = text.replace("\u2019", "'").replace("\u2018", "'").replace("`", "'")
        text = _BRACKETS.sub(" ", text)
        for pattern, repl in self._titles:
            text = pattern.sub(repl, text)
        for pattern, repl in self._contractions:
            text = pattern.sub(repl, text)
        text = self._numbers(text)
        for symbol, spoken in _SYMBOLS:
            text = text.replace(symbol, spoken)
        text = _strip_accents(text)
        text = _remove_punctuation(text)
        words = [_SPELLINGS.get(w, w) for w in text.split() if w not in _FILLERS]
        return " ".join(" ".join(words).split())

    @staticmethod
    def _numbers(text: str) -> str:
        def currency(m: re.Match) -> str:
            symbol, amount = m.group(1), m.group(2).replace(",", "")
            whole, _, cents = amount.partition(".")
            words = f"{_spell_number(whole, year_like=False)} {_CURRENCY[symbol]}"
            if cents and int(cents):
                words += f" {number_to_words(int(cents[:2].ljust(2, '0')))} cents"
            return f" {words} "

        text = re.sub(r"([$£€])\s?(\d+(?:,\d{3})*(?:\.\d+)?)", currency, text)
        # Times: 10:30 → ten thirty, 9:05 → nine oh five, 9:00 → nine o'clock.
        text = re.sub(
            r"\b(\d{1,2}):(\d{2})\b",
            lambda m: " " + number_to_words(int(m.group(1))) + " "
            + ("o'clock" if m.group(2) == "00" else (
                f"oh {number_to_words(int(m.group(2)))}" if m.group(2)[0] == "0" else number_to_words(int(m.group(2)))
            )) + " ",
            text,
        )
        # Ordinals: 1st, 22nd, 3rd, 4th.
        text = re.sub(r"\b(\d+)(st|nd|rd|th)\b", lambda m: f" {_ordinal_words(int(m.group(1)))} ", text)
        # Decades: 1990s → nineteen nineties.
        text = re.sub(
            r"\b(\d{2})?(\d)0'?s\b",
            lambda m: " " + (number_to_words(int(m.group(1))) + " " if m.group(1) else "")
            + _ordinal_words(int(m.group(2)) * 10)[:-2] + "s ",
            text,
        )
        text = _NUMBER.sub(lambda m: f" {_spell_number(m.group(0))} ", text)
        # "one hundred and twenty" → "one hundred twenty" (the spelled-out form has no "and").
        text = re.sub(r"\b(hundred|thousand|million|billion)\s+and\s+(?=[a-z])", r"\1 ", text)
        return text


_ENGLISH = EnglishTextNormalizer()
_BASIC = BasicTextNormalizer()


def normalizer_for(language: str | None) -> Callable[[str], str]:
    """The English normalizer for ``en`` (and unknown), the basic one for everything else."""
    return _ENGLISH if (language or "en").split("-")[0].lower() == "en" else _BASIC


def wer_cer(pairs: Iterable[tuple[str, str]], language: str | None = "en") -> dict:
    """Corpus-level WER and CER over ``(reference, hypothesis)`` pairs after normalisation.

    Pairs whose normalised reference is empty are skipped. Returns
    ``{"wer", "cer", "words", "substitutions", "deletions", "insertions", "utterances"}``;
    ``wer``/``cer`` are ``None`` when nothing could be scored.
    """
    import jiwer

    norm = normalizer_for(language)
    refs: list[str] = []
    hyps: list[str] = []
    for ref, hyp in pairs:
        r, h = norm(ref), norm(hyp or "")
        if not r:
            continue
        refs.append(r)
        hyps.append(h)
    if not refs:
        return {"wer": None, "cer": None, "words": 0, "substitutions": 0, "deletions": 0, "insertions": 0,
                "utterances": 0}
    # jiwer rejects empty hypothesis strings in some versions; a lone space scores as all deletions.
    words = jiwer.process_words(refs, [h if h else " " for h in hyps])
    chars = jiwer.process_characters(refs, [h if h else " " for h in hyps])
    n_words = sum(len(r.split()) for r in refs)
    return {
        "wer": float(words.wer),
        "cer": float(chars.cer),
        "words": n_words,
        "substitutions": int(words.substitutions),
        "deletions": int(words.deletions),
        "insertions": int(words.insertions),
        "utterances": len(refs),
    }


def finite_or_none(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def _demo(texts: Sequence[str]) -> None:  # pragma: no cover - manual check helper
    for t in texts:
        print(repr(t), "→", repr(_ENGLISH(t)))


if __name__ == "__main__":  # pragma: no cover
    import sys

    _demo(sys.argv[1:] or ["Press 1 to mute, 2 to lock; it's 10:30 on the 21st of May 1995 (approx.) $5.50 [noise]"])
