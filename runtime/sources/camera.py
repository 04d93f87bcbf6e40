"""Video sources (jetson-inference style URIs) and labelled frame capture into an ImageFolder.

URIs: ``0`` / ``--camera 0`` (a V4L2 index: ``/dev/video0``), ``v4l2:///dev/video0``, ``csi://0``
(a GStreamer nvarguscamerasrc pipeline on Jetson), ``file://clip.mp4`` or a plain path, ``rtsp://...``,
``http(s)://...``.  Beware: in jetson-inference a bare ``0`` means the CSI camera; here it is V4L2, as
in OpenCV, and a CSI camera is always ``csi://0``.  Frames are saved as JPEGs in ``DIR/train/<label>/``
so a capture can be reused, inspected, and learned from like any other folder.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

# OpenCV's own "[ WARN:0@0.01] global cap_v4l.cpp:915 open VIDEOIO..." lines on a missing camera
# come before our one-line error and say the same less clearly; a user's setting still wins.
os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")


class VideoSourceError(RuntimeError):
    """A camera or stream that cannot be opened or stops delivering frames."""


class CaptureExistsError(ValueError):
    """A capture folder that already holds frames, when the caller chose neither append nor replace."""


def csi_pipeline(sensor_id: int = 0, width: int = 1280, height: int = 720, fps: int = 30) -> str:
    return (f"nvarguscamerasrc sensor-id={sensor_id} ! video/x-raw(memory:NVMM), width={width}, height={height}, "
            f"framerate={fps}/1 ! nvvidconv ! video/x-raw, format=BGRx ! videoconvert ! video/x-raw, format=BGR "
            f"! appsink drop=true max-buffers=1")


def resolve_uri(uri: str | int) -> tuple[str | int, int | None]:
    """Map a source URI to what ``cv2.VideoCapture`` takes: (argument, api preference)."""
    import cv2

    s = str(uri).strip()
    if s.isdigit():
        return int(s), cv2.CAP_V4L2 if os.name == "posix" else None
    if s.startswith("v4l2://"):
        dev = s[len("v4l2://"):]
        return (int(dev[len("/dev/video"):]) if dev.startswith("/dev/video") and dev[10:].isdigit() else dev,
                cv2.CAP_V4L2)
    if s.startswith("csi://"):
        return csi_pipeline(int(s[len("csi://"):] or 0)), cv2.CAP_GSTREAMER
    if s.startswith("file://"):
        path = s[len("file://"):]
        if not Path(path).exists():
            raise VideoSourceError(f"video file {path} does not exist")
        return path, None
    if s.startswith(("rtsp://", "http://", "https://", "rtmp://")):
        return s, cv2.CAP_FFMPEG
    if Path(s).exists():
        return s, None
    raise VideoSourceError(f"unrecognised video source {uri!r}: use 0, v4l2:///dev/video0, csi://0, "
                           f"file://clip.mp4 or rtsp://host/stream")


class VideoSource:
    """Iterate RGB frames from a camera or stream; ``loop`` replays files (handy for demos)."""

    def __init__(self, uri: str | int, *, loop: bool = False) -> None:
        import cv2

        self.uri = str(uri)
        arg, api = resolve_uri(uri)
        self.cap = cv2.VideoCapture(arg, api) if api is not None else cv2.VideoCapture(arg)
        if not self.cap.isOpened():
            raise VideoSourceError(f"cannot open video source {uri!r}")
        self.is_file = isinstance(arg, str) and api is None and Path(arg).exists()
        self.loop = loop and self.is_file

    def read(self) -> np.ndarray | None:
        import cv2

        ok, frame = self.cap.read()
        if not ok and self.loop:
            self.cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
            ok, frame = self.cap.read()
        if not ok or frame is None:
            return None
        return cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)

    def frames(self, limit: int | None = None) -> Iterator[np.ndarray]:
        n = 0
        while limit is None or n < limit:
            f = self.read()
            if f is None:
                return
            n += 1
            yield f

    def close(self) -> None:
        self.cap.release()

    def __enter__(self) -> "VideoSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def display_available() -> bool:
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def gui_available() -> bool:
    """Whether a preview window can open: a display, and an OpenCV built with a GUI.

    ``opencv-python-headless`` (what this project installs) has no ``imshow``: it raises
    ``cv2.error`` "The function is not implemented" whatever ``DISPLAY`` says, so a display
    alone is not enough."""
    if not display_available():
        return False
    import cv2

    try:
        cv2.namedWindow("skill-edge capture")
        cv2.destroyWindow("skill-edge capture")
    except cv2.error:
        return False
    return True


def captured_frames(out_dir: Path) -> int:
    """JPEG frames an earlier capture left in ``out_dir`` (any split, any label)."""
    out_dir = Path(out_dir)
    return sum(1 for _ in out_dir.glob("*/*/*.jpg")) if out_dir.is_dir() else 0


def prepare_capture_dir(out_dir: Path, previous: str) -> int:
    """Deal with an earlier capture in ``out_dir`` before a new one; returns the frames it held.

    ``previous``: ``"append"`` keeps them (new frames are added), ``"replace"`` deletes the
    earlier capture, ``"refuse"`` raises ``CaptureExistsError`` if there is one, ``"check"`` only
    counts.  Without this, a second capture of a task silently mixed its frames with the first."""
    if previous not in ("append", "replace", "refuse", "check"):
        raise ValueError(f"previous must be append, replace, refuse or check, not {previous!r}")
    old = captured_frames(out_dir)
    if old and previous == "refuse":
        raise CaptureExistsError(f"{out_dir} already holds {old} frames from an earlier capture; pass --append to "
                                 "add to them or --replace to start again")
    if old and previous == "replace":
        import shutil

        for split in ("train", "val", "test"):
            shutil.rmtree(Path(out_dir) / split, ignore_errors=True)
    return old


@dataclass
class CaptureReport:
    out_dir: Path
    counts: dict[str, int] = field(default_factory=dict)
    mode: str = "timed"


def capture_labelled(source: VideoSource, labels: Sequence[str], out_dir: Path, *, frames_per_label: int = 100,
                     countdown: float = 3.0, interval: float = 0.0, interactive: bool | None = None,
                     say: Callable[[str], None] = print) -> CaptureReport:
    """Capture ``frames_per_label`` frames for each label into ``out_dir/train/<label>/``.

    With a GUI (``gui_available``), a preview window opens: keys 1..9 switch the label, space
    toggles recording, q finishes.  Without one (a headless Jetson over SSH, OpenCV headless,
    ``interactive=False``), each label gets a terminal countdown, then a timed burst of frames;
    a video file needs no countdown (nobody has to point it anywhere), so it has none.
    Frames are added to what ``out_dir`` holds: see ``prepare_capture_dir``.
    """
    import cv2

    if len(labels) < 2:
        raise ValueError("a task needs at least 2 labels, e.g. --labels cup,mug")
    if len(set(labels)) != len(labels):
        raise ValueError("labels must be distinct")
    out_dir = Path(out_dir)
    interactive = gui_available() if interactive is None else interactive
    report = CaptureReport(out_dir, {lab: 0 for lab in labels}, "interactive" if interactive else "timed")
    for lab in labels:
        (out_dir / "train" / lab).mkdir(parents=True, exist_ok=True)

    def save(frame: np.ndarray, lab: str) -> None:
        i = report.counts[lab]
        path = out_dir / "train" / lab / f"{int(time.time() * 1000)}_{i:05d}.jpg"
        cv2.imwrite(str(path), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 92])
        report.counts[lab] = i + 1

    if interactive:
        current, recording = 0, False
        while any(report.counts[lab] < frames_per_label for lab in labels):
            frame = source.read()
            if frame is None:
                break
            lab = labels[current]
            if recording and report.counts[lab] < frames_per_label:
                save(frame, lab)
            shown = cv2.cvtColor(frame, cv2.COLOR_RGB2BGR)
            cv2.putText(shown, f"[{current + 1}] {lab} {report.counts[lab]}/{frames_per_label} "
                               f"{'REC' if recording else 'paused (space)'}", (10, 30), cv2.FONT_HERSHEY_SIMPLEX,
                        0.8, (0, 0, 255) if recording else (255, 255, 255), 2)
            cv2.imshow("skill-edge capture", shown)
            key = cv2.waitKey(1) & 0xFF
            if key == ord("q"):
                break
            if key == ord(" "):
                recording = not recording
            if ord("1") <= key <= ord("9") and key - ord("1") < len(labels):
                current = key - ord("1")
        cv2.destroyAllWindows()
        return report

    if getattr(source, "is_file", False):
        countdown = 0
    for lab in labels:
        for s in range(int(countdown), 0, -1):
            say(f"point the camera at '{lab}': capturing in {s}...")
            time.sleep(1.0)
        say(f"capturing {frames_per_label} frames of '{lab}'")
        while report.counts[lab] < frames_per_label:
            frame = source.read()
            if frame is None:
                raise VideoSourceError(f"{source.uri} stopped after {report.counts[lab]} frames of '{lab}'")
            save(frame, lab)
            if interval:
                time.sleep(interval)
    return report
