"""`fedgate config check FILE` without a broker: files, certificates, keys, --user."""

from __future__ import annotations

import io
import os
import pwd
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedgate.cli_config import check_file
from fedgate.preflight import Finding, Subject

FLEET = "plant"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fedgate import provision

    root = tmp_path_factory.mktemp("check") / "fleet"
    provision.init_ca(root, fleet=FLEET)
    provision.provision_aggregator(root)
    for name in ("gw1", "gw2"):
        provision.provision_device(root, name)
    rogue = root.parent / "rogue"
    provision.init_ca(rogue, fleet=FLEET)
    provision.provision_device(rogue, "gw1")
    return root


def edge_toml(path: Path, bundle: Path, *, device: str = "gw1", url: str = "mqtts://127.0.0.1:8883",
              ca: Path | None = None, cert: Path | None = None, key: Path | None = None,
              state: Path | None = None, security: bool = True) -> Path:
    """An edge config using ``bundle``'s credentials (any file can be swapped)."""
    lines = [
        "[device]", f'id = "{device}"', f'fleet = "{FLEET}"', 'task = "wind"',
        "[broker]", f'url = "{url}"',
    ]
    if url.startswith("mqtts://"):
        lines += [f'ca_file = "{ca or bundle / "ca.crt"}"', f'cert_file = "{cert or bundle / "client.crt"}"',
                  f'key_file = "{key or bundle / "client.key"}"']
    if security:
        lines += ["[security]", f'keyring = "{bundle / "keyring.json"}"',
                  f'signing_key = "{bundle / "signing.key"}"']
    lines += ["[data]", 'source = "dataset"', 'dataset = "wind"', 'unit = "R80711"',
              "[state]", f'dir = "{state or path.parent / "state"}"']
    path.write_text("\n".join(lines) + "\n")
    return path


def aggregator_toml(path: Path, bundle: Path, *, url: str = "mqtts://127.0.0.1:8883",
                    client_id: str = "aggregator") -> Path:
    path.write_text("\n".join([
        "[task]", f'fleet = "{FLEET}"', 'name = "wind"',
        "[broker]", f'url = "{url}"', f'client_id = "{client_id}"',
        f'ca_file = "{bundle / "ca.crt"}"', f'cert_file = "{bundle / "client.crt"}"',
        f'key_file = "{bundle / "client.key"}"',
        "[security]", f'keyring = "{bundle / "keyring.json"}"', f'signing_key = "{bundle / "signing.key"}"',
        "[model]", "layer_sizes = [5, 8, 1]", 'scaling = "none"',
        "[state]", f'dir = "{path.parent / "agg-state"}"',
    ]) + "\n")
    return path


def check(path: Path, **kwargs: object) -> tuple[int, list[str]]:
    out = io.StringIO()
    code = check_file(str(path), out=out, **kwargs)  # type: ignore[arg-type]
    return code, out.getvalue().splitlines()


def problems(lines: list[str]) -> list[str]:
    return [line for line in lines if line.startswith("PROBLEM")]


def copy_bundle(fleet: Path, tmp_path: Path, name: str = "gw1") -> Path:
    return Path(shutil.copytree(fleet / "devices" / name, tmp_path / name))


def test_a_good_edge_config_is_ready(fleet: Path, tmp_path: Path) -> None:
    code, lines = check(edge_toml(tmp_path / "edge.toml", fleet / "devices" / "gw1"))
    assert code == 0, lines
    assert lines[0].endswith("valid edge config")
    assert not problems(lines)
    assert any(line.startswith("ok       certificate name: CN 'gw1'") for line in lines)
    assert any(line.startswith("ok       certificate chain:") for line in lines)
    assert any(line.startswith("ok       signing:") for line in lines)
    assert lines[-1].startswith(f"{tmp_path / 'edge.toml'}: ready to run")
    assert "add --live" in lines[-1]


def test_a_good_aggregator_config_is_ready(fleet: Path, tmp_path: Path) -> None:
    code, lines = check(aggregator_toml(tmp_path / "aggregator.toml", fleet / "aggregator"))
    assert code == 0, lines
    assert any("CN 'aggregator' of broker.cert_file equals broker.client_id" in line for line in lines)


