"""Artifacts on remote storage: the default DVC remote, an S3 remote, and what gets cached.

Fast checks (always run):
* dvc.yaml keeps the model outputs (models/base, models/trained) in the DVC cache, so that
  `dvc push`/`dvc pull`/`dvc checkout` cover them; switching one to `cache: false` (see
  docs/remote.md) must be a deliberate change that also edits this test.
* .dvc/config names a default remote that is a local directory *beside* the repository (a
  relative URL resolving outside the repo's tree), so a fresh clone can `make push` with no setup.
* `make -n push` / `make -n pull` run the venv's dvc.

Integration (marked slow; seconds, not minutes): a tiny two-stage DVC repo in tmp_path (not the
real pipeline) is reproduced, pushed, wiped, pulled, and must then be up to date with nothing to
rerun -- once against a real S3 API on loopback (moto's server + the dvc-s3 plugin) and once
against the repo's own default remote definition (its relative URL lands inside tmp_path).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
MODEL_OUTS = ("models/base", "models/trained")


# --------------------------------------------------------------------------------------------
# Fast checks
# --------------------------------------------------------------------------------------------


def _outs(dvc_yaml: dict) -> dict[str, dict]:
    """{path: options} for every `outs` entry of every stage (options {} when given bare)."""
    found: dict[str, dict] = {}
    for name, stage in (dvc_yaml.get("stages") or {}).items():
        for entry in stage.get("outs") or []:
            if isinstance(entry, str):
                found[entry] = {}
            elif isinstance(entry, dict) and len(entry) == 1:
                (path, opts), = entry.items()
                found[path] = dict(opts or {})
            else:
                raise AssertionError(f"dvc.yaml: stage {name!r}: unreadable outs entry {entry!r}")
    return found


def test_model_outputs_are_cached_by_default():
    outs = _outs(yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8")))
    for path in MODEL_OUTS:
        assert path in outs, f"dvc.yaml: {path} is no longer a stage output"
        assert outs[path].get("cache", True) is True, (
            f"dvc.yaml: {path} has cache: {outs[path]['cache']!r}; model outputs are cached by "
            "default (docs/remote.md says when to turn that off) -- update this test if deliberate"
        )
        assert outs[path].get("push", True) is True, f"dvc.yaml: {path} is excluded from dvc push"
    # Every output under models/ is covered, not only the two named ones.
    for path, opts in outs.items():
        if path.startswith("models/"):
            assert opts.get("cache", True) is True, f"dvc.yaml: {path} has cache: false"


def _repo_config() -> tuple[str, str]:
    """(default remote name, its url) from the committed .dvc/config (not config.local)."""
    from configobj import ConfigObj

    cfg = ConfigObj(str(ROOT / ".dvc" / "config"))
    name = cfg.get("core", {}).get("remote")
    assert name, ".dvc/config: no default remote ([core] remote = ...)"
    section = f'remote "{name}"'
    assert section in cfg, f".dvc/config: default remote {name!r} has no [{section}] section"
    url = cfg[section].get("url")
    assert url, f".dvc/config: remote {name!r} has no url"
    return name, url


def test_default_remote_is_a_local_dir_beside_the_repo():
    name, url = _repo_config()
    assert "://" not in url, f".dvc/config: default remote {name!r} is not a local directory: {url}"
    assert not os.path.isabs(url), (
        f".dvc/config: default remote {name!r} has an absolute path {url}: it would not follow a "
        "fresh clone to another machine; use a path relative to .dvc/"
    )
    # DVC resolves a relative remote path against the directory of the config file.
    resolved = (ROOT / ".dvc" / url).resolve()
    assert not resolved.is_relative_to(ROOT.resolve()), (
        f".dvc/config: default remote {name!r} resolves to {resolved}, inside the repository"
    )


@pytest.mark.skipif(shutil.which("make") is None, reason="make not installed")
@pytest.mark.parametrize("verb", ["push", "pull"])
def test_make_push_pull_use_the_venv_dvc(verb):
    out = subprocess.run(["make", "-n", verb], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = [ln for ln in out.stdout.splitlines() if f"dvc {verb}" in ln]
    assert lines, f"`make -n {verb}` runs no `dvc {verb}`:\n{out.stdout}"
    assert "/bin:" in lines[-1] and "PATH=" in lines[-1], f"not through the venv's PATH: {lines[-1]}"


# --------------------------------------------------------------------------------------------
# Integration: push, wipe, pull on a tiny DVC repo
# --------------------------------------------------------------------------------------------

# Two stages shaped like the real ones: prepare writes a data folder and a base "model" folder,
# train reads both and writes a trained "model" folder plus a git-tracked metrics file. Each run
# appends the stage name to a log outside the repo, so "reran nothing" is checked, not assumed.
PIPE_PY = '''\
import json, sys
from pathlib import Path

stage, log = sys.argv[1], sys.argv[2]
with open(log, "a", encoding="utf-8") as f:
    f.write(stage + "\\n")
if stage == "prepare":
    Path("data/prepare").mkdir(parents=True, exist_ok=True)
    rows = [{"id": i, "problem": f"{i} + {i}", "answer": str(2 * i)} for i in range(20)]
    Path("data/prepare/train.jsonl").write_text("".join(json.dumps(r) + "\\n" for r in rows))
    Path("models/base").mkdir(parents=True, exist_ok=True)
    Path("models/base/config.json").write_text(json.dumps({"hidden_size": 8}))
    Path("models/base/model.safetensors").write_bytes(bytes(range(256)) * 64)
elif stage == "train":
    rows = Path("data/prepare/train.jsonl").read_text().splitlines()
    base = Path("models/base/model.safetensors").read_bytes()
    Path("models/trained").mkdir(parents=True, exist_ok=True)
    Path("models/trained/config.json").write_text(json.dumps({"hidden_size": 8, "steps": len(rows)}))
    Path("models/trained/model.safetensors").write_bytes(bytes((b + len(rows)) % 256 for b in base))
    Path("metrics").mkdir(exist_ok=True)
    Path("metrics/train.json").write_text(json.dumps({"loss": 0.5, "rows": len(rows)}))
else:
    raise SystemExit(f"unknown stage {stage}")
'''

# What dvc push/pull carry; metrics/train.json is git-tracked (cache: false), like the real metrics/.
CACHED_OUTS = ("data/prepare", "models/base", "models/trained")


def _dvc_yaml(log: Path) -> dict:
    def cmd(stage):
        return " ".join(shlex.quote(a) for a in (sys.executable, "pipe.py", stage, str(log)))

    return {
        "stages": {
            "prepare": {"cmd": cmd("prepare"), "deps": ["pipe.py"], "outs": ["data/prepare", "models/base"]},
            "train": {
                "cmd": cmd("train"),
                "deps": ["pipe.py", "data/prepare", "models/base"],
                "outs": ["models/trained"],
                "metrics": [{"metrics/train.json": {"cache": False}}],
            },
        }
    }


def _env(tmp_path: Path) -> dict[str, str]:
    """Subprocess env isolated from the user's DVC/git/AWS configuration."""
    env = dict(os.environ)
    for key in list(env):
        if key.startswith("AWS_") or key in ("BOTO_CONFIG",):
            del env[key]
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    gitconfig = home / ".gitconfig"
    gitconfig.write_text("[user]\n\tname = drsft test\n\temail = test@example.invalid\n")
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        DVC_NO_ANALYTICS="1",
        DVC_GLOBAL_CONFIG_DIR=str(home / "dvc-global"),
        DVC_SYSTEM_CONFIG_DIR=str(home / "dvc-system"),
        DVC_SITE_CACHE_DIR=str(home / "dvc-site-cache"),
        GIT_CONFIG_GLOBAL=str(gitconfig),
        GIT_CONFIG_NOSYSTEM="1",
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_CONFIG_FILE=str(home / "aws-config-absent"),
        AWS_SHARED_CREDENTIALS_FILE=str(home / "aws-credentials-absent"),
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
    )
    return env


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> str:
    if args[0] == "dvc":
        args = [sys.executable, "-m", "dvc", *args[1:]]
    out = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"{' '.join(args)} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}"
    return out.stdout


