"""`skill-edge sync` as users and scripts meet it: exit codes, one line per packet, a summary line.

Run as a real subprocess where stdout is a pipe (not a terminal), as in cron or CI.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from typer.testing import CliRunner

from mqtt_broker import MosquittoBroker, mosquitto, needs_mosquitto  # noqa: F401
from skill_edge.runtime.cli.sync import app as sync_app
from skill_edge.runtime.exchange.keys import TrustStore
from skill_edge.runtime.exchange.transport import open_transport
from test_sync import ROM_FP, make_fleet

SKILL_EDGE = Path(sys.executable).parent / "skill-edge"


def run_sync(device, transport: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(SKILL_EDGE), "sync", *device.cli_args(transport, "lab"), "--idle", "0.3", *extra],
                          capture_output=True, text=True, timeout=120)


def test_all_rejected_exits_3_with_one_line_per_packet_and_a_summary(tmp_path: Path) -> None:
    a, b = make_fleet(tmp_path, ["dev-a", "dev-b"], trusted=["dev-b"])  # b does not trust a yet
    share = f"dir:{tmp_path / 'share'}"
    a.learn("birds")
    a.learn("cars")
    assert run_sync(a, share).returncode == 0

    r = run_sync(b, share)
    assert r.returncode == 3, r.stdout + r.stderr
    text = r.stdout + r.stderr
    for task in ("birds", "cars"):
        lines = [ln for ln in text.splitlines() if task in ln]
        assert len(lines) == 1 and lines[0].startswith("rejected"), f"{task} reported {len(lines)} times:\n{text}"
    assert "Traceback" not in text
    summary = r.stdout.splitlines()[-1]
    assert summary.startswith("sync lab via dir:") and "arrived 2," in summary and "rejected 2," in summary
    assert "errors 0" in summary and summary.endswith("exit 3: 2 packet(s) refused"), summary
    assert "\x1b[" not in r.stdout, "no colour codes off a terminal"

    TrustStore(b.trust).add("dev-a", a.key.public_key)
    r = run_sync(b, share)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "accepted 2," in r.stdout.splitlines()[-1]


def test_sync_json_is_one_object_with_every_event_and_the_exit_code(tmp_path: Path) -> None:
    import json

    a, b = make_fleet(tmp_path, ["dev-a", "dev-b"], trusted=["dev-a"])  # a does not trust b
    share = f"dir:{tmp_path / 'share'}"
    a.learn("birds")
    b.learn("cars")
    r = run_sync(b, share, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["counts"]["published"] == 1 and [e["event"] for e in out["events"]] == ["published"]
    r = run_sync(a, share, "--json")
    assert r.returncode == 3, r.stdout + r.stderr
    out = json.loads(r.stdout)  # stdout is the JSON alone: no table, no summary line
    assert out["exit_code"] == 3 and out["counts"]["rejected"] == 1 and out["counts"]["refused"] == 1
    rejected = [e for e in out["events"] if e["event"] == "rejected"]
    assert [(e["task"], e["agent"], e["seq"]) for e in rejected] == [("cars", "dev-b", 1)]
    assert "unknown signer" in rejected[0]["reason"]


def test_sync_watch_json_streams_one_event_a_line_then_a_summary(tmp_path: Path) -> None:
    import json
    import signal
    import time

    a, b = make_fleet(tmp_path, ["dev-a", "dev-b"])
    share = f"dir:{tmp_path / 'share'}"
    a.learn("birds")
    assert run_sync(a, share).returncode == 0
    proc = subprocess.Popen([str(SKILL_EDGE), "sync", *b.cli_args(share, "lab"), "--watch", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = json.loads(proc.stdout.readline())  # a line as soon as the packet is taken in, not at the end
    assert (first["event"], first["task"], first["agent"]) == ("accepted", "birds", "dev-a")
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    rest, err = proc.communicate(timeout=30)
    lines = [json.loads(ln) for ln in rest.splitlines()]
    assert proc.returncode == 0, err
    assert lines[-1]["summary"]["counts"]["accepted"] == 1 and lines[-1]["summary"]["exit_code"] == 0


def test_a_mistyped_transport_is_refused_and_names_are_printed_as_they_are(tmp_path: Path, monkeypatch) -> None:
    """"usb:/media/x" or "mqt:broker" used to become a local folder that sync created and published into,
    with exit 0; and rich turned a ":x:" in a fleet or folder name into an emoji."""
    a, = make_fleet(tmp_path, ["dev-a"])
    a.learn("birds")
    monkeypatch.chdir(tmp_path)
    r = subprocess.run([str(SKILL_EDGE), "sync", *a.cli_args("usb:share", "lab")], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "unknown transport 'usb:share'" in r.stderr and "dir:usb:share" in r.stderr
    assert not (tmp_path / "usb:share").exists() and list(a.outbox.glob("*.skp")), "nothing published"
    for bad, says in ((["--chunk-size", "0"], "size must be positive"), (["--idle", "-1"], "--idle"),
                      (["--transport", "mqtt://broker:notaport"], "port")):  # bad usage: exit 2, not 1 (retry)
        r = subprocess.run([str(SKILL_EDGE), "sync", *a.cli_args("dir:share", "lab"), *bad], capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 2 and says in r.stderr and "Traceback" not in r.stderr, (bad, r.stderr)

    r = subprocess.run([str(SKILL_EDGE), "sync", *a.cli_args("dir:lab:x:", "f:x:"), "--idle", "0.2"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1].startswith("sync f:x: via dir:lab:x:: published 1,"), r.stdout
    assert (tmp_path / "lab:x:").is_dir()


def test_help_documents_the_exit_codes() -> None:
    r = CliRunner().invoke(sync_app, ["--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0
    flat = " ".join(r.output.split())
    assert "Exit status: 0" in flat and "1 something could not be published" in flat and "3 no failures" in flat


@needs_mosquitto
@pytest.mark.mqtt
def test_a_corrupt_chunk_is_an_error(mosquitto: MosquittoBroker, tmp_path: Path) -> None:
    a, b = make_fleet(tmp_path, ["dev-a", "dev-b"])
    fleet = f"f{uuid.uuid4().hex[:8]}"
    url = f"mqtt://{mosquitto.host}:{mosquitto.port}"
    data = a.learn("big", dim=256)
    pub = open_transport(url, fleet, chunk_size=2048)
    pub.publish(data, fleet=fleet, task="big", agent_id="dev-a", seq=1)
    pub.close()
    sha = hashlib.sha256(data).hexdigest()
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    c.connect(mosquitto.host, mosquitto.port)
    c.loop_start()
    bad = bytearray(data[2048:4096])
    bad[5] ^= 0xFF  # same length: reassembly completes, the sha256 check fails
    c.publish(f"skill/{fleet}/chunks/dev-a/{sha}/1", bytes(bad), qos=1, retain=True).wait_for_publish(5)
    c.loop_stop()

    r = subprocess.run([str(SKILL_EDGE), "sync", "--transport", url, "--fleet", fleet, "--home", str(b.home),
                        "--trust", str(b.trust), "--rom-fingerprint", ROM_FP, "--idle", "1"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stdout + r.stderr
    summary = r.stdout.splitlines()[-1]
    assert "arrived 0," in summary and "errors 1 (1 damaged in transit)" in summary, summary
    assert "big" not in b.tasks()
