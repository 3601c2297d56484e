# SPDX-License-Identifier: MIT
"""Redaction of the HIPAA Safe Harbor identifiers from example text, before it leaves a device.

Public API:

- ``redact(text) -> (text, counts)``: ``text`` with every identifier found replaced by a typed
  placeholder, and how many of each kind were replaced (``{"NAME": 2, "DATE": 1}``).
- ``KINDS``: the placeholder kinds, in the order they are applied.

45 CFR 164.514(b)(2) lists 18 kinds. Structured ones are found by pattern: [EMAIL], [URL], [IP]
(v4 and v6), [SSN], [PHONE] (phone and fax), [DATE] (any date finer than a year, and times of
day with one), [MRN], [HEALTHPLAN], [ACCOUNT], [LICENSE] (licence and certificate numbers,
DEA), [VEHICLE] (VINs, plates), [DEVICE] (serial numbers, UDIs), [BIOMETRIC], [PHOTO]
(image files, photo references), [ADDRESS] (street addresses), [ZIP], [AGE>89], [ID] (any
other labelled identifier, or a long code mixing letters and digits). Names ([NAME]) are a
heuristic: a title (Mr, Mrs, Ms, Dr, ...), a relation or "patient" before capitalised words,
or two or more capitalised words that are not common sentence starters or medical terms.

This is a best effort filter, not a guarantee: examples are opt-in (share_examples) and
tests/test_privacy.py measures recall per kind on planted identifiers.

.. versionadded:: 0.1
"""

from __future__ import annotations

import re
from collections import Counter

__all__ = ["KINDS", "redact"]

_MONTH = (r"(?:Jan(?:uary)?|Feb(?:ruary)?|Mar(?:ch)?|Apr(?:il)?|May|June?|July?|Aug(?:ust)?|"
          r"Sep(?:t(?:ember)?)?|Oct(?:ober)?|Nov(?:ember)?|Dec(?:ember)?)\.?")
_NUM_ID = r"[A-Z0-9][A-Z0-9-]{3,}"  # value after a label: 4+ letters/digits/dashes
_LABEL_SEP = r"(?:\s*(?:#|no\.?|number|num|id)?\s*[:#=]?\s*)"


def _label(words: str, value: str = _NUM_ID) -> str:
    return rf"\b(?:{words}){_LABEL_SEP}(?=[A-Z0-9-]*\d){value}\b"


