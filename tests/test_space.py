"""The Hugging Face Space: weights and images go to Git LFS there (the Hub refuses large and
binary plain blobs), while this repository keeps plain blobs (CI clones it without git-lfs)."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SPACE = ROOT / "space"
DEMO_WEIGHTS = "checkpoints/hat-tuxpaint/model.safetensors"
HUB_PLAIN_LIMIT = 10 * 1024 * 1024
LFS_POINTER = b"version https://git-lfs"


def git(*args, cwd=ROOT, **kwargs) -> str:
    return subprocess.run(
        ["git", *args], cwd=cwd, check=True, capture_output=True, text=True, **kwargs
    ).stdout


@pytest.fixture(scope="module")
def tracked():
    if not (ROOT / ".git").exists() or shutil.which("git") is None:
        pytest.skip("not a git checkout")
    return [p for p in git("ls-files", "-z").split("\0") if p and (ROOT / p).is_file()]


def needs_lfs(path: Path) -> bool:
    """What the Hub refuses as a plain blob: over 10 MB, or binary (git's test: a NUL byte)."""
    with path.open("rb") as fh:
        return path.stat().st_size > HUB_PLAIN_LIMIT or b"\0" in fh.read(8000)


def lfs_paths(attributes: Path, paths: list[str], scratch: Path) -> set[str]:
    """The paths that ``attributes``, as a repository's .gitattributes, sends to Git LFS."""
    git("init", "-q", str(scratch))
    shutil.copy(attributes, scratch / ".gitattributes")
    out = git("check-attr", "filter", "--stdin", "-z", cwd=scratch, input="\0".join(paths))
    fields = out.split("\0")[:-1]  # path, attribute, value; NUL-terminated
    triples = zip(fields[::3], fields[1::3], fields[2::3], strict=True)
    return {path for path, _, value in triples if value == "lfs"}


def test_the_space_stores_every_large_or_binary_file_in_lfs(tracked, tmp_path):
    binary = [p for p in tracked if needs_lfs(ROOT / p)]
    assert DEMO_WEIGHTS in binary and any(p.endswith(".jpg") for p in binary)
    in_lfs = lfs_paths(SPACE / "gitattributes", tracked, tmp_path / "scratch")
    assert sorted(set(binary) - in_lfs) == []
    assert not {"app.py", "README.md", "checkpoints/hat-tuxpaint/config.json"} & in_lfs


def test_this_repository_keeps_the_demo_weights_as_a_plain_blob(tracked):
    assert git("check-attr", "filter", "--", DEMO_WEIGHTS).strip().endswith("unspecified")
    with (ROOT / DEMO_WEIGHTS).open("rb") as fh:
        assert fh.read(len(LFS_POINTER)) != LFS_POINTER


def test_the_build_script_needs_git_lfs(tmp_path):
    bin_dir = tmp_path / "bin"  # a PATH with git but without git-lfs
    bin_dir.mkdir()
    for tool in ("git", "dirname"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    result = subprocess.run(
        [shutil.which("bash"), str(SPACE / "build.sh"), str(tmp_path / "space")],
        env={**os.environ, "PATH": str(bin_dir)},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1 and "git-lfs is needed" in result.stderr
    assert not (tmp_path / "space").exists()


@pytest.mark.skipif(
    subprocess.run(["git", "lfs", "version"], capture_output=True).returncode != 0
    and not os.environ.get("CI"),
    reason="git-lfs is not installed (make test installs it; in CI this test must run)",
)
def test_the_build_script_makes_one_commit_with_lfs_objects(tracked, tmp_path):
    out = tmp_path / "space"
    identity = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t"}
    identity["GIT_COMMITTER_EMAIL"] = "t@t"
    subprocess.run([str(SPACE / "build.sh"), str(out)], check=True, env={**os.environ, **identity})
    assert git("rev-list", "--count", "HEAD", cwd=out).strip() == "1"
    assert DEMO_WEIGHTS in git("lfs", "ls-files", "--name-only", cwd=out).split("\n")
    stored = git("cat-file", "-p", f"HEAD:{DEMO_WEIGHTS}", cwd=out)
    size = (ROOT / DEMO_WEIGHTS).stat().st_size
    assert stored.startswith(LFS_POINTER.decode()) and f"size {size}\n" in stored
    assert (out / DEMO_WEIGHTS).read_bytes() == (ROOT / DEMO_WEIGHTS).read_bytes()
    assert (out / ".gitattributes").read_text() == (SPACE / "gitattributes").read_text()
