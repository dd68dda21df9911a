"""Which names hold secrets, and how a command line is masked before it reaches the store."""

from __future__ import annotations

import re

SECRET_WORDS = ("pass", "pw", "secret", "token", "key", "auth", "credential")
"""A name holding one of these words (in any case) holds a secret: an option of a command
line (``--db-pass``, ``--api-key``), a ``name=value`` pair (``PGPASSWORD=``), a header
(``Authorization:``) or a URL query key (``sslkey``). The words match inside longer names on
purpose: ``--monkey`` and ``--author`` are masked too, since hiding a harmless value costs
less than storing a password."""

MASK = "***"

# Every pattern here runs in time linear in the word: a command line may hold a huge word,
# and a pattern that backtracks over it would stall the writer for seconds.
_SCHEME = re.compile(r"[A-Za-z][\w+.-]{0,30}://")
_USER = re.compile(r"[^/:@\s]*:")
_NAME = re.compile(r"[\w.-]+")
_HEADER = re.compile(r"([\w-]+):[ \t]*")
_OPTION = re.compile(r"--?[\w.-]+")
_QUERY_VALUE = re.compile(r"[^&#]*")
_SPACE = re.compile(r"(\s+)")
_QUOTES = "'\""


def is_secret_name(name: str) -> bool:
    """Whether ``name`` (an option, a key, a header) holds a word of :data:`SECRET_WORDS`."""
    lowered = name.lower()
    return any(word in lowered for word in SECRET_WORDS)


def masked_argv(argv: list[str]) -> list[str]:
    """Return ``argv`` with every secret in it written as ``***``.

    The rule (also in docs/recorder.md), where a *secret name* is one holding a word of
    :data:`SECRET_WORDS`:

    - the password of every URL (``postgresql://u:***@h/db``), from the ``:`` after the user
      to the last ``@`` before the next URL, so a password holding ``/``, ``:`` or ``@`` is
      hidden whole;
    - the value of a ``name=value`` with a secret name (``--api-key=***``, ``PGPASSWORD=***``,
      ``password=***``) to the end of the word, or to the next ``&`` in a URL query; the
      value of a ``Name: value`` header with a secret name (``Authorization: ***``);
    - the word after an option with a secret name (``--pass ***``) or after ``-p``; a value
      attached to ``-p`` (``-p***``, as ``mysql -pSECRET`` takes it);
    - a hidden value that opens a quote it does not close (``password='two``) hides the
      following words up to the one that closes it (``words'``);
    - a word holding spaces (a command given as one argument) is masked by the same rules,
      then each of its space-separated parts as if they were words.

    Runs once per process; a few microseconds per word.
    """
    return _masked(argv)[0]


def _masked(words: list[str]) -> tuple[list[str], bool, str]:
    """Mask ``words``; also return whether the word after them is a hidden value and the
    quote a hidden value left open."""
    masked: list[str] = []
    hide_next = False
    quote = ""
    for word in words:
        if quote:
            masked.append(MASK)
            if quote in word:
                quote = ""
            continue
        if hide_next:
            masked.append(MASK)
            quote = _unclosed_quote(word)
            # "--no-auth --password x": the hidden word may itself be an option taking a value.
            hide_next = not quote and _takes_secret(word)
            continue
        text, quote = _masked_word(word)
        hide_next = not quote and _takes_secret(word)
        if _SPACE.search(text):
            pieces = _SPACE.split(text)
            parts, hide_next, inner_quote = _masked(pieces[::2])
            pieces[::2] = parts
            text = "".join(pieces)
            quote = quote or inner_quote
        masked.append(text)
    return masked, hide_next, quote


def _takes_secret(word: str) -> bool:
    """Whether ``word`` is an option whose value, the next word, is a secret."""
    return word == "-p" or (_OPTION.fullmatch(word) is not None and is_secret_name(word))


def _masked_word(word: str) -> tuple[str, str]:
    """Mask the URL passwords, ``name=value`` secrets, secret header and ``-pVALUE`` of one
    word; return it and the quote its hidden value leaves open (``''`` when none)."""
    if "://" in word:
        word = _masked_urls(word)
    if word.startswith("-p") and len(word) > 2:
        return "-p" + MASK, _unclosed_quote(word[2:].lstrip("="))
    header = _HEADER.match(word) if ":" in word else None
    if header is not None and header.end() < len(word) and is_secret_name(header[1]):
        return word[: header.end()] + MASK, _unclosed_quote(word[header.end() :])
    if "=" not in word:
        return word, ""
    pieces: list[str] = []
    pos = 0
    for name in _NAME.finditer(word):
        value_at = name.end() + 1
        if name.start() < pos or word[name.end() : value_at] != "=":
            continue
        if not is_secret_name(name[0]):
            continue
        if name.start() and word[name.start() - 1] in "?&":  # a URL query: up to the next '&'
            pieces += [word[pos:value_at], MASK]
            pos = _QUERY_VALUE.match(word, value_at).end()
            continue
        if word[value_at:] == MASK:  # masked already (a part of a word holding spaces)
            break
        pieces += [word[pos:value_at], MASK]
        return "".join(pieces), _unclosed_quote(word[value_at:])
    pieces.append(word[pos:])
    return "".join(pieces), ""


def _masked_urls(word: str) -> str:
    """Mask the userinfo password of every URL in ``word``: up to the last ``@`` before the
    next URL that follows a space."""
    schemes = list(_SCHEME.finditer(word))
    ends: list[int] = []  # where the text each URL's password may span ends
    end = len(word)
    for scheme in reversed(schemes):
        ends.append(end)
        if scheme.start() and word[scheme.start() - 1].isspace():
            end = scheme.start()
    ends.reverse()
    last_at: dict[int, int] = {}
    out: list[str] = []
    pos = 0
    for scheme, end in zip(schemes, ends, strict=True):
        if scheme.start() < pos:
            continue
        user = _USER.match(word, scheme.end())
        if user is None:
            continue
        if end not in last_at:
            last_at[end] = word.rfind("@", scheme.start(), end)
        if last_at[end] < user.end():
            continue
        out += [word[pos : user.end()], MASK]
        pos = last_at[end]
    out.append(word[pos:])
    return "".join(out)


def _unclosed_quote(value: str) -> str:
    """The quote ``value`` opens and does not close (``'two``), else ``''``."""
    if value[:1] in _QUOTES and value.count(value[0]) == 1:
        return value[0]
    return ""