# (kind, pattern) in application order: longer / more specific first.
_PATTERNS: list[tuple[str, re.Pattern[str]]] = [(k, re.compile(p, re.IGNORECASE)) for k, p in [
    ("EMAIL", r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)+\b"),
    ("URL", r"\b(?:https?://|ftp://|www\.)[^\s<>\"]+|\b[a-z0-9-]+(?:\.[a-z0-9-]+)*\."
            r"(?:com|org|net|edu|gov|io|info|biz|us|uk|de)(?:/[^\s<>\"]*)?\b"),
    ("DEVICE", r"\b(?:[0-9a-f]{2}[:-]){5}[0-9a-f]{2}\b"),  # MAC addresses, before IPv6
    ("IP", r"\b(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)\b"
           r"|\b(?:[0-9a-f]{1,4}:){2,7}[0-9a-f]{1,4}\b|(?<![\w:])::(?:[0-9a-f]{1,4}:?)+\b"),
    ("SSN", r"\b(?:SSN|social security(?: number| no\.?)?)\s*[:#]?\s*\d{3}[- ]?\d{2}[- ]?\d{4}\b"
            r"|\b\d{3}-\d{2}-\d{4}\b|\b\d{3} \d{2} \d{4}\b"),
    ("MRN", _label(r"MRN|medical record|med rec|chart|hospital number|patient id|record")),
    ("HEALTHPLAN", _label(r"health ?plan|member(?:ship)?|beneficiary|insurance|policy|"
                          r"medicaid|medicare|subscriber|group")),
    ("ACCOUNT", _label(r"account|acct|a/c|billing|invoice|claim|iban|card")),
    ("LICENSE", _label(r"licen[sc]e|lic|DEA|NPI|certificate|cert|permit|passport|"
                       r"driver'?s licen[sc]e|DL")),
    ("VEHICLE", r"\b(?=[A-HJ-NPR-Z0-9]*\d)(?=[A-HJ-NPR-Z0-9]*[A-HJ-NPR-Z])[A-HJ-NPR-Z0-9]{17}\b|"
                + _label(r"VIN|licen[sc]e plate|plate|tag|registration|vehicle",
                         r"[A-Z0-9][A-Z0-9 -]{1,9}[A-Z0-9]")),
    ("DEVICE", _label(r"serial|s/n|sn|UDI|device|implant|pacemaker|pump|IMEI|MAC|model",
                      r"[A-Z0-9][A-Z0-9:.-]{3,}")
               + r"|\b(?:[0-9a-f]{2}[:-]){5}[0-9a-f]{2}\b|\(01\)\d{14}\S*"),
    ("BIOMETRIC", r"\b(?:fingerprint|finger ?print|retina(?:l)?(?: scan)?|iris(?: scan)?|"
                  r"voice ?print|face ?print|palm ?print|biometric|gait signature)"
                  r"(?:\s+(?:id|template|hash|record|scan))?\s*[:#=]?\s*[A-Z0-9][\w-]{3,}\b"),
    ("PHOTO", r"\b[\w-]+\.(?:jpe?g|png|gif|bmp|tiff?|heic|dcm|webp)\b|"
              r"\b(?:photo|photograph|picture|image|selfie|headshot)s?\s*(?:#|id|file)?\s*[:#=]\s*"
              r"\S+"),
    ("DATE", rf"\b\d{{1,2}}(?:st|nd|rd|th)?\s+(?:of\s+)?{_MONTH},?\s+\d{{2,4}}\b|"
             rf"\b{_MONTH}\s+\d{{1,2}}(?:st|nd|rd|th)?(?:,?\s+\d{{2,4}})?\b|"
             rf"\b{_MONTH}\s+\d{{4}}\b|"
             r"\b\d{4}[-/.]\d{1,2}[-/.]\d{1,2}(?:[T ]\d{1,2}:\d{2}(?::\d{2})?)?\b|"
             r"\b\d{1,2}[-/.]\d{1,2}[-/.]\d{2,4}\b|"
             r"\b\d{1,2}/\d{1,2}\b(?!/)|"
             r"\b(?:DOB|date of birth|born|admitted|discharged|died|deceased)\s*(?:on|:)?\s*"
             r"\d{1,4}(?:[-/.]\d{1,4}){0,2}\b"),
    ("PHONE", r"(?:\+?\d{1,3}[\s.-]?)?(?:\(\d{3}\)\s?|\b\d{3}[\s.-])\d{3}[\s.-]\d{4}\b|"
              r"\b(?:phone|tel|telephone|fax|mobile|cell|pager|ext)\.?\s*[:#]?\s*\+?[\d][\d\s().-]{5,}\d"),
    ("ADDRESS", r"\b\d{1,6}\s+(?:[A-Z][a-z]+\.?\s+){1,4}(?:Street|St|Avenue|Ave|Road|Rd|Boulevard|"
                r"Blvd|Lane|Ln|Drive|Dr|Court|Ct|Place|Pl|Way|Terrace|Circle|Cir|Highway|Hwy|"
                r"Parkway|Pkwy)\b\.?(?:,?\s+(?:Apt|Suite|Unit|#)\s*\w+)?|"
                r"\b(?:P\.?O\.? Box)\s+\d+\b"),
    ("ZIP", r"\b(?:zip(?: ?code)?|postal code|postcode)\s*[:#]?\s*\d{5}(?:-\d{4})?\b|"
            r"\b\d{5}-\d{4}\b|(?<=[A-Z]{2} )\d{5}\b|\b\d{5}\b"),
    ("AGE>89", r"\b(?:9\d|1[0-4]\d)[- ](?:years?|yrs?|y/?o)(?:[- ]old)?\b|"
               r"\b(?:aged?|age:)\s*(?:9\d|1[0-4]\d)\b|\b(?:9\d|1[0-4]\d)\s*(?:yo|y\.o\.)\b|"
               r"\bnonagenarian\b|\bcentenarian\b"),
    ("ID", r"\b(?:ID|identifier|ref(?:erence)?|case|badge|employee|student|code)\s*(?:#|no\.?|"
           r"number)?\s*[:#=]\s*[A-Z0-9][\w-]{2,}\b|"
           r"\b(?=[A-Z0-9-]*\d)(?=[A-Z0-9-]*[A-Z])[A-Z0-9]{2,}(?:-[A-Z0-9]+)+\b|"
           r"\b(?=[A-Z]*\d)(?=\d*[A-Z])[A-Z0-9]{7,}\b|\b\d{7,}\b"),
]]

