"""The single `prefixcap` entry point."""

from prefixcap.cli import SUBCOMMANDS, main


def test_usage_lists_every_stage(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    for name in ("preprocess", "train", "caption", "evaluate", "serve", "demo"):
        assert name in out and name in SUBCOMMANDS


def test_unknown_command_fails_with_message(capsys):
    assert main(["bogus"]) == 2
    assert "unknown command 'bogus'" in capsys.readouterr().err
