"""The error table's helpers: client input is echoed short, messages are capped."""

from __future__ import annotations

from mmembed.errors import MAX_MESSAGE_CHARS, ApiError, ErrorCode, echo


def test_echo_keeps_short_values_and_cuts_long_ones():
    assert echo("tongyi") == "'tongyi'"
    long = echo("x" * 10_000_000)
    assert long.startswith("'xxx") and long.endswith("... (10000000 characters)")
    assert len(long) < 140
    assert len(echo(["a" * 1000] * 1000)) <= 100
    assert len(echo({"k": [[[["deep"]]]]})) <= 100
    assert echo(2.5) == "2.5"


def test_messages_are_capped():
    error = ApiError(ErrorCode.INVALID_PARAMETER, "m" * 5_000_000)
    assert len(error.message) <= MAX_MESSAGE_CHARS
    assert error.message.endswith("(5000000 characters)")
    assert len(error.at("input.contents[0]").message) <= MAX_MESSAGE_CHARS