# Names: a title or a relation/role word, then capitalised words.
_CAP = r"[A-Z][a-z]+(?:[-'][A-Z][a-z]+)?|[A-Z]'[A-Z][a-z]+|Mc[A-Z][a-z]+|[A-Z]\."
_TITLE = re.compile(rf"\b(?:Mr|Mrs|Ms|Miss|Mx|Dr|Prof|Sr|Sra|Nurse|Doctor)\.?\s+"
                    rf"(?:{_CAP})(?:\s+(?:{_CAP}))*")
_ROLE = re.compile(rf"\b(?:[Pp]atient|[Pp]t\.?|[Nn]ame(?: is)?:?|[Ss]on|[Dd]aughter|[Ww]ife|"
                   rf"[Hh]usband|[Mm]other|[Ff]ather|[Bb]rother|[Ss]ister|[Ss]pouse|[Pp]artner|"
                   rf"[Gg]uardian|[Cc]aregiver|[Ss]igned by|[Ss]een by|[Rr]eferred by|"
                   rf"[Cc]alled|[Nn]amed|[Cc]ontact),?\s+((?:{_CAP})(?:\s+(?:{_CAP}))*)")
_RUN = re.compile(rf"(?:{_CAP})(?:\s+(?:{_CAP}))+")

# Capitalised words that are no name: sentence starters and common clinical vocabulary.
_NOT_NAME = frozenset("""
a an the this that these those he she they we i it his her their our my your patient pt
is was are were has have had will would should could may might can did does do not no yes
on in at to for from with without by of and or but if then after before during while since
today yesterday tomorrow tonight now also please note noted plan assessment history exam
monday tuesday wednesday thursday friday saturday sunday january february march april may
june july august september october november december morning evening night
blood pressure heart rate pulse oxygen saturation temperature respiratory pain chest
emergency department intensive care unit icu er ed ward clinic hospital room bed floor
general medicine surgery cardiology oncology neurology radiology pediatrics pharmacy lab
type diabetes mellitus hypertension insulin metformin aspirin heparin warfarin lisinopril
atrial fibrillation myocardial infarction congestive failure chronic acute kidney disease
copd asthma pneumonia sepsis covid stroke cancer ct mri ecg ekg x-ray ultrasound
follow up discharge admission admitted diagnosis medication medications dose daily twice
vital signs signs labs results normal abnormal stable negative positive left right
mg ml kg dr mr mrs ms nurse doctor team primary care physician nursing home
given started stopped continue continued increase decrease reports denies complains
""".split())  # noqa: SIM905 (a word list reads best as text)


def _name_run(words: list[str]) -> bool:
    """True if a run of capitalised words looks like a person's name."""
    content = [w for w in words if w.rstrip(".").lower() not in _NOT_NAME]
    return len(content) >= 2 or (len(content) == 1 and len(words) >= 2 and
                                 words[-1] == content[0] and words[0].endswith("."))


def _names(text: str, counts: Counter[str]) -> str:
    def title(m: re.Match[str]) -> str:
        counts["NAME"] += 1
        return "[NAME]"
    text = _TITLE.sub(title, text)

    def role(m: re.Match[str]) -> str:
        words = m.group(1).split()
        keep = [w for w in words if w.rstrip(".").lower() in _NOT_NAME]
        if len(keep) == len(words):
            return m.group(0)
        counts["NAME"] += 1
        return m.group(0)[: m.start(1) - m.start(0)] + "[NAME]"
    text = _ROLE.sub(role, text)

    def run(m: re.Match[str]) -> str:
        words = m.group(0).split()
        # drop leading sentence starters / clinical words ("The", "Patient", "Chest")
        i = 0
        while i < len(words) and words[i].rstrip(".").lower() in _NOT_NAME:
            i += 1
        rest = words[i:]
        if len(rest) >= 2 and _name_run(rest):
            counts["NAME"] += 1
            head = m.group(0)[: len(m.group(0)) - len(" ".join(rest))]
            return head + "[NAME]"
        return m.group(0)
    return _RUN.sub(run, text)


KINDS = tuple(dict.fromkeys(k for k, _ in _PATTERNS)) + ("NAME",)


def redact(text: str) -> tuple[str, dict[str, int]]:
    """Replace Safe Harbor identifiers in text by [KIND] placeholders; returns (text, counts)."""
    counts: Counter[str] = Counter()
    for kind, pat in _PATTERNS:
        def sub(m: re.Match[str], kind: str = kind) -> str:
            counts[kind] += 1
            return f"[{kind}]"
        text = pat.sub(sub, text)
    text = _names(text, counts)
    return text, dict(counts)
