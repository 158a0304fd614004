"""The example configs in examples/ are valid, as `fedgate config check` sees them once they
are installed the way their comments say: next to a `credentials/` folder holding the
identity's provisioned bundle, with the state and store folders where the units put them
(here: in a temporary root)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fedgate import provision

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
TOML = sorted(EXAMPLES.glob("*.toml"))


def install_example(name: str, etc: Path, root: Path, bundle: Path | None,
                    replace: dict[str, str] | None = None) -> Path:
    """Copy examples/NAME to ``etc``/NAME with /var/lib paths under ``root`` and the
    bundle as ``etc``/credentials; returns the installed file."""
    etc.mkdir(parents=True, exist_ok=True)
    text = (EXAMPLES / name).read_text().replace("/var/lib/", f"{root}/var/lib/")
    for old, new in (replace or {}).items():
        text = text.replace(old, new)
    if bundle is not None and not (etc / "credentials").exists():
        shutil.copytree(bundle, etc / "credentials")
    path = etc / name
    path.write_text(text)
    return path


def test_there_is_an_example_per_service() -> None:
    names = {p.name for p in TOML}
    assert {"aggregator.toml", "edge.toml", "bridge.toml"} <= names


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fleet") / "fleet"
    provision.init_ca(root, fleet="plant1")
    provision.provision_aggregator(root)
    provision.provision_device(root, "gw-turbine-1")
    return root


@pytest.mark.parametrize("name,bundle", [("aggregator.toml", "aggregator"),
                                         ("edge.toml", "devices/gw-turbine-1"),
                                         ("bridge.toml", None)])
def test_example_config_is_valid(tmp_path: Path, fleet: Path, name: str, bundle: str | None) -> None:
    path = install_example(name, tmp_path / "etc", tmp_path, fleet / bundle if bundle else None)
    proc = subprocess.run([sys.executable, "-m", "fedgate", "config", "check", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "valid" in proc.stdout


def test_a_broken_example_is_explained(tmp_path: Path) -> None:
    bad = tmp_path / "aggregator.toml"
    bad.write_text((EXAMPLES / "aggregator.toml").read_text().replace("rounds = 0 ", "rounds = -1 "))
    proc = subprocess.run([sys.executable, "-m", "fedgate", "config", "check", str(bad)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 78
    assert "rounds.rounds" in proc.stdout + proc.stderr and "-1" in proc.stdout + proc.stderr
