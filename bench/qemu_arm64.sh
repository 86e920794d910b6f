#!/usr/bin/env bash
# bench/qemu_arm64.sh: the agent's runtime self-test on aarch64 (64-bit Raspberry Pi OS = Debian bookworm,
# Python 3.11) under qemu user emulation, for ai-edge-litert and tflite-runtime. Not in the test suite.
#
# What it does (as root, on a Debian/Ubuntu x86-64 host with network access to Debian and PyPI):
#   1. apt-get install qemu-user-static debootstrap (when missing);
#   2. debootstrap --foreign an arm64 bookworm minbase with python3 (the packages are only unpacked:
#      no chroot and no binfmt_misc needed; qemu-aarch64-static -L <root> runs its python3.11);
#   3. pip download/install --target aarch64 wheels (--platform manylinux_2_*_aarch64, --only-binary)
#      into one site dir per runtime: ai-edge-litert (numpy 2) and tflite-runtime (numpy<2);
#   4. exports zoo artifacts on the host (TensorFlow from the project's .venv);
#   5. runs `python3.11 -m fedmq.edge_agent.selftest` (one training step in a fresh process, exactly
#      the agent's self-test child) under qemu for each runtime x model x XNNPACK on/off, and judges the
#      result on the host with the agent's own rules (signal, finite loss, plausible step) plus agreement
#      with the host's LiteRT step from the same weights and batch.
# (The emulated python cannot start the self-test's own child: without binfmt_misc an aarch64 execve
# fails, so the parent side of the self-test runs on the host.)
# /proc/cpuinfo: qemu-user before 8.2 (bookworm has 7.2) shows the guest the host's x86 /proc/cpuinfo,
# and ai-edge-litert's CPU detection (cpuinfo) then segfaults while creating the interpreter, before any
# training: an emulator artifact. So the script puts a Raspberry Pi 4 /proc/cpuinfo (Cortex-A72) into
# the root, which qemu -L serves in place of the host's (a qemu that emulates it, e.g. 10.0, ignores it).
#
# Usage: sudo bench/qemu_arm64.sh [WORKDIR]   (default /tmp/fedmq-qemu; reused when it exists)
# Env: MODELS="mlp sensor1d" (zoo names), PYTHON=.venv/bin/python (host, with TensorFlow),
#      QEMU=qemu-aarch64-static (or another qemu-aarch64 binary), QEMU_CPU=cortex-a72 (the Pi 4's core;
#      also max, cortex-a76 (Pi 5), cortex-a53 (Pi 3 / Zero 2) ...).
# Takes ~3 min the first time on 2 x86 cores (apt, ~150 MB of wheels), then ~15 s per small model.
set -euo pipefail
ROOT_DIR="$(cd "$(dirname "$0")/.." && pwd)"
W="${1:-/tmp/fedmq-qemu}"
MODELS="${MODELS:-mlp sensor1d}"
PY_HOST="${PYTHON:-$ROOT_DIR/.venv/bin/python}"
MIRROR="${MIRROR:-http://deb.debian.org/debian}"
mkdir -p "$W"
cd "$W"

if ! command -v qemu-aarch64-static >/dev/null || [ ! -x /usr/sbin/debootstrap ]; then
  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q qemu-user-static debootstrap
