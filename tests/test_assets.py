"""Without the offline assets, the tests that need them are skipped with one line naming the folder and how to point
at it, and the others run; an assets folder missing some of its files fails them instead."""
import os
import re
import subprocess
import sys

from reference import ASSETS_ENV, REPO

# A real test file mixing tests that read the assets (through a fixture and directly) with tests that do not.
SUBSET = "tests/data/test_data_sources.py"


def run_subset(assets_dir, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", SUBSET, "-q", "-rs", "-p", "no:cacheprovider", *args],
                          cwd=REPO, env={**os.environ, ASSETS_ENV: str(assets_dir)}, capture_output=True, text=True,
                          timeout=600)


def test_absent_assets_skip_the_tests_needing_them_with_one_line(tmp_path):
    done = run_subset(tmp_path / "nowhere")
    assert done.returncode == 0, done.stdout[-3000:]
    skipped = [line for line in done.stdout.splitlines() if line.startswith("SKIPPED")]
    assert len(skipped) == 1, skipped
    assert all(fragment in skipped[0] for fragment in (str(tmp_path / "nowhere"), ASSETS_ENV, "../shared/assets"))
    summary = done.stdout.strip().splitlines()[-1]
    count = re.search(r"SKIPPED \[(\d+)\]", skipped[0]).group(1)
    assert re.match(rf"\d+ passed, {count} skipped in ", summary), summary


def test_incomplete_assets_fail_naming_the_missing_file(tmp_path):
    (tmp_path / "SHA256SUMS").write_text(f"{'0' * 64}  models/stories260K/model.safetensors\n")
    done = run_subset(tmp_path, "-k", "test_limit_takes_the_first_rows or test_empty_path")
    assert done.returncode == 1
    assert "offline test assets incomplete" in done.stdout and "models/stories260K/model.safetensors" in done.stdout
    assert re.search(r"1 passed, .*1 error", done.stdout.strip().splitlines()[-1])
