"""One configuration model (ccpcsa.settings): each setting declared once, the prune and search
command lines and their YAML files generated from it, one ladder from errors to exit codes."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from ccpcsa import exits
from ccpcsa.__main__ import build_parser as prune_parser
from ccpcsa.command import run_guarded, settings_of
from ccpcsa.search.config import ConfigError, SearchConfig, config_from_dict
from ccpcsa.search.run import build_parser as search_parser
from ccpcsa.settings import PruneConfig, SettingError, TrainingSettings, setting_names


def _prune_actions() -> dict[str, argparse.Action]:
    parser = prune_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return {a.dest: a for a in sub.choices["prune"]._actions}


def _search_actions() -> dict[str, argparse.Action]:
    return {a.dest: a for a in search_parser()._actions}


def _shape(action: argparse.Action) -> tuple:
    return (tuple(action.option_strings), type(action).__name__, action.type, action.choices,
            action.help)


def test_a_shared_setting_is_the_same_flag_in_both_tools():
    prune, search = _prune_actions(), _search_actions()
    shared = setting_names(TrainingSettings)
    assert len(shared) > 30
    for name in shared:
        assert _shape(prune[name]) == _shape(search[name]), name
        assert getattr(PruneConfig(), name) == getattr(SearchConfig(), name), name


@pytest.mark.parametrize("cls, actions", [(PruneConfig, _prune_actions),
                                          (SearchConfig, _search_actions)])
def test_every_setting_has_a_flag_with_help_and_every_flag_a_setting(cls, actions):
    found = actions()
    tool_only = {"help", "config", "verbose", "dry_run"}
    assert set(found) - tool_only == set(setting_names(cls))
    for name in setting_names(cls):
        assert found[name].help and found[name].default is None, name


def test_the_defaults_the_two_tools_used_to_disagree_on_are_one_now():
    assert PruneConfig().max_rounds == SearchConfig().max_rounds == 6
    field = {f.name: f for f in dataclasses.fields(PruneConfig)}["residual_cap"]
    assert field.type == "float | None"  # a ratio, as it is in prune
    assert "residual_cap" not in setting_names(SearchConfig)


def test_prune_reads_a_yaml_config_and_flags_override_it(tmp_path):
    config = tmp_path / "prune.yaml"
    config.write_text("max-rounds: 3\nstage_cap: [layer1=0.5]\ntolerance: 2\n")
    args = prune_parser().parse_args(["prune", "--config", str(config), "--tolerance", "1"])
    cfg, given = settings_of(args, PruneConfig)
    assert (cfg.max_rounds, cfg.tolerance, cfg.caps("stage_cap")) == (3, 1.0, {"layer1": 0.5})
    assert given == {"max_rounds", "stage_cap", "tolerance"}
    config.write_text("max_rounds: many\n")
    args = prune_parser().parse_args(["prune", "--config", str(config)])
    with pytest.raises(SettingError, match="max_rounds must be a whole number, got 'many'"):
        settings_of(args, PruneConfig)
    config.write_text("num_samples: 4\n")  # a search setting
    with pytest.raises(SettingError, match="unknown setting.*num_samples"):
        settings_of(prune_parser().parse_args(["prune", "--config", str(config)]), PruneConfig)


def test_a_saved_search_of_an_earlier_version_still_loads():
    saved = {**SearchConfig().to_dict(), "residual_cap": False}
    del saved["search_residual_cap"]
    assert config_from_dict(saved).search_residual_cap is False
    with pytest.raises(ConfigError, match="residual_cap"):
        config_from_dict({"residual_cap": 0.3})  # a ratio is prune's, not the search's


@pytest.mark.parametrize("error, code", [
    (SettingError("bad"), exits.REFUSED), (ValueError("while running"), exits.FAILED),
    (OSError("disk"), exits.FAILED), (FloatingPointError("nan loss"), exits.FAILED),
    (KeyboardInterrupt(), 130), (exits.Interrupted(15), 143)])
def test_one_ladder_from_an_error_to_an_exit_code(error, code, capsys):
    def body(_termination):
        raise error

    assert run_guarded(body, lambda _exc: "stopped") == code
    assert capsys.readouterr().err.count("\n") == 1
