"""`autopeft COMMAND --help`: every subcommand teaches, and no option reads "(default: None)"."""

import pytest

from autopeft.cli import _SUBCOMMANDS, build_parser


@pytest.mark.parametrize("command", sorted(_SUBCOMMANDS))
def test_help_shows_useful_defaults_only(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "usage: autopeft " + command in text
    assert "(default: None)" not in text and "(default: False)" not in text


def test_help_keeps_real_defaults():
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices["pretrain"]
    text = sub.format_help()
    assert "(default: 0)" in " ".join(text.split())  # --fold and --seed
    assert "(default: tiny)" in " ".join(text.split())
