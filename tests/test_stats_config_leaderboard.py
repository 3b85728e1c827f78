"""CI formula, config loading/validation and the leaderboard file."""

import io
import math
import os
import stat
from pathlib import Path

import pandas as pd
import pytest

from fewshot_nsl.cli.main import run
from fewshot_nsl.config import RunConfig, load_config
from fewshot_nsl.data.registry import dataset_spec
from fewshot_nsl.errors import UserError
from fewshot_nsl.learners import build_learner
from fewshot_nsl.results import leaderboard
from fewshot_nsl.results.provenance import provenance
from fewshot_nsl.results.stats import confidence_interval


def test_confidence_interval_matches_hand_computation():
    accs = [0.8, 0.9, 1.0, 0.7]
    # mean 0.85; sample variance = (0.0025+0.0025+0.0225+0.0225)/3 = 0.05/3
    summary = confidence_interval(accs)
    assert summary.mean == pytest.approx(0.85)
    assert summary.ci95 == pytest.approx(1.96 * math.sqrt(0.05 / 3) / 2)
    assert str(summary) == "acc 85.00 ± 12.65 (95% CI, 4 episodes)"


def test_confidence_interval_needs_episodes():
    with pytest.raises(ValueError):
        confidence_interval([])


def test_yaml_config_and_unknown_keys(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("method: protonet\nways: 60\nshots: 1\n")
    config = load_config(good)
    assert (config.ways, config.shots, config.queries) == (60, 1, None)
    assert config.resolve().queries == 5  # ProtoNet's default (Snell et al.: 5 queries in training)
    bad = tmp_path / "bad.yaml"
    bad.write_text("ways: 5\nwayz: 7\n")
    with pytest.raises(UserError, match="unknown config key\\(s\\) wayz \\(did you mean ways\\?\\); valid keys: method, backbone"):
        load_config(bad)
    typed = tmp_path / "typed.yaml"
    typed.write_text("ways: five\n")
    with pytest.raises(UserError, match="config key ways must be an integer, got 'five'"):
        load_config(typed)
    typed.write_text("lr: 1e-3\nfirst_order: true\n")  # YAML reads 1e-3 as text
    assert load_config(typed).lr == 0.001
    with pytest.raises(UserError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "broken.yaml").write_text("ways: [5\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(tmp_path / "broken.yaml")


def test_resolve_fills_recipe_defaults_per_dataset():
    # Field by field against the papers: tests/test_maml_recipe.py. Here: the dataset decides.
    omniglot = RunConfig(method="maml", ways=5, shots=1).resolve()
    assert (omniglot.inner_lr, omniglot.inner_steps, omniglot.eval_inner_steps, omniglot.meta_batch, omniglot.width) == (0.4, 1, 3, 32, 64)
    mini = RunConfig(method="maml", dataset="miniimagenet", ways=5, shots=1).resolve()
    assert (mini.inner_lr, mini.inner_steps, mini.eval_inner_steps, mini.meta_batch, mini.width) == (0.01, 5, 10, 4, 32)
    assert RunConfig().resolve().channels_last is True and mini.channels_last is False
    assert RunConfig(method="maml", inner_lr=0.1).resolve().inner_lr == 0.1
    with pytest.raises(UserError, match="unknown method"):
        RunConfig(method="knn").resolve()
    with pytest.raises(UserError, match="shots must be >= 1"):
        RunConfig(shots=0).resolve()


SHIPPED_CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=lambda p: p.stem)
def test_every_shipped_config_loads_and_builds(path: Path):
    config = load_config(path).resolve()
    spec = dataset_spec(config.dataset)
    channels = 1 if config.dataset == "omniglot" else 3
    learner = build_learner(config, (channels, spec.image_size, spec.image_size))
    assert sum(p.numel() for p in learner.parameters()) > 10_000


def test_shipped_configs_exist():
    assert len(SHIPPED_CONFIGS) >= 7


def row(acc, **extra):
    return {"method": "protonet", "backbone": "conv4", "similarity": "conv", "dataset": "omniglot",
            "protocol": "vinyals", "ways": 5, "shots": 1, "acc": acc, "ci95": 0.01, "run_dir": f"runs/{acc}"} | extra


def test_leaderboard_appends_ranks_and_keeps_rows(tmp_path):
    path = tmp_path / "board.csv"
    leaderboard.append(path, row(0.9))
    leaderboard.append(path, row(0.95))
    leaderboard.append(path, row(0.5, ways=20, custom_note="kept"))
    frame = leaderboard.read(path)
    assert len(frame) == 3 and "custom_note" in frame.columns
    table = leaderboard.ranked(frame, {"ways": "5"})
    assert table["acc"].tolist() == [0.95, 0.9] and table["rank"].tolist() == [1, 2]
    text = leaderboard.render(table, "markdown")
    assert text.splitlines()[2].startswith("| 1 | omniglot | vinyals | 5 | 1 | protonet")
    assert "95.0" in text
    csv_text = leaderboard.render(table, "csv")
    assert csv_text.splitlines()[0].startswith("rank,dataset")


def test_leaderboard_refuses_a_broken_file_without_touching_it(tmp_path):
    path = tmp_path / "board.csv"
    path.write_text("not,a\nleaderboard,file\n")
    before = path.read_text()
    with pytest.raises(UserError, match="lacks the column"):
        leaderboard.append(path, row(0.9))
    assert path.read_text() == before


def test_hand_edited_rows_are_refused_and_a_backup_precedes_every_rewrite(tmp_path):
    path = tmp_path / "board.csv"
    leaderboard.append(path, row(0.9))
    first = path.read_text()
    leaderboard.append(path, row(0.8))
    assert (tmp_path / "board.csv.bak").read_text() == first  # the version before the last rewrite
    edited = path.read_text().replace("0.8,", "eighty,")
    path.write_text(edited)
    with pytest.raises(UserError, match="row 3 has acc 'eighty'.*board.csv.bak"):
        leaderboard.append(path, row(0.7))
    assert path.read_text() == edited


def test_leaderboard_filters_and_groups_by_any_column(tmp_path):
    path = tmp_path / "board.csv"
    for acc, head in ((0.9, "zero"), (0.8, "learned"), (0.85, "learned")):
        leaderboard.append(path, row(acc, method="maml", maml_head=head))
    frame = leaderboard.read(path)
    learned = leaderboard.ranked(frame, {"maml_head": "learned"})
    assert learned["acc"].tolist() == [0.85, 0.8]
    grouped = leaderboard.ranked(frame, group_by=["maml_head"])
    assert dict(zip(grouped["acc"], grouped["rank"])) == {0.85: 1, 0.8: 2, 0.9: 1}
    assert "maml_head" in leaderboard.render(grouped, "csv", ["maml_head"]).splitlines()[0]
    with pytest.raises(UserError, match="no column 'colour'"):
        leaderboard.ranked(frame, {"colour": "red"})


def test_leaderboard_plot(tmp_path):
    path = tmp_path / "board.csv"
    for acc in (0.9, 0.8):
        leaderboard.append(path, row(acc))
    leaderboard.plot(leaderboard.ranked(leaderboard.read(path)), tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    "eval_dirty,sessions,expected",
    [
        (False, ["abc1234"], "clean"),
        (False, ["abc1234", "def5678"], "clean"),  # resumed at another clean commit
        (True, ["abc1234"], "dirty"),
        (False, ["abc1234", "def5678+dirty"], "dirty"),  # one training session ran uncommitted code
        (None, ["abc1234+dirty"], "dirty"),
        (False, None, "unverified"),  # a run trained before sessions were recorded
        (False, ["unknown"], "unverified"),  # trained outside a git checkout
        (float("nan"), ["abc1234"], "unverified"),  # a row written before git_dirty existed
    ],
)
def test_provenance_is_clean_only_when_every_session_and_the_evaluation_were_committed(eval_dirty, sessions, expected):
    assert provenance(eval_dirty, sessions) == expected


def test_hashes_of_digits_stay_text(tmp_path):
    path = tmp_path / "board.csv"
    leaderboard.append(path, row(0.9, git_commit="0508319", config_hash="123456789012"))
    read_back = leaderboard.read(path).iloc[0]
    assert (read_back["git_commit"], read_back["config_hash"]) == ("0508319", "123456789012")


def test_rows_from_before_git_dirty_existed_read_as_unverified(tmp_path):
    path = tmp_path / "board.csv"
    pd.DataFrame([{"method": "protonet", "dataset": "omniglot", "acc": 0.9}]).to_csv(path, index=False)
    assert leaderboard.read(path)["provenance"].tolist() == ["unverified"]


def test_old_rows_are_marked_unverified_or_dirty_and_the_mark_is_written_back(tmp_path):
    path = tmp_path / "board.csv"
    old = pd.DataFrame([row(0.9, git_commit="aaa1111"), row(0.8, git_commit="bbb2222", git_dirty=True),
                        row(0.7, git_commit="ccc3333", git_dirty=False)])  # fmt: skip
    old.to_csv(path, index=False)  # as written before provenance existed
    assert leaderboard.read(path)["provenance"].tolist() == ["unverified", "dirty", "unverified"]
    leaderboard.append(path, row(0.6, provenance="clean"))
    on_disk = pd.read_csv(path)
    assert on_disk["provenance"].tolist() == ["unverified", "dirty", "unverified", "clean"]
    assert "provenance" in leaderboard.render(leaderboard.ranked(leaderboard.read(path)), "csv").splitlines()[0]

    old.to_csv(path, index=False)
    leaderboard.mark_provenance(path)  # without a new row
    assert pd.read_csv(path)["provenance"].tolist() == ["unverified", "dirty", "unverified"]
    assert "provenance" not in pd.read_csv(leaderboard.backup_path(path)).columns


def test_integer_columns_with_blanks_filter_as_integers_and_stay_integers(tmp_path):
    path = tmp_path / "board.csv"
    leaderboard.append(path, row(0.9))  # no nsl_hidden: a blank
    leaderboard.append(path, row(0.8, nsl_hidden=64))
    leaderboard.append(path, row(0.7, nsl_hidden=32))
    assert pd.read_csv(path, dtype=str)["nsl_hidden"].tolist()[1:] == ["64", "32"]  # not rewritten as 64.0
    assert leaderboard.ranked(leaderboard.read(path), {"nsl_hidden": "64"})["acc"].tolist() == [0.8]
    # a file that already says 64.0 (written before): the filter still matches, the file keeps its text
    old = tmp_path / "old.csv"
    pd.DataFrame([row(0.9), row(0.8, nsl_hidden=64.0)]).to_csv(old, index=False)
    assert leaderboard.ranked(leaderboard.read(old), {"nsl_hidden": "64"})["acc"].tolist() == [0.8]
    assert leaderboard.ranked(leaderboard.read(old), {"nsl_hidden": "64.0"})["acc"].tolist() == [0.8]


def test_committed_leaderboards_read_and_rewrite_unchanged(tmp_path):
    for committed in sorted((Path(__file__).parents[1] / "benchmarks" / "results").glob("*leaderboard.csv")):
        copy = tmp_path / committed.name
        copy.write_bytes(committed.read_bytes())
        leaderboard.mark_provenance(copy)  # they have the provenance column: a rewrite must not change a byte
        assert copy.read_bytes() == committed.read_bytes(), committed.name


def test_rewrites_keep_the_files_permissions(tmp_path):
    path = tmp_path / "board.csv"
    leaderboard.append(path, row(0.9))
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    path.chmod(0o640)
    leaderboard.append(path, row(0.8))
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


def test_leaderboard_command_checks_the_plot_path_first_and_keeps_status_off_stdout(tmp_path, capsys):
    path = tmp_path / "board.csv"
    leaderboard.append(path, row(0.9))
    for plot, message in ((tmp_path / "missing" / "p.png", "does not exist"), (tmp_path / "p.xyz", "cannot write .xyz")):
        assert run(["leaderboard", "--csv", str(path), "--plot", str(plot)]) == 2
        assert message in capsys.readouterr().err
    assert run(["leaderboard", "--csv", str(path), "--format", "csv", "--plot", str(tmp_path / "p.png"), "--mark-provenance"]) == 0
    out, err = capsys.readouterr()
    assert len(pd.read_csv(io.StringIO(out))) == 1 and "plot written" in err and "provenance written" in err
