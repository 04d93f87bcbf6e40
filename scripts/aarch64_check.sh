#!/usr/bin/env bash
# The light device on aarch64, checked for real: a Debian arm64 root built from Debian's own packages
# (debootstrap, run through qemu-user-static and binfmt_misc), the base install of skill-edge from
# PyPI's aarch64 wheels, and a ROM exported on this x86 machine.  Inside the root it runs
# `rom verify`, `learn`, `classify`, packet encode + inspect and a directory sync between two homes,
# and it computes ROM features that must match the x86 ones within 1e-4 (relative).
#
# Writes benchmarks/results/aarch64_check.json ("passed" is true only when every step passed).
# Times are under emulation: they are not performance figures.
#
# Usage (as root, on x86_64 Debian; about 10 minutes the first time, the root is kept in .cache/):
#   bash scripts/aarch64_check.sh [--out benchmarks/results/aarch64_check.json]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=benchmarks/results/aarch64_check.json
[ "${1:-}" = "--out" ] && OUT=$2
ROOT=${AARCH64_ROOT:-.cache/aarch64-root}
SUITE=${AARCH64_SUITE:-bookworm}
MIRROR=${AARCH64_MIRROR:-http://deb.debian.org/debian}
WORK=.cache/aarch64-work
ROM=${SKILL_EDGE_ROM:-models/rom/efficientnet_lite0}
say() { echo "[aarch64 $(date +%H:%M:%S)] $*"; }

# 1. host tools: debootstrap, qemu-user-static, binfmt_misc
need=()
for p in qemu-user-static debootstrap binfmt-support; do dpkg -s "$p" >/dev/null 2>&1 || need+=("$p"); done
if [ ${#need[@]} -gt 0 ]; then
  say "apt-get install ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
[ -e /proc/sys/fs/binfmt_misc/register ] || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
[ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || update-binfmts --enable qemu-aarch64

# 2. the arm64 root (kept between runs)
if [ ! -e "$ROOT/.skill-edge-root-complete" ]; then
  say "debootstrap --arch=arm64 $SUITE into $ROOT"
  rm -rf "$ROOT"; mkdir -p "$ROOT"
  debootstrap --arch=arm64 --variant=minbase --include=python3,python3-venv,ca-certificates \
    "$SUITE" "$ROOT" "$MIRROR" >"$ROOT.debootstrap.log" 2>&1 || { tail -20 "$ROOT.debootstrap.log"; exit 1; }
  touch "$ROOT/.skill-edge-root-complete"
fi
cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
cp /etc/ssl/certs/ca-certificates.crt "$ROOT/etc/ssl/certs/ca-certificates.crt"
mountpoint -q "$ROOT/proc" || mount -t proc proc "$ROOT/proc"
mountpoint -q "$ROOT/dev" || mount --bind /dev "$ROOT/dev"
trap 'umount "$ROOT/proc" "$ROOT/dev" 2>/dev/null || true' EXIT
in_root() { chroot "$ROOT" /usr/bin/env -i HOME=/root PATH=/opt/venv/bin:/usr/bin:/bin LANG=C.UTF-8 \
  PIP_CERT=/etc/ssl/certs/ca-certificates.crt PIP_DISABLE_PIP_VERSION_CHECK=1 "$@"; }
say "root: $(in_root uname -m), $(in_root python3 --version)"

# 3. on x86: the ROM (the factory), the project wheel, a small task and the reference features
[ -x .venv/bin/python ] || bash scripts/setup.sh
[ -e "$ROM/manifest.json" ] || .venv/bin/skill-edge export --backbone efficientnet_lite0 --out "$ROM"
rm -rf "$WORK"; mkdir -p "$WORK"
.venv/bin/python -m pip wheel -q --no-deps -w "$WORK/wheel" . >/dev/null
.venv/bin/python scripts/aarch64_steps.py make-task "$WORK/task"
.venv/bin/python scripts/aarch64_steps.py features "$ROM" "$WORK/task" "$WORK/features-x86_64.npy"

# 4. in the arm64 root: the base install from PyPI's aarch64 wheels, then every step
rm -rf "$ROOT/opt/check"; mkdir -p "$ROOT/opt/check"
cp -r "$WORK/wheel" "$WORK/task" "$ROOT/opt/check/"
cp -r "$ROM" "$ROOT/opt/check/rom"
cp scripts/aarch64_steps.py "$ROOT/opt/check/"
rm -rf "$ROOT/opt/venv"  # a fresh venv every run: it must hold only what the base profile brings
in_root python3 -m venv /opt/venv
say "pip install skill-edge (base profile) from PyPI's aarch64 wheels"
t0=$(date +%s)
whl=$(basename "$(ls "$WORK"/wheel/*.whl)")
in_root /opt/venv/bin/python -m pip install -q --upgrade --force-reinstall --no-cache-dir "/opt/check/wheel/$whl" \
  >"$WORK/pip-install.log" 2>&1 || { tail -30 "$WORK/pip-install.log"; exit 1; }
install_s=$(( $(date +%s) - t0 ))
in_root /opt/venv/bin/python -m pip list --format json >"$WORK/pip-list.json"
in_root /opt/venv/bin/python -m pip inspect >"$WORK/pip-inspect.json" 2>/dev/null || echo '{}' >"$WORK/pip-inspect.json"
say "running the device steps under qemu (slow: emulation)"
in_root /opt/venv/bin/python /opt/check/aarch64_steps.py run /opt/check | tee "$WORK/steps.log"
cp "$ROOT/opt/check/steps.json" "$ROOT/opt/check/features-aarch64.npy" "$WORK/"

# 5. compare and write the result
.venv/bin/python scripts/aarch64_steps.py report "$WORK" "$OUT" --install-seconds "$install_s" \
  --command "bash scripts/aarch64_check.sh" --suite "$SUITE"
