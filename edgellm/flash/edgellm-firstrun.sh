#!/bin/bash
# SPDX-License-Identifier: MIT
# edgellm first boot: install the flash package in edgellm/ beside this script into
# /var/lib/edgellm and enable edgellm-agent.service (`edgellm firstboot` does the work).
# Raspberry Pi OS runs it once from cmdline.txt (systemd.run=..., then a reboot) or from
# cloud-init's user-data; Jetson from edgellm-firstboot.service. It never blocks a boot:
# whatever happens it removes its cmdline.txt words and exits 0; the log is on the card.
# Overrides (tests, images): EDGELLM_BOOT, EDGELLM_SYSROOT, EDGELLM (the command to run).
set -u
BOOT=${EDGELLM_BOOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)}
SYSROOT=${EDGELLM_SYSROOT:-/}
LOG="$BOOT/edgellm-firstboot.log"
log() { printf '%s %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*" >>"$LOG"; }

strip_hook() {  # our three cmdline.txt words out; the line stays one line
  [ -f "$BOOT/cmdline.txt" ] || return 0
  sed -i -E -e 's# ?systemd\.run=[^ ]*edgellm-firstrun\.sh##' \
    -e 's# ?systemd\.run_success_action=[^ ]*##' \
    -e 's# ?systemd\.unit=kernel-command-line\.target##' "$BOOT/cmdline.txt"
}

find_edgellm() {  # sets CMD to the edgellm command
  if [ -n "${EDGELLM:-}" ]; then read -r -a CMD <<<"$EDGELLM"; return 0; fi
  local c
  for c in /usr/local/bin/edgellm /opt/edgellm/bin/edgellm "$(command -v edgellm || true)"; do
    if [ -n "$c" ] && [ -x "$c" ]; then CMD=("$c"); return 0; fi
  done
  if compgen -G "$BOOT/edgellm-wheels/*.whl" >/dev/null; then  # offline install from the card
    log "installing edgellm from $BOOT/edgellm-wheels into /opt/edgellm"
    if python3 -m venv --system-site-packages /opt/edgellm >>"$LOG" 2>&1 &&
      /opt/edgellm/bin/pip install --no-index --find-links "$BOOT/edgellm-wheels" edgellm \
        >>"$LOG" 2>&1; then
      ln -sf /opt/edgellm/bin/edgellm /usr/local/bin/edgellm
      CMD=(/opt/edgellm/bin/edgellm)
      return 0
    fi
  fi
  return 1
}

if [ -f "$BOOT/edgellm-chain.txt" ]; then  # a hook that was there first (Imager's firstrun.sh)
  prev="$BOOT/$(basename "$(head -n 1 "$BOOT/edgellm-chain.txt")")"
  if [ -f "$prev" ]; then
    log "running $prev first"
    bash "$prev" >>"$LOG" 2>&1 || log "$prev exited $?"
    rm -f "$prev"  # one-shot, and it may hold Wi-Fi keys and a password hash
  fi
  rm -f "$BOOT/edgellm-chain.txt"
fi

rc=0
CMD=()
if [ ! -f "$BOOT/edgellm/flash.json" ] && [ -f "$SYSROOT/var/lib/edgellm/firstboot.json" ]; then
  log "already provisioned"
elif find_edgellm; then
  log "installing $BOOT/edgellm into ${SYSROOT%/}/var/lib/edgellm"
  "${CMD[@]}" firstboot --boot "$BOOT" --sysroot "$SYSROOT" --exe "${CMD[*]}" >>"$LOG" 2>&1 || rc=$?
else
  log "edgellm is not installed on this image: install it (pip install edgellm into" \
    "/opt/edgellm) or put its wheels in $BOOT/edgellm-wheels, then run: sudo edgellm" \
    "firstboot --boot $BOOT"
  rc=127
fi
strip_hook
if [ "$rc" = 0 ]; then
  log "done: edgellm-agent.service is enabled"
  # start it now, unless this is the systemd.run boot (it reboots into the agent anyway)
  if [ "$SYSROOT" = / ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null &&
    ! grep -q 'edgellm-firstrun\.sh' /proc/cmdline 2>/dev/null; then
    systemctl daemon-reload && systemctl start --no-block edgellm-agent.service
  fi
else
  log "FAILED (exit $rc); the device boots without the agent. Fix, then run: sudo edgellm" \
    "firstboot --boot $BOOT"
fi
exit 0
