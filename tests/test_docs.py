"""What the README and model card promise a first-time user (issue 10, items 20, 23-25)."""

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_item20_readme_says_which_torch_build_pip_installs():
    assert "CUDA build" in README and "download.pytorch.org/whl/cpu" in README
    assert "`torch==2.13.0` is the CPU build" not in README  # only true on machines that keep the CPU wheel


def test_item23_quickstart_output_is_ignored_by_git(tmp_path):
    for path in ("restored/x.png", "routing/routing.md"):
        res = subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT)
        assert res.returncode == 0, f"{path} is not git-ignored"


def test_item24_upstream_is_cited_as_apache():
    cite = README[README.index("## Citation"):]
    assert "Apache License 2.0" in cite and "(MIT)" not in cite


def test_item25_model_card_warns_about_flat_inputs():
    card = (ROOT / "docs" / "model-card.md").read_text()
    assert "flat or synthetic inputs come out darker" in card