def test_missing_key_file_exits_78_naming_file_and_key(fleet: Path, tmp_path: Path) -> None:
    bundle = copy_bundle(fleet, tmp_path)
    (bundle / "client.key").unlink()
    config = edge_toml(tmp_path / "edge.toml", bundle)
    code, lines = check(config)
    assert code == 78
    [line, *_] = problems(lines)
    assert line == (f"PROBLEM  file: {config}: key 'broker.key_file' = '{bundle / 'client.key'}': "
                    f"cannot read the file: No such file or directory (as {pwd.getpwuid(os.geteuid()).pw_name}) (exit 78)")
    assert "would exit 78" in lines[-1]


def test_syntax_only_keeps_the_contents_only_check(fleet: Path, tmp_path: Path) -> None:
    bundle = copy_bundle(fleet, tmp_path)
    (bundle / "client.key").unlink()
    code, lines = check(edge_toml(tmp_path / "edge.toml", bundle), syntax_only=True)
    assert code == 0 and lines[0].endswith("valid edge config") and not problems(lines)


def test_certificate_name_differing_from_the_device_id_exits_77(fleet: Path, tmp_path: Path) -> None:
    config = edge_toml(tmp_path / "edge.toml", fleet / "devices" / "gw1", device="gw9")
    code, lines = check(config)
    assert code == 77
    name_problems = [line for line in problems(lines) if line.startswith("PROBLEM  certificate name")]
    assert len(name_problems) == 2  # device.id and broker.client_id (which defaults to it)
    assert f"{config}: key 'device.id' = 'gw9'" in name_problems[0]
    assert "is issued to 'gw1'" in name_problems[0] and 'Set device.id = "gw1"' in name_problems[0]


def test_key_of_another_identity_exits_78(fleet: Path, tmp_path: Path) -> None:
    config = edge_toml(tmp_path / "edge.toml", fleet / "devices" / "gw1",
                       key=fleet / "devices" / "gw2" / "client.key")
    code, lines = check(config)
    assert code == 78
    assert any("key 'broker.key_file'" in line and "does not belong to the certificate" in line
               for line in problems(lines))


def test_certificate_from_another_fleet_exits_78(fleet: Path, tmp_path: Path) -> None:
    rogue = fleet.parent / "rogue" / "devices" / "gw1"
    config = edge_toml(tmp_path / "edge.toml", fleet / "devices" / "gw1",
                       cert=rogue / "client.crt", key=rogue / "client.key")
    code, lines = check(config)
    assert code == 78
    [line] = [p for p in problems(lines) if p.startswith("PROBLEM  certificate chain")]
    assert "unable to get local issuer certificate" in line and "key 'broker.cert_file'" in line


def test_signing_key_of_another_device_exits_78(fleet: Path, tmp_path: Path) -> None:
    bundle = copy_bundle(fleet, tmp_path)
    shutil.copy(fleet / "devices" / "gw2" / "signing.key", bundle / "signing.key")
    code, lines = check(edge_toml(tmp_path / "edge.toml", bundle))
    assert code == 78
    assert any("key 'security.signing_key'" in line and "not the keyring's key for 'gw1'" in line
               for line in problems(lines))


def test_plain_mqtt_and_no_security_skip_those_checks(fleet: Path, tmp_path: Path) -> None:
    config = edge_toml(tmp_path / "edge.toml", fleet / "devices" / "gw1", url="mqtt://127.0.0.1:1883",
                       security=False)
    code, lines = check(config)
    assert code == 0
    assert sum(line.startswith("skip") for line in lines) == 3  # certificate name, tls, signing


def test_a_spool_that_is_not_a_file_exits_78_as_the_gateway_would(fleet: Path, tmp_path: Path) -> None:
    (tmp_path / "state" / "spool.bin").mkdir(parents=True)
    code, lines = check(edge_toml(tmp_path / "edge.toml", fleet / "devices" / "gw1", state=tmp_path / "state"))
    assert code == 78
    assert any("spool.bin" in line and "Is a directory" in line for line in problems(lines))


