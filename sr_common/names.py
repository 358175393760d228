"""How the messages show a file or folder name: its invisible and control characters escaped (``shown_name``), so
that it stays on its line, reads as the file it is and cannot rewrite a terminal; the commands, the cores' errors and
the nodes' messages all show names this way."""

import os
import re
import unicodedata

# control and format characters, lone surrogates (the bytes of a Linux name that is not UTF-8, as Python decodes
# them), line and paragraph separators
ESCAPED_CATEGORIES = ("Cc", "Cf", "Cs", "Zl", "Zp")
# Default_Ignorable_Code_Point, from Unicode's DerivedCoreProperties.txt 14.0.0 (the unicodedata of Python 3.11; the
# same ranges up to 17.0.0), first and last code point: characters a renderer shows as nothing. Beside the Cf ones,
# letters (the Hangul fillers), marks (the variation selectors, U+034F combining grapheme joiner, Khmer's inherent
# vowels) and unassigned code points (invisible whatever is assigned there later)
DEFAULT_IGNORABLE = ((0x00AD, 0x00AD), (0x034F, 0x034F), (0x061C, 0x061C), (0x115F, 0x1160), (0x17B4, 0x17B5),
                     (0x180B, 0x180F), (0x200B, 0x200F), (0x202A, 0x202E), (0x2060, 0x206F), (0x3164, 0x3164),
                     (0xFE00, 0xFE0F), (0xFEFF, 0xFEFF), (0xFFA0, 0xFFA0), (0xFFF0, 0xFFF8), (0x1BCA0, 0x1BCA3),
                     (0x1D173, 0x1D17A), (0xE0000, 0xE0FFF))
BRAILLE_BLANK = "\u2800"  # a braille cell without dots (So): prints as a blank, but is no space to the messages
JOINERS = frozenset("\u200c\u200d")  # zero width non-joiner and joiner (Cf): emoji sequences, Arabic, Indic words
# Mongolian free variation selectors, variation selectors 1-16 and 17-256: pick a glyph of the character before
VARIATION_SELECTORS = ((0x180B, 0x180D), (0x180F, 0x180F), (0xFE00, 0xFE0F), (0xE0100, 0xE01EF))
KEYCAP = "\u20e3"  # combining enclosing keycap: 1\ufe0f\u20e3 is the keycap emoji of 1
EMOJI_LETTER = "\u2139"  # INFORMATION SOURCE: the one cased letter (Ll) that is an emoji, \u2139\ufe0f
# the emoji tag sequences (flags of England, Scotland, Wales): black flag, the region's tag letters (Cf), cancel tag
TAG_FLAGS = re.compile("\U0001f3f4(?:{})\U000e007f".format("|".join(
    "".join(chr(0xE0000 + ord(letter)) for letter in region) for region in ("gbeng", "gbsct", "gbwls"))))
CHOSEONG_FILLER, JUNGSEONG_FILLER = "\u115f", "\u1160"  # stand for the missing consonant or vowel of a syllable
CHOSEONG = ((0x1100, 0x115E), (0xA960, 0xA97C))  # the leading consonants of conjoining Hangul, less the filler
JUNGSEONG = ((0x1161, 0x11A7), (0xD7B0, 0xD7C6))  # the vowels of conjoining Hangul, less the filler
VIRAMA = 9  # the canonical combining class of viramas (Devanagari ्, Malayalam ്, Sinhala ්, Khmer coeng)
EMOJI_MODIFIERS = ("\U0001f3fb", "\U0001f3ff")  # the skin tones, first and last
EMOJI_PRESENTATION = "\ufe0f"
MONGOLIAN_VOWEL_SEPARATOR = "\u180e"  # Cf: between a word's last consonant and its final a or e, picks both shapes
MONGOLIAN_LETTERS = ("\u1820", "\u18aa")  # the letters (Lo) of Hudum, Todo, Sibe, Manchu and Ali Gali
MONGOLIAN_A_E = "\u1820\u1821"  # MONGOLIAN LETTER A, E


def _within(char, ranges):
    return any(first <= ord(char) <= last for first, last in ranges)


def _invisible(char):
    """Whether the messages escape ``char`` (where it shapes nothing: ``_shapes``): a control or format character,
    a line or paragraph separator, a default-ignorable code point, the blank braille cell."""
    return (unicodedata.category(char) in ESCAPED_CATEGORIES or _within(char, DEFAULT_IGNORABLE)
            or char == BRAILLE_BLANK)


def _joins(before, joiner, after):
    """Whether ``joiner`` between ``before`` and ``after`` shapes what is printed: next to a virama (a Brahmic
    conjunct, क्\\u200dष, ന്\\u200d), between two Arabic-script letters (bidirectional class AL, می\\u200cخواهم), or
    U+200D in an emoji sequence (after a symbol, a skin tone or U+FE0F, before a symbol: 👩\\u200d💻,
    🏳\\ufe0f\\u200d🌈). Elsewhere it joins nothing, and two names differing by it print alike."""
    if VIRAMA in (unicodedata.combining(before), unicodedata.combining(after)):
        return True
    if unicodedata.bidirectional(before) == unicodedata.bidirectional(after) == "AL":
        return True
    emoji_before = (unicodedata.category(before) == "So" or EMOJI_MODIFIERS[0] <= before <= EMOJI_MODIFIERS[1]
                    or before == EMOJI_PRESENTATION)
    return joiner == "\u200d" and emoji_before and unicodedata.category(after) == "So"


