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
#
# Usage: sudo bench/qemu_arm64.sh [WORKDIR]   (default /tmp/fedmq-qemu; reused when it exists)
# Env: MODELS="mlp sensor1d" (zoo names), PYTHON=.venv/bin/python (host, with TensorFlow).
# Takes ~5 min the first time (downloads ~150 MB), then ~1 min per model.
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
PY_ARM=(qemu-aarch64-static -L "$W/root" "$W/root/usr/bin/python3.11")
"${PY_ARM[@]}" -c 'import platform, sys; print("emulated:", platform.machine(), sys.version.split()[0])'

PLAT=(--platform manylinux2014_aarch64)
for v in $(seq 17 36); do PLAT+=(--platform "manylinux_2_${v}_aarch64"); done  # bookworm: glibc 2.36
declare -A PKGS=([litert]="ai-edge-litert==${LITERT_VERSION:-2.3.0} numpy" [tflite]="tflite-runtime==${TFLITE_VERSION:-2.14.0} numpy<2")
for site in litert tflite; do
  if [ ! -d "site-$site" ]; then
    # shellcheck disable=SC2086
    "$PY_HOST" -m pip install -q --target "site-$site" "${PLAT[@]}" --python-version 3.11 --only-binary=:all: \
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

for m in $MODELS; do
  for rt in litert:ai_edge_litert tflite:tflite_runtime; do
    site=${rt%%:*}; name=${rt#*:}
    for x in --xnnpack --no-xnnpack; do
      o="out/$m-$site$x.npz"; rm -f "$o"
      set +e
      PYTHONPATH="$W/src:$W/site-$site" timeout 600 "${PY_ARM[@]}" -m fedmq.edge_agent.selftest \
        --artifact "models/$m.tflite" --runtime "$name" --out "$o" $x >"out/$m-$site$x.log" 2>&1
      rc=$?
      set -e
      (cd "$ROOT_DIR" && "$PY_HOST" - "$W/models/$m.tflite" "$W/$o" "$rc" "$m" "$name" "$x" <<'EOF' 2>/dev/null
import signal, sys
import numpy as np
from fedmq.edge_agent import selftest
art, out, rc, model, rt, x = sys.argv[1], sys.argv[2], int(sys.argv[3]), *sys.argv[4:]
if rc != 0:  # the shell reports a signal as 128 + n; qemu re-raises the guest's signal on itself
    what = f"crashed in a training step ({signal.Signals(rc - 128).name})" if rc > 128 else f"exit {rc}"
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
