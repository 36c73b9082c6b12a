"""records.environment() names the code's commit: ``git rev-parse HEAD`` of the package's
repository, ``-dirty`` when a tracked file differs from it, None outside a checkout or
without git, and never an error."""

import os
import shutil
import subprocess

import pytest

from fedredefense_jax import records

needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


def _git(repo, *args) -> str:
    env = dict(os.environ, GIT_AUTHOR_NAME="a", GIT_AUTHOR_EMAIL="a@b", GIT_COMMITTER_NAME="a",
               GIT_COMMITTER_EMAIL="a@b")
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True,
                          env=env).stdout.strip()


@needs_git
def test_git_commit_is_head_and_dirty_when_a_tracked_file_changed(tmp_path):
    repo = tmp_path / "repo"
    (repo / "pkg").mkdir(parents=True)
    _git(repo, "init", "-q")
    (repo / "pkg" / "code.py").write_text("x = 1\n")
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "code")
    head = _git(repo, "rev-parse", "HEAD")
    assert records.git_commit(str(repo / "pkg")) == head
    (repo / "pkg" / "new.py").write_text("")  # untracked: still the commit's code
    assert records.git_commit(str(repo / "pkg")) == head
    (repo / "pkg" / "code.py").write_text("x = 2\n")
    assert records.git_commit(str(repo / "pkg")) == head + "-dirty"


def test_git_commit_is_none_outside_a_checkout_or_without_git(tmp_path, monkeypatch):
    assert records.git_commit(str(tmp_path)) is None
    monkeypatch.setenv("PATH", str(tmp_path))  # no git on the path
    assert records.git_commit() is None


def test_environment_records_the_commit():
    env = records.environment()
    assert env["git_commit"] == records.git_commit()
    checkout = os.path.dirname(os.path.dirname(os.path.abspath(records.__file__)))
    if os.path.exists(os.path.join(checkout, ".git")) and shutil.which("git"):  # a file in a worktree
        assert len(env["git_commit"].removesuffix("-dirty")) == 40


def test_a_run_of_the_attacks_earlier_revision_is_not_resumed_with_todays(tmp_path):
    from fedredefense_jax.config import ConfigError, ExperimentConfig

    cfg = ExperimentConfig(num_clients=6, num_malicious=2, attack="min_sum", rounds=2, output_dir=str(tmp_path))
    earlier = records.recorded_config(cfg)
    del earlier["attacks_revision"]
    earlier["attack_config"] = {"gamma_init": 10.0}  # as given before lone_attacker existed
    records.write_json(os.path.join(tmp_path, records.CONFIG), earlier)
    open(os.path.join(tmp_path, records.ROUNDS), "w").close()
    with pytest.raises(ConfigError, match="attacks_revision: 1 -> 2"):
        records.prepare_output_dir(cfg)
    today = records.recorded_config(cfg)
    records.write_json(os.path.join(tmp_path, records.CONFIG), today)
    records.prepare_output_dir(cfg)  # the same revision resumes


def test_round_differences_ignore_timings_and_fields_one_side_lacks():
    a = [{"round": 1, "flagged": [2], "train_s": 1.0, "error": [0.5]}, {"round": 2, "flagged": []}]
    b = [{"round": 1, "flagged": [2], "train_s": 9.0, "error": [0.5], "to_gamma": [3]}, {"round": 2, "flagged": []}]
    assert records.round_differences(a, b) == []
    assert records.round_differences(a, b, shared_only=False) == ["round 1: to_gamma: None != [3]"]
    b[1]["flagged"] = [1]
    assert records.round_differences(a, b) == ["round 2: flagged: [] != [1]"]
    assert records.round_differences(a, b[:1]) == ["round 2: only in the first run"]