def _shapes(before, char, after):
    """Whether the invisible ``char`` between ``before`` and ``after`` shapes what is printed:
    a joiner where it joins (``_joins``); a variation selector after a character it may vary, a symbol, digit,
    punctuation or uncased letter that is printed (❤\\ufe0f, 葛\\U000e0100, Mongolian ᠠ\\u180b) or the emoji ℹ (a
    lowercase letter), after an ASCII one
    only in a keycap (1\\ufe0f\\u20e3; a\\ufe0f and 1\\ufe0f print as a and 1);
    a conjoining Hangul filler inside its syllable (U+115F before a vowel, U+1160 after a leading consonant: the
    block drawn without that consonant or vowel); the blank braille cell between two braille cells (a braille text's
    space); the Mongolian vowel separator between a Mongolian letter and a or e (ᠬᠠᠷ\\u180eᠠ, qar-a "black", is drawn
    apart from ᠬᠠᠷᠠ, qara "to look"). Nothing else: the compatibility Hangul fillers U+3164 and U+FFA0 build no syllable in Unicode text (the
    KS X 1001 sequences they began are not drawn as one) and print as a blank anywhere, U+034F and Khmer's inherent
    vowels print as nothing."""
    if char in JOINERS:
        return _joins(before, char, after)
    if _within(char, VARIATION_SELECTORS):
        if before.isascii():
            return after == KEYCAP and before in "0123456789#*"
        return not _invisible(before) and (unicodedata.category(before)[0] in "NPS"
                                           or unicodedata.category(before) == "Lo" or before == EMOJI_LETTER)
    if char == CHOSEONG_FILLER:
        return _within(after, JUNGSEONG)
    if char == JUNGSEONG_FILLER:
        return _within(before, CHOSEONG)
    if char == BRAILLE_BLANK:
        return BRAILLE_BLANK < before <= "\u28ff" and BRAILLE_BLANK < after <= "\u28ff"
    if char == MONGOLIAN_VOWEL_SEPARATOR:
        return (MONGOLIAN_LETTERS[0] <= before <= MONGOLIAN_LETTERS[1] and unicodedata.category(before) == "Lo"
                and after in MONGOLIAN_A_E)
    return False


def shown_name(name):
    """A file or folder ``name`` as the messages print it: its control characters (line breaks, ESC, which starts a
    terminal's escape sequence, the other C0 and C1 codes and DEL; the Unicode line and paragraph separators), its
    format characters (Unicode's Cf: the bidirectional controls, with U+202E ``invoice\\u202egnp.exe`` would print as
    ``invoiceexe.png``; the invisible ones, U+200B zero width space, U+2060, U+FEFF, U+00AD soft hyphen), its lone
    surrogates (a Linux name that is not UTF-8: \\udce9 for the byte 0xE9, which a UTF-8 stdout cannot write) and the
    other characters Unicode says to show as nothing (``DEFAULT_IGNORABLE``: the Hangul fillers U+3164, U+FFA0,
    U+115F, U+1160, the variation selectors, U+034F) or that print as a blank without being a space (U+2800 blank
    braille cell), with which two names print alike, written as Python escapes (``\\n``, ``\\x1b``, ``\\xad``,
    ``\\u202e``, ``\\u3164``), so that it stays on its line, reads as the file it is, and cannot rewrite the terminal.
    Such a character is kept where it shapes what is printed, as part of a word or emoji (``_shapes``: ``👩\\u200d💻``,
    ``❤\\ufe0f``, a Hangul syllable drawn without its consonant, a Mongolian word's vowel separator; the tags of a
    flag, ``TAG_FLAGS``), and escaped elsewhere. Every other character as it is."""
    padded = f"\0{name}\0"  # NUL at each end, which nothing joins
    flag_tags = {i for flag in TAG_FLAGS.finditer(name) for i in range(flag.start() + 1, flag.end())}

    def shown(i, c):
        if not _invisible(c) or i in flag_tags or _shapes(padded[i], c, padded[i + 2]):
            return c
        return c.encode("unicode_escape").decode("ascii")

    return "".join(shown(i, c) for i, c in enumerate(name))


def quoted_name(path):
    """A file or folder ``path`` (str, bytes or path-like) as a message names it within a sentence: in quotes, as
    ``shown_name`` shows it (not its repr(), which prints U+3164 or a variation selector as it is, escapes the joiner
    of an emoji sequence and doubles a Windows path's backslashes)."""
    return f"'{shown_name(os.fsdecode(path))}'"


def error_text(error):
    """``str(error)``, but for an OSError naming its files as ``quoted_name`` does (its own text gives their repr()):
    only the names at the end of that text are rewritten, so a text of its own (urllib's URLError, Windows'
    [WinError N]) is kept, and a name that is not a path stays as its repr()."""
    text = str(error)
    if not isinstance(error, OSError) or error.filename is None:
        return text
    names = [error.filename] + ([error.filename2] if error.filename2 is not None else [])
    given = ": " + " -> ".join(map(repr, names))
    if not text.endswith(given):
        return text
    shown = (quoted_name(name) if isinstance(name, (str, bytes, os.PathLike)) else repr(name) for name in names)
    return text[:-len(given)] + ": " + " -> ".join(shown)
