"""The import boundary of the light device: `learn`, `classify`, `bank`, `packet` and `sync` run with
ONNX Runtime and numpy alone (no scipy either: it was 143 MB of the install).

Each verb runs as a real `skill-edge` process on the real ROM; an ``atexit`` hook in the wrapper
records every module the process imported.  The factory's and the lab's heavy modules are installed
in this test venv, so the test fails as soon as any device module imports one of them, directly or
through another module.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

#: Top-level modules a device must never import: the factory's, the lab's and the camera's.  ``onnx``
#: is not among them: where it is installed (factory and lab installs), the engine uses it to fold a
#: task's biases into the tail graph (``rom_engine.bind_biases``); the base install has no ``onnx`` and
#: feeds the biases as an input instead (``benchmarks/device_footprint.py`` runs a venv without it).
FORBIDDEN = ("torch", "torchvision", "timm", "sklearn", "scipy", "matplotlib", "ray", "onnxscript", "h5py", "keras",
             "cv2")

_WRAPPER = r"""
import atexit, json, sys
out = sys.argv.pop(1)
atexit.register(lambda: json.dump(sorted(sys.modules), open(out, "w")))
sys.argv[0] = "skill-edge"
from skill_edge.cli import main
main()
"""


def _run(tmp: Path, name: str, *args: str, home: Path | None = None
         ) -> tuple[subprocess.CompletedProcess, set[str]]:
    audit = tmp / f"{name}.modules.json"
    env = {**os.environ, **({"SKILL_EDGE_HOME": str(home)} if home else {})}
    proc = subprocess.run([sys.executable, "-c", _WRAPPER, str(audit), *args], capture_output=True, text=True,
                          timeout=600, env=env)
    return proc, set(json.loads(audit.read_text()))


def _heavy(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if any(m == f or m.startswith(f + ".") for f in FORBIDDEN))


def _task(root: Path, seed: int, colours: dict[str, tuple[int, int, int]]) -> Path:
    rng = np.random.default_rng(seed)
    for split, n in (("train", 16), ("test", 4)):
        for label, rgb in colours.items():
            d = root / split / label
            d.mkdir(parents=True, exist_ok=True)
            for j in range(n):
                img = (rng.random((48, 48, 3)) * 80).astype(np.uint8) + np.array(rgb, np.uint8) // 2
                Image.fromarray(img).save(d / f"{j}.png")
    return root


@pytest.mark.slow
def test_device_verbs_import_no_torch_timm_sklearn_or_matplotlib(rom_dir: Path, tmp_path: Path) -> None:
    data = _task(tmp_path / "warm", 0, {"red": (200, 40, 40), "green": (40, 200, 40)})
    a, b = tmp_path / "a", tmp_path / "b"
    common = ["--rom", str(rom_dir)]
    seen: dict[str, list[str]] = {}

    proc, mods = _run(tmp_path, "learn", "learn", "--task", "warm", "--data", str(data), *common, home=a)
    assert proc.returncode == 0, proc.stderr
    seen["learn"] = _heavy(mods)
    assert "skill_edge.runtime.mapping.gmm" in mods and "skill_edge.runtime.learn.head" in mods  # it really learned

    image = next((data / "test" / "red").iterdir())
    proc, mods = _run(tmp_path, "classify", "classify", str(image), "--json", *common, home=a)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)[0]["label"] == "red"
    seen["classify"] = _heavy(mods)

    outbox = next((a / "outbox").glob("*.skp"))
    proc, mods = _run(tmp_path, "inspect", "packet", "inspect", str(outbox), home=a)
    assert proc.returncode == 0, proc.stderr
    seen["packet inspect"] = _heavy(mods)

    proc, mods = _run(tmp_path, "bank", "bank", "ls", home=a)
    assert proc.returncode == 0, proc.stderr
    seen["bank ls"] = _heavy(mods)

    # a second device trusts the first and syncs its packet through a shared folder
    proc, _ = _run(tmp_path, "keys-init", "keys", "init", home=b)
    assert proc.returncode == 0, proc.stderr
    proc, _ = _run(tmp_path, "keys-add", "keys", "add", "a", str(a / "keys" / "device.pub"), home=b)
    assert proc.returncode == 0, proc.stderr
    fleet = tmp_path / "fleet"
    for home, name in ((a, "sync-a"), (b, "sync-b")):
        proc, mods = _run(tmp_path, name, "sync", "--transport", f"dir:{fleet}", *common, home=home)
        assert proc.returncode == 0, proc.stderr + proc.stdout
        seen[name] = _heavy(mods)
    proc, _ = _run(tmp_path, "bank-b", "bank", "ls", home=b)
    assert proc.returncode == 0 and "warm" in proc.stdout, proc.stderr

    assert seen == {verb: [] for verb in seen}, f"device verbs imported heavy modules: {seen}"


def test_learn_bb_without_the_bb_extra_stops_before_any_work(rom_dir: Path, tmp_path: Path) -> None:
    """With torch hidden, `learn --bb` names the install command and reads no image (exit 2, no traceback)."""
    data = _task(tmp_path / "t", 1, {"a": (250, 0, 0), "b": (0, 0, 250)})
    hide = ("import importlib.util as u; f = u.find_spec; "
            "u.find_spec = lambda n, *a, **k: None if n.split('.')[0] in ('torch', 'timm') else f(n, *a, **k); ")
    code = hide + "import sys; sys.argv[0] = 'skill-edge'; from skill_edge.cli import main; main()"
    proc = subprocess.run([sys.executable, "-c", code, "learn", "--task", "t", "--data", str(data), "--bb",
                           "--home", str(tmp_path / "h"), "--rom", str(rom_dir)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "pip install 'skill-edge[bb]'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "h" / "cache").exists() or not any((tmp_path / "h" / "cache").rglob("*.safetensors"))
