"""wstunnel.tokens: a token shows only its 8-character prefix unless revealed on purpose."""

from __future__ import annotations

import hmac
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wstunnel import tokens
from wstunnel.tokens import MIN_LENGTH, PREFIX_LENGTH, Token, redact

SECRET = "tech_xyz-0123456789-very-secret"
# Characters that cannot turn a token's text into a piece of its own repr.
secrets = st.text(alphabet=string.ascii_letters + string.digits + "_-!$@", min_size=MIN_LENGTH, max_size=64)


def test_lengths_match_the_original() -> None:
    assert MIN_LENGTH == 16
    assert PREFIX_LENGTH == 8


def test_str_shows_the_prefix_and_dots_only() -> None:
    token = Token(SECRET)
    assert str(token) == "tech_xyz..."
    assert f"{token}" == "tech_xyz..."
    assert "%s" % token == "tech_xyz..."  # noqa: UP031 - the old style must redact too
    assert format(token) == "tech_xyz..."


def test_repr_shows_the_prefix_and_dots_only() -> None:
    token = Token(SECRET)
    assert repr(token) == "Token('tech_xyz...')"
    assert f"{token!r}" == "Token('tech_xyz...')"
    assert repr([token]) == "[Token('tech_xyz...')]"
    assert SECRET not in repr({"token": token})


def test_reveal_prefix_and_len() -> None:
    token = Token(SECRET)
    assert token.reveal() == SECRET
    assert token.prefix == "tech_xyz"
    assert len(token) == len(SECRET)


def test_short_values_are_redacted_the_same_way() -> None:
    assert str(Token("abc")) == "abc..."
    assert str(Token("")) == "..."
    assert redact("0123456789") == "01234567..."


@given(secrets)
@settings(max_examples=50, deadline=None)
def test_no_rendering_contains_the_whole_token(secret: str) -> None:
    token = Token(secret)
    for text in (str(token), repr(token), f"{token}", f"{token!r}", str([token])):
        assert secret not in text
        assert secret[:PREFIX_LENGTH] + "..." in text


def test_equality_compares_values() -> None:
    assert Token(SECRET) == Token(SECRET)
    assert Token(SECRET) != Token(SECRET + "x")
    assert Token(SECRET) != Token(SECRET[:-1] + "?")
    # Same prefix, same str(): still different tokens.
    other = Token(SECRET[:PREFIX_LENGTH] + "-something-else")
    assert str(other) == str(Token(SECRET))
    assert other != Token(SECRET)


def test_a_token_never_equals_a_plain_string() -> None:
    token = Token(SECRET)
    assert token != SECRET
    assert SECRET != token  # noqa: SIM300 - the reflected comparison is the point
    assert token.__eq__(SECRET) is NotImplemented
    assert token != str(token)


def test_equality_is_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(tokens.hmac, "compare_digest", spy)
    assert Token(SECRET) == Token(SECRET)
    assert Token(SECRET) != Token("x" * 20)
    assert calls == [(SECRET.encode(), SECRET.encode()), (SECRET.encode(), b"x" * 20)]


def test_tokens_decoded_from_invalid_utf8_compare() -> None:
    # The server decodes header bytes with surrogateescape: such a token must still compare.
    raw = b"\xff\xfe-not-utf8-at-all-0123"
    token = Token(raw.decode("utf-8", "surrogateescape"))
    assert token == Token(raw.decode("utf-8", "surrogateescape"))
    assert token != Token(b"\xff\xfd-not-utf8-at-all-0123".decode("utf-8", "surrogateescape"))
    registry = {token: "tunnel"}
    assert registry[Token(raw.decode("utf-8", "surrogateescape"))] == "tunnel"


def test_non_ascii_tokens_compare() -> None:
    assert Token("jeton-très-secret-éèà") == Token("jeton-très-secret-éèà")
    assert Token("jeton-très-secret-éèà") != Token("jeton-tres-secret-eea")


@given(secrets, secrets)
@settings(max_examples=50, deadline=None)
def test_hash_is_consistent_with_equality(a: str, b: str) -> None:
    assert hash(Token(a)) == hash(Token(a))
    assert (Token(a) == Token(b)) is (a == b)
    if a == b:
        assert hash(Token(a)) == hash(Token(b))


def test_tokens_work_as_dict_keys_and_set_members() -> None:
    registry = {Token(SECRET): 1, Token("another-token-of-16"): 2}
    assert registry[Token(SECRET)] == 1
    assert Token("another-token-of-16") in registry
    assert Token("unknown-token-000") not in registry
    assert len({Token(SECRET), Token(SECRET), Token("another-token-of-16")}) == 2


def test_a_token_holds_nothing_but_its_value() -> None:
    token = Token(SECRET)
    assert not hasattr(token, "__dict__")
    with pytest.raises(AttributeError):
        token.extra = "x"  # type: ignore[attr-defined]
