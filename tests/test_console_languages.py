"""The console's seven languages (issue 28): English, Russian, and the region's Kazakh, Kyrgyz, Tajik,
Turkmen and Uzbek (Latin script). Every table has every key of the English one, the same placeholders
in each string, and no string left as the English one unless it is a name, a code or a number; in the
browser, each language is chosen from the browser's own list and by the menu, and the page then speaks
it."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from console_fixtures import Sample
from console_pages import Watch, expect, upload, wait_done

STRINGS = Path(__file__).resolve().parents[1] / "api" / "console" / "strings"
LANGUAGES = ("en", "ru", "kk", "ky", "tg", "tk", "uz")
# Strings that are the same in every language: the product's name, the language names (each in its
# own language), the key format. A string of placeholders and punctuation only is the same too.
SAME_EVERYWHERE = {"app.brand", "signin.placeholder", *(f"lang.{code}" for code in LANGUAGES)}
# Words that these languages took from the same source as English: the same word, translated.
LOANWORDS = {(code, key) for code in ("tk", "uz") for key in ("detail.model", "lifecycle.model")}
PLACEHOLDER = re.compile(r"\{(\w+)\}")
ENTRY = re.compile(r'^  "([^"]+)": (".*"),$', re.M)


def table(code: str) -> dict[str, str]:
    """A strings/<code>.js table, read as the data it is (one `"key": "value",` line each)."""
    text = (STRINGS / f"{code}.js").read_text(encoding="utf-8")
    entries = {key: json.loads(value) for key, value in ENTRY.findall(text)}
    assert len(entries) == text.count('\n  "'), f"{code}.js has a line that is not one key and one string"
    return entries


def test_every_table_has_every_key_and_placeholder() -> None:
    english = table("en")
    for code in LANGUAGES[1:]:
        translated = table(code)
        assert set(translated) == set(english), f"{code}: {sorted(set(english) ^ set(translated))}"
        for key, text in english.items():
            wanted, got = sorted(PLACEHOLDER.findall(text)), sorted(PLACEHOLDER.findall(translated[key]))
            assert got == wanted, f"{code} {key}: {translated[key]!r}"


def test_no_string_is_left_in_english() -> None:
    english = table("en")
    for code in LANGUAGES[1:]:
        left = [
            key
            for key, text in table(code).items()
            if text == english[key]
            and key not in SAME_EVERYWHERE
            and (code, key) not in LOANWORDS
            and re.search(r"[^\W\d_]", PLACEHOLDER.sub("", text))  # letters beyond the placeholders
        ]
        assert left == [], f"{code} left in English: {left}"


def test_each_language_is_written_in_its_own_script() -> None:
    """Kazakh, Kyrgyz and Tajik in Cyrillic; Turkmen and Uzbek in Latin; each with letters of its own."""
    cyrillic, latin = re.compile(r"[\u0400-\u04ff]"), re.compile(r"[A-Za-z]")
    own_letters = {"kk": "әғқңөұүһі", "ky": "ңөү", "tg": "ғӣқӯҳҷ", "tk": "äçňöşüýž", "uz": "oʻgʻ"}
    for code, letters in own_letters.items():
        texts = [text for key, text in table(code).items() if key not in SAME_EVERYWHERE]
        script = cyrillic if code in ("kk", "ky", "tg") else latin
        other = latin if script is cyrillic else cyrillic
        words = " ".join(PLACEHOLDER.sub("", text) for text in texts)
        assert len(script.findall(words)) > 20 * max(1, len(other.findall(words)) // 20)
        assert any(letter in words.lower() for letter in letters), f"{code} has none of {letters}"


@pytest.mark.slow
@pytest.mark.parametrize("code", LANGUAGES)
def test_the_page_speaks_the_browsers_language(
    code: str, new_page: Callable[..., tuple[Any, Watch]], served: Any, samples: dict[str, Sample]
) -> None:
    strings = table(code)
    locale = {"en": "en-GB", "ru": "ru-RU", "kk": "kk-KZ", "ky": "ky-KG", "tg": "tg-TJ", "tk": "tk-TM",
              "uz": "uz-Latn-UZ"}[code]  # fmt: skip
    page, watch = new_page(served, locale=locale)
    expect()(page.locator("#console")).to_be_visible()
    assert page.evaluate("() => document.documentElement.lang").split("-")[0] == code
    assert page.title() == strings["app.title"]
    expect()(page.locator("#language")).to_have_value(code)
    upload(page, [samples["counterfeit-photo"]])
    wait_done(page, 1)
    expect()(page.locator("#verdict-body .verdict-word .word")).to_have_text(strings["verdict.counterfeit"])
    expect()(page.locator("#history-title")).to_have_text(strings["history.title"])
    # And from the menu: every other language, then back.
    for other in LANGUAGES:
        page.locator("#language").select_option(other)
        expect()(page.locator("#submit-title")).to_have_text(table(other)["submit.title"])
    assert watch.unexpected_errors() == []