def test_state_folder_that_cannot_be_created_exits_78(fleet: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, lines = check(edge_toml(tmp_path / "edge.toml", fleet / "devices" / "gw1", state=blocker / "state"))
    assert code == 78
    assert any("key 'state.dir'" in line and "is not a folder" in line for line in problems(lines))


@pytest.fixture
def open_folder() -> Iterator[Path]:
    """A folder other users can enter (pytest's tmp_path sits under a 0700 folder)."""
    folder = Path(tempfile.mkdtemp(prefix="fedgate-check-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder)


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
def test_user_flag_checks_file_access_as_that_user(fleet: Path, open_folder: Path) -> None:
    """Root reads everything; the service user may not. The probe runs as ``nobody``."""
    tmp_path = open_folder
    bundle = copy_bundle(fleet, tmp_path)
    bundle.chmod(0o755)
    for f in bundle.iterdir():
        f.chmod(0o644)
    (bundle / "client.key").chmod(0o600)  # root's: what a copy with the wrong owner looks like
    config = edge_toml(tmp_path / "edge.toml", bundle, state=tmp_path / "state")
    assert check(config)[0] == 0  # as root
    code, lines = check(config, user="nobody")
    assert code == 78
    found = problems(lines)
    assert any("key 'broker.key_file'" in line and "Permission denied (as nobody)" in line for line in found)
    assert any("key 'state.dir'" in line and "cannot write in" in line for line in found)
    assert any(line.startswith("ok       file: broker.cert_file") and "readable by nobody" in line
               for line in lines)
    os.chown(bundle / "client.key", pwd.getpwnam("nobody").pw_uid, -1)
    code, lines = check(config, user="nobody")
    assert not any("broker.key_file" in line for line in problems(lines))


def store_edge_toml(path: Path, bundle: Path, store: Path) -> Path:
    """An edge config reading the bridge's sample store (the gateway's real data source)."""
    text = edge_toml(path, bundle).read_text()
    data = text[text.index("[data]"):text.index("[state]")]
    path.write_text(text.replace(data, "\n".join([
        "[data]", 'source = "store"', f'store = "{store}"', 'device = "turbine"',
        'task = "regression"', 'features = ["Ws_avg"]', 'target = "P_avg"', ""])))
    return path


def test_a_store_the_bridge_has_not_written_yet_is_not_a_problem(fleet: Path, tmp_path: Path) -> None:
    """`fedgate edge run` waits for the bridge to create its store; so does the check."""
    store = tmp_path / "samples.db"
    code, lines = check(store_edge_toml(tmp_path / "edge.toml", fleet / "devices" / "gw1", store))
    assert code == 0, lines
    assert f"skip     file: data.store {store} does not exist yet: the edge waits for the bridge to write it" in lines
    store.mkdir()  # there, but not a readable file
    code, lines = check(store_edge_toml(tmp_path / "edge.toml", fleet / "devices" / "gw1", store))
    assert code == 78 and any("key 'data.store'" in line for line in problems(lines))


def test_unknown_user_is_a_usage_error(fleet: Path, tmp_path: Path) -> None:
    code, lines = check(edge_toml(tmp_path / "edge.toml", fleet / "devices" / "gw1"),
                        user="no-such-user-here")
    assert code == 2 and "no such user" in lines[-1]


def test_edge_data_checks_extension_point(fleet: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []

    def store_has_rows(subject: Subject) -> list[Finding]:
        seen.append(subject.config.device)
        return [subject.problem("store", "data.store", "/var/lib/x.db", "no rows of data.device", 78)]

    from fedgate import preflight_data

    monkeypatch.setattr(preflight_data, "EDGE_DATA_CHECKS", [store_has_rows])
    code, lines = check(edge_toml(tmp_path / "edge.toml", fleet / "devices" / "gw1"))
    assert seen == ["gw1"] and code == 78
    assert problems(lines) == [f"PROBLEM  store: {tmp_path / 'edge.toml'}: key 'data.store' = "
                               "'/var/lib/x.db': no rows of data.device (exit 78)"]
    code, _ = check(aggregator_toml(tmp_path / "aggregator.toml", fleet / "aggregator"))
    assert code == 0 and seen == ["gw1"]  # edge only


def test_bridge_configs_keep_their_check(tmp_path: Path) -> None:
    from tests.firmware_bridge.test_config import WIND_MAP  # the shipped register map

    code, lines = check(WIND_MAP, live=True)
    assert code == 0 and any("--live checks edge and aggregator configs only" in line for line in lines)
