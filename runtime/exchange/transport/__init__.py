"""Moving knowledge packets between devices: a shared folder, or an MQTT broker.

``open_transport("dir:/mnt/usb/skill", fleet)`` or ``open_transport("mqtt://host:1883", fleet)``
returns a :class:`Transport`; see ``base`` for the interface, ``directory`` and ``mqtt`` for the
two implementations and their on-disk / on-broker layouts.
"""

from __future__ import annotations

import re
from pathlib import Path

from .base import (
    ReceivedPacket,
    Transport,
    TransportAuthError,
    TransportError,
    check_name,
    decode_segment,
    encode_segment,
)
from .directory import DirectoryTransport, packet_path, write_atomically


#: ``word:`` at the start of a transport spec: a scheme, never a folder name on its own.
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def is_mqtt(spec: str) -> bool:
    """Whether ``spec`` names an MQTT broker (``mqtt://``, ``mqtts://``, ``tcp://``, ``ssl://``)."""
    return spec.startswith(("mqtt://", "mqtts://", "tcp://", "ssl://"))


def open_transport(spec: str, fleet: str, *, state_dir: str | Path | None = None, **mqtt_options: object) -> Transport:
    """Open the transport named by ``spec``: ``dir:PATH`` (or a plain path) or ``mqtt[s]://host:port``.

    ``state_dir`` lets the directory transport remember what it already delivered between runs;
    ``mqtt_options`` are :class:`~.mqtt.MqttConfig` fields (chunk_size, username, tls_ca, ...).
    """
    if is_mqtt(spec):
        from .mqtt import MqttConfig, MqttTransport  # paho is only imported when MQTT is used

        return MqttTransport(MqttConfig.from_url(spec, fleet, **mqtt_options))
    if "://" in spec or (_SCHEME.match(spec) and not spec.startswith("dir:")):
        # "mqt://broker" or "usb:/media/x" is a typo, not a folder to create and publish into
        raise ValueError(f"unknown transport {spec!r}; use dir:PATH (a folder whose name holds ':' goes as "
                         f"dir:{spec}) or mqtt://host:port")
    path = Path(spec[4:] if spec.startswith("dir:") else spec).expanduser()
    state = Path(state_dir) / f"dir-transport-{fleet}.json" if state_dir is not None else None
    return DirectoryTransport(path, fleet, state_file=state)


__all__ = [
    "DirectoryTransport",
    "ReceivedPacket",
    "Transport",
    "TransportAuthError",
    "TransportError",
    "check_name",
    "decode_segment",
    "encode_segment",
    "is_mqtt",
    "open_transport",
    "packet_path",
    "write_atomically",
]