def _make_repo(repo: Path, log: Path, env: dict[str, str]) -> None:
    repo.mkdir()
    _run(["git", "init", "-q"], repo, env)
    _run(["dvc", "init", "-q"], repo, env)
    (repo / "pipe.py").write_text(PIPE_PY)
    (repo / "dvc.yaml").write_text(yaml.safe_dump(_dvc_yaml(log), sort_keys=False))


def _snapshot(repo: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(repo)): p.read_bytes()
        for d in (*CACHED_OUTS, "metrics")
        for p in sorted((repo / d).rglob("*"))
        if p.is_file()
    }


def _wipe(repo: Path) -> None:
    """Delete the DVC cache (and its index under .dvc/tmp) and every cached output."""
    for d in (".dvc/cache", ".dvc/tmp", *CACHED_OUTS):
        shutil.rmtree(repo / d)
    assert not any((repo / d).exists() for d in (*CACHED_OUTS, ".dvc/cache"))


def _status_json(repo: Path, env: dict[str, str], *extra: str) -> dict:
    return json.loads(_run(["dvc", "status", "--json", *extra], repo, env) or "{}")


def _assert_restored(repo: Path, before: dict[str, bytes], log: Path, env: dict[str, str]) -> None:
    """After a pull: same bytes, nothing stale, and `dvc repro` reruns no stage."""
    assert _snapshot(repo) == before
    assert _status_json(repo, env) == {}
    runs = log.read_text().splitlines()
    _run(["dvc", "repro"], repo, env)
    assert log.read_text().splitlines() == runs, "dvc repro reran a stage after dvc pull"
    assert _status_json(repo, env) == {}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_push_wipe_pull_through_s3(tmp_path):
    # From the dev extra (pip install -e ".[dev]"): fail, not skip, when they are missing.
    import boto3
    import dvc_s3  # noqa: F401  (the plugin `dvc push` needs for s3:// remotes)
    from moto import server as server_mod

    env = _env(tmp_path)
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        s3 = boto3.client(
            "s3", endpoint_url=endpoint, region_name="us-east-1",
            aws_access_key_id="testing", aws_secret_access_key="testing",
        )
        s3.create_bucket(Bucket="drsft-artifacts")

        repo, log = tmp_path / "repo", tmp_path / "runs.log"
        _make_repo(repo, log, env)
        _run(["dvc", "remote", "add", "-d", "s3", "s3://drsft-artifacts/dvc"], repo, env)
        _run(["dvc", "remote", "modify", "s3", "endpointurl", endpoint], repo, env)

        _run(["dvc", "repro"], repo, env)
        assert log.read_text().splitlines() == ["prepare", "train"]
        before = _snapshot(repo)
        assert {"models/base/model.safetensors", "models/trained/model.safetensors",
                "data/prepare/train.jsonl", "metrics/train.json"} <= set(before)

        _run(["dvc", "push"], repo, env)
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket="drsft-artifacts").get("Contents", [])]
        assert keys and all(k.startswith("dvc/files/md5/") for k in keys), keys
        # 3 dirs (a .dir manifest each) + 5 files; metrics/train.json is not cached, so not pushed.
        assert len(keys) == 8, keys
        assert _status_json(repo, env, "--cloud") == {}

        _wipe(repo)

        _run(["dvc", "pull"], repo, env)
        _assert_restored(repo, before, log, env)
    finally:
        server.stop()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_default_local_remote_push_then_pull_into_fresh_clone(tmp_path):
    env = _env(tmp_path)
    name, url = _repo_config()
    repo, log = tmp_path / "repo", tmp_path / "runs.log"
    _make_repo(repo, log, env)
    # The repo's actual remote definition. Its relative URL resolves against repo/.dvc, so here it
    # lands beside the tmp repo, inside tmp_path: never the developer's real remote.
    shutil.copyfile(ROOT / ".dvc" / "config", repo / ".dvc" / "config")
    remote_dir = (repo / ".dvc" / url).resolve()
    assert remote_dir.is_relative_to(tmp_path.resolve()), f"remote {url} escapes tmp_path: {remote_dir}"
    assert _run(["dvc", "remote", "default"], repo, env).strip() == name

    _run(["dvc", "repro"], repo, env)
    before = _snapshot(repo)
    _run(["dvc", "push"], repo, env)  # creates the remote directory: no manual step
    pushed = [p for p in (remote_dir / "files" / "md5").rglob("*") if p.is_file()]
    assert len(pushed) == 8, pushed
    assert _status_json(repo, env, "--cloud") == {}

    # A fresh clone has only git's files: no cache, no outputs. Cloned beside the repo, its
    # relative remote URL resolves to the same directory.
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-q", "-m", "pipeline"], repo, env)
    clone = tmp_path / "clone"
    _run(["git", "clone", "-q", str(repo), str(clone)], tmp_path, env)
    assert not any((clone / d).exists() for d in (*CACHED_OUTS, ".dvc/cache"))
    assert (clone / "metrics" / "train.json").exists()  # git-tracked, not from the remote

    _run(["dvc", "pull"], clone, env)
    _assert_restored(clone, before, log, env)

    # And the in-place wipe of the original repo (cache + outputs) restores the same way.
    _wipe(repo)
    _run(["dvc", "pull"], repo, env)
    _assert_restored(repo, before, log, env)
