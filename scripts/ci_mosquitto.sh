#!/usr/bin/env bash
# Make a Mosquitto broker available to the MQTT tests.
#
#   scripts/ci_mosquitto.sh            install mosquitto + mosquitto-clients if missing, check them
#   scripts/ci_mosquitto.sh --start    ... and also start a broker on 127.0.0.1:${MQTT_PORT:-1883}
#                                      (anonymous, no persistence; pid in ${MQTT_PID_FILE:-/tmp/skill-edge-mosquitto.pid})
#
# The pytest suite does NOT need --start: tests/mqtt_broker.py launches its own broker
# processes on free loopback ports with temp configs (and kills/restarts them on purpose).
# --start is for manual runs such as `skill-edge sync --transport mqtt://127.0.0.1:1883`.
# Without root (or sudo) and without mosquitto, the MQTT tests are skipped with a reason.
set -euo pipefail

need_install=0
for bin in mosquitto mosquitto_passwd mosquitto_pub; do
    if ! command -v "$bin" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$bin" ]; then
        need_install=1
    fi
done

if [ "$need_install" = 1 ]; then
    if [ "$(id -u)" = 0 ]; then SUDO=""; elif command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; else
        echo "ci_mosquitto: mosquitto is missing and we are not root (no sudo): MQTT tests will be skipped" >&2
        exit 0
    fi
    echo "ci_mosquitto: installing mosquitto mosquitto-clients"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    # policy-rc.d in containers stops the package from starting the system service; we do not want it anyway
    $SUDO apt-get install -y -qq --no-install-recommends mosquitto mosquitto-clients >/dev/null
fi

MOSQUITTO=$(command -v mosquitto || echo /usr/sbin/mosquitto)
echo "ci_mosquitto: $("$MOSQUITTO" -h 2>&1 | head -n 1) at $MOSQUITTO"

if [ "${1:-}" = "--start" ]; then
    port="${MQTT_PORT:-1883}"
    pid_file="${MQTT_PID_FILE:-/tmp/skill-edge-mosquitto.pid}"
    conf=$(mktemp /tmp/skill-edge-mosquitto.XXXXXX.conf)
    {
        echo "listener $port 127.0.0.1"
        echo "allow_anonymous true"
        echo "persistence false"
        if [ "$(id -u)" = 0 ]; then echo "user root"; fi
    } >"$conf"
    "$MOSQUITTO" -c "$conf" -d
    for _ in $(seq 50); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            pgrep -n -f "$MOSQUITTO -c $conf" >"$pid_file" || true
            echo "ci_mosquitto: broker listening on 127.0.0.1:$port (pid $(cat "$pid_file"), config $conf)"
            exit 0
        fi
        sleep 0.1
    done
    echo "ci_mosquitto: broker did not start on port $port" >&2
    exit 1
fi