fi
if [ ! -x root/usr/bin/python3.11 ]; then
  /usr/sbin/debootstrap --foreign --arch=arm64 --variant=minbase --include=python3,libpython3.11 bookworm root "$MIRROR"
  for d in root/var/cache/apt/archives/*.deb; do dpkg-deb -x "$d" root; done  # --foreign unpacks only the base
fi
# a Raspberry Pi 4's /proc/cpuinfo in place of the host's (see the top): qemu -L prefers the root's file
mkdir -p root/proc
cpu="BogoMIPS	: 108.00
Features	: fp asimd evtstrm crc32 cpuid
CPU implementer	: 0x41
CPU architecture: 8
CPU variant	: 0x0
CPU part	: 0xd08
CPU revision	: 3
"
printf 'processor\t: 0\n%s\nprocessor\t: 1\n%s\nHardware\t: BCM2835\nRevision\t: c03111\nModel\t\t: %s\n' \
  "$cpu" "$cpu" "Raspberry Pi 4 Model B Rev 1.1" > root/proc/cpuinfo
export QEMU_CPU="${QEMU_CPU:-cortex-a72}"
PY_ARM=("${QEMU:-qemu-aarch64-static}" -L "$W/root" "$W/root/usr/bin/python3.11")
echo "host:$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-) x $(nproc); $("${PY_ARM[0]}" --version | head -1); QEMU_CPU=$QEMU_CPU"
"${PY_ARM[@]}" -c 'import platform, sys; print("emulated:", platform.machine(), sys.version.split()[0])'

PLAT=(--platform manylinux2014_aarch64)
for v in $(seq 17 36); do PLAT+=(--platform "manylinux_2_${v}_aarch64"); done  # bookworm: glibc 2.36
declare -A VER=([litert]="${LITERT_VERSION:-2.3.0}" [tflite]="${TFLITE_VERSION:-2.14.0}")  # one site dir per version
declare -A PKGS=([litert]="ai-edge-litert==${VER[litert]} numpy" [tflite]="tflite-runtime==${VER[tflite]} numpy<2")
for site in litert tflite; do
  if [ ! -d "site-$site-${VER[$site]}" ]; then
    # shellcheck disable=SC2086
    "$PY_HOST" -m pip install -q --no-warn-conflicts --target "site-$site-${VER[$site]}" "${PLAT[@]}" --python-version 3.11 --only-binary=:all: \
      ${PKGS[$site]} msgpack paho-mqtt cryptography
  fi
done
mkdir -p src && ln -sfn "$ROOT_DIR" src/fedmq  # the project's own source, importable as fedmq

mkdir -p models out
for m in $MODELS; do
  [ -f "models/$m.tflite" ] || (cd "$ROOT_DIR" && "$PY_HOST" - "$m" "$W/models/$m.tflite" <<'EOF' 2>/dev/null
import sys
from fedmq.aggregator.export.convert import export_model
from fedmq.aggregator.export.trainable import TrainSpec
from fedmq.aggregator.export.zoo import ZOO
open(sys.argv[2], "wb").write(export_model(ZOO[sys.argv[1]](), TrainSpec(batch_size=10), verify_steps=0).artifact)
EOF
)
done

echo "| model | runtime | XNNPACK | self-test | loss | step vs the host's LiteRT |"
echo "|---|---|---|---|---|---|"
for m in $MODELS; do
  for rt in litert:ai_edge_litert tflite:tflite_runtime; do
    site=${rt%%:*}; name=${rt#*:}
    for x in --xnnpack --no-xnnpack; do
      o="out/$m-$site$x.npz"; rm -f "$o"
      set +e
      PYTHONFAULTHANDLER=1 PYTHONPATH="$W/src:$W/site-$site-${VER[$site]}" timeout 600 "${PY_ARM[@]}" -m fedmq.edge_agent.selftest \
        --artifact "models/$m.tflite" --runtime "$name" --out "$o" $x >"out/$m-$site$x.log" 2>&1
      rc=$?
      set -e
      (cd "$ROOT_DIR" && "$PY_HOST" - "$W/models/$m.tflite" "$W/$o" "$rc" "$m" "$name" "$x" "$W/out/$m-$site$x.log" \
        <<'EOF' 2>/dev/null
import re, signal, sys
import numpy as np
from fedmq.edge_agent import selftest
art, out, rc, model, rt, x, logf = sys.argv[1], sys.argv[2], int(sys.argv[3]), *sys.argv[4:]
if rc != 0:  # the shell reports a signal as 128 + n; qemu re-raises the guest's signal on itself
    # where: the innermost Python frame of the child's faulthandler traceback (PYTHONFAULTHANDLER=1)
    frames = re.findall(r'File "([^"]+)", line (\d+) in (\S+)', open(logf, errors="replace").read())
    at = f" at {frames[0][0].rsplit('/', 1)[-1]}:{frames[0][1]} {frames[0][2]}" if frames else ""
    what = f"crashed ({signal.Signals(rc - 128).name}){at}" if rc > 128 else f"exit {rc}"
    print(f"| {model} | {rt} | {x[2:]} | FAIL: {what} | — | — |")
    sys.exit()
d = np.load(out)
res = selftest._judge(rt, d, 0.0)
import tempfile, subprocess, pathlib
with tempfile.TemporaryDirectory() as t:  # the host's LiteRT from the same weights and batch
    host, hd = selftest._run_child(pathlib.Path(art), "ai_edge_litert", pathlib.Path(t), 300, x == "--xnnpack")
    agree = selftest._compare(hd, d) if host.ok else "host step failed"
print(f"| {model} | {res.version} | {x[2:]} | {'ok' if res.ok else 'FAIL: ' + res.reason} | {res.loss:.4f} "
      f"| {'agrees' if not agree else agree} |")
EOF
)
    done
  done
done
