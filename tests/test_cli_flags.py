"""The library names a setting by its field; the commands name it by its flag (autopeft/cli/_flags.py)."""

from __future__ import annotations

import pytest

from autopeft.cli import main
from autopeft.errors import ConfigError
from autopeft.search import Budget
from autopeft.search.config import SearchConfig


def test_the_library_names_fields_not_flags():
    with pytest.raises(ConfigError, match=r"^`budget` must be a percentage .*, but got '1x'\.$"):
        Budget.parse("1x")
    with pytest.raises(ConfigError, match=r"^`objective` must be 'single' or 'multi', but got 'pareto'\.$"):
        SearchConfig(backbone="unetr", budget="1%", objective="pareto")
    with pytest.raises(ConfigError, match=r"^`cpus_per_trial` must be > 0"):
        SearchConfig(backbone="unetr", budget="1%", cpus_per_trial=0)
    with pytest.raises(ConfigError, match=r"^`prior_signal` must be one of sensitivity, shpeft, gradient, audit, count, early, but got 'grad'\.$"):
        SearchConfig(backbone="unetr", budget="1%", prior_signal="grad")
    with pytest.raises(ConfigError, match=r"^`fidelity` must be one of pairs, epochs, but got 'steps'\.$"):
        SearchConfig(backbone="unetr", budget="1%", fidelity="steps")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["search", "--backbone", "unetr", "--budget", "1x"], "--budget must be a percentage (1%), a fraction (0.005)"),
        (["space", "--backbone", "unetr", "--budget", "150%"], "--budget must be a percentage in (0, 100], but got '150%'."),
        (["search", "--backbone", "unetr", "--budget", "1%", "--cpus-per-trial", "0"], "--cpus-per-trial must be > 0 and --gpus-per-trial >= 0"),
        (["search", "--backbone", "unetr", "--budget", "1%", "--trials", "0"], "--trials must be at least 1, but got 0."),
        (["search", "--backbone", "unetr", "--budget", "1%", "--scanners", "1"], "--scanners must hold at least two scanners"),
        (["search", "--backbone", "unetr", "--budget", "1%", "--scanners", "1,2", "--weights", "w.pt", "--source", "3"],
         "--source (3) must be one of --scanners (1,2)."),
        (["search", "--backbone", "unetr", "--budget", "1%", "--prior-candidates", "0"], "--prior-candidates must be at least 1, but got 0."),
        (["search", "--backbone", "unetr", "--budget", "1%", "--prior-beta", "-1"], "--prior-beta (the prior's fading strength) must be 0 or more, but got -1.0."),
        (["search", "--backbone", "unetr", "--budget", "1%", "--time-budget", "5x"], "--time-budget '5x' must be like 30m, 2h, 90s"),
        (["search", "--resume", "no-such-run"], "--resume no-such-run: no run.json there"),
    ],
)
def test_the_commands_name_flags(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "`" not in err, err


def test_amp_is_a_flag_of_search_pretrain_and_finetune_and_reaches_the_trials():
    from dataclasses import asdict

    from autopeft.cli import build_parser
    from autopeft.cli.search import _config
    from autopeft.runner.trial import setup_from_config

    parse = build_parser().parse_args
    search = ["search", "--backbone", "unetr", "--budget", "1%"]
    assert parse(search).amp is False and parse(["pretrain", "--backbone", "unetr", "--source", "1"]).amp is False
    assert parse(["pretrain", "--backbone", "unetr", "--source", "1", "--amp"]).amp is True
    finetune = ["finetune", "--backbone", "unetr", "--source", "1", "--target", "5"]
    # None: a plan from a search takes the run's setting (run.json), else off.
    assert [parse(finetune + extra).amp for extra in ([], ["--amp"], ["--no-amp"])] == [None, True, False]
    config = _config(parse([*search, "--amp", "--preset", "tiny", "--scanners", "1,5", "--epochs", "2"]), None)
    assert config.amp is True
    setup = setup_from_config(asdict(config), manifest_path="m.csv")
    assert setup.amp and setup.job("1", "5").amp
