"""A light-weight language detector: stop-word frequency for Latin-script languages, the writing
system for the others. No model, no download; good enough to grade "answer in French".

    detect_language("Je pense que c'est une bonne idée.")  -> "french"

How: the words of the text are looked up in a short list of the most frequent function words of
each language; a word listed by k languages gives 1/k to each. The language with the highest
total wins if it has at least `min_hits` (default 2) votes and 1.5 times the runner-up's; texts in
a non-Latin script (more than half of their letters) are classified by the script. Left out,
said plainly: one- or two-word answers ("Bonjour !") are undecided (None), and closely related
languages with few distinct function words (e.g. Catalan) are not covered.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from typing import Optional

STOPWORDS: dict[str, frozenset[str]] = {
    "english": frozenset(
        "the of and to in is that it was for on are with as his they be at one have this from or had by "
        "but not what all were we when your can said there use an each which she do how their if will "
        "up other about out many then them these so some her would make like him into has more two "
        "could been who its now my than did no you i me our because should does very just also".split()
    ),
    "french": frozenset(
        "le la les de des du un une et est en que qui dans pour pas sur au aux avec ce ces cette il ils "
        "elle elles nous vous je tu on mais ou où donc ne se sa son ses leur leurs plus par être avoir "
        "fait été sont était très aussi comme tout tous toutes bien peut c'est j'ai d'un d'une l'on "
        "qu'il n'est moi toi lui y".split()
    ),
    "spanish": frozenset(
        "a el la los las de del un una unos unas y es en que por para con no se su sus al lo como más "
        "pero sus le ya o este esta estos estas son está están fue ha muy también yo tú él ella "
        "nosotros ellos ser hay todo todos sobre entre cuando donde porque sin".split()
    ),
    "german": frozenset(
        "der die das und ist nicht ein eine einen dem den des zu in mit sich auf für von im es auch "
        "als an wird werden sie wir ich du er aber oder wie bei nach aus noch nur so sind war hat "
        "haben kann dass wenn sehr schon mehr über um einer eines".split()
    ),
    "italian": frozenset(
        "a il lo la i gli le di del della dei delle un una uno e è che per non con si sono come più ma "
        "anche questo questa io tu lui lei noi voi loro nel nella al alla da ha hanno essere molto "
        "quando perché se cosa ci mi ti suo sua".split()
    ),
    "portuguese": frozenset(
        "o a os as de do da dos das um uma e é que em no na nos nas por para com não se seu sua mais "
        "como mas foi ao ele ela eles elas você muito também são está isso este esta eu nós quando "
        "porque já ou pelo pela".split()
    ),
    "dutch": frozenset(
        "de het een en van is dat die in te niet op voor met zijn er aan ook als bij maar om dan wat "
        "nog wel naar kan zo hij zij wij ik je u was heeft hebben worden wordt deze dit door over "
        "geen meer".split()
    ),
}

# Non-Latin languages by script: a name in unicodedata.name() that marks the script's letters.
SCRIPTS: dict[str, tuple[str, ...]] = {
    "russian": ("CYRILLIC",),
    "greek": ("GREEK",),
    "arabic": ("ARABIC",),
    "hebrew": ("HEBREW",),
    "hindi": ("DEVANAGARI",),
    "korean": ("HANGUL",),
    "japanese": ("HIRAGANA", "KATAKANA"),
    "chinese": ("CJK UNIFIED IDEOGRAPH",),
    "thai": ("THAI",),
}

ALIASES = {"en": "english", "fr": "french", "es": "spanish", "de": "german", "it": "italian", "pt": "portuguese",
           "nl": "dutch", "ru": "russian", "el": "greek", "ar": "arabic", "he": "hebrew", "hi": "hindi",
           "ko": "korean", "ja": "japanese", "zh": "chinese", "th": "thai"}

LANGUAGES = tuple(STOPWORDS) + tuple(SCRIPTS)

_WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)?", re.UNICODE)


def canonical_language(name: str) -> str:
    """"French", "fr" -> "french"; a ValueError lists the known languages otherwise."""
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key not in LANGUAGES:
        raise ValueError(f"unknown language {name!r}; known: {', '.join(LANGUAGES)} (or their ISO codes)")
    return key


def _script_counts(text: str) -> tuple[Counter, int]:
    counts: Counter = Counter()
    letters = 0
    for ch in text:
        if not ch.isalpha():
            continue
        letters += 1
        name = unicodedata.name(ch, "")
        for lang, marks in SCRIPTS.items():
            if any(name.startswith(m) for m in marks):
                counts[lang] += 1
                break
    return counts, letters


def language_scores(text: str) -> dict[str, float]:
    """Stop-word votes per Latin-script language (a word shared by k languages gives 1/k to each)."""
    scores = {lang: 0.0 for lang in STOPWORDS}
    for word in _WORD.findall(text.lower().replace("’", "'")):
        owners = [lang for lang, words in STOPWORDS.items() if word in words]
        for lang in owners:
            scores[lang] += 1.0 / len(owners)
    return scores


def detect_language(text: str, *, min_hits: float = 2.0) -> Optional[str]:
    """The language of `text`, or None when undecided (too short, or no clear winner)."""
    scripts, letters = _script_counts(text)
    if letters and scripts:
        # Japanese mixes kanji (CJK ideographs) with kana: any kana makes it Japanese.
        if scripts.get("japanese", 0) and scripts["japanese"] + scripts.get("chinese", 0) > letters / 2:
            return "japanese"
        lang, count = scripts.most_common(1)[0]
        if count > letters / 2:
            return lang
    scores = language_scores(text)
    ranked = sorted(scores, key=scores.get, reverse=True)
    best, second = scores[ranked[0]], scores[ranked[1]]
    if best < min_hits or best < 1.5 * second:
        return None
    return ranked[0]
