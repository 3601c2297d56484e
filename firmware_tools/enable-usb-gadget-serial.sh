#!/bin/bash
# SPDX-License-Identifier: MIT
# Make a Raspberry Pi 5 (or 4, Zero 2 W) a USB serial gadget on its USB-C port, so a host can
# flash it with `edgellm flash --to serial:///dev/ttyACM0`: the Pi side is /dev/ttyGS0.
#
#   enable-usb-gadget-serial.sh [BOOT_DIR]
#
# BOOT_DIR is the boot partition: /boot/firmware on the Pi (the default; /boot on older
# images), or the card's bootfs mounted on another machine. It edits two files, idempotently
# (running it again changes nothing):
#   config.txt   dtoverlay=dwc2,dr_mode=peripheral in an [all] section (the USB-C port's
#                DWC2 controller in device mode); an active dwc2 overlay there already counts
#   cmdline.txt  modules-load=dwc2,g_serial (merged into an existing modules-load= word);
#                the file stays one line
# Then reboot, and run the receiver on the gadget port:
#   systemctl enable --now edgellm-receive@ttyGS0.service
set -euo pipefail

if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
  sed -n '3,18p' "$0" | sed 's/^# \{0,1\}//'
  exit 0
fi
if [ $# -gt 1 ]; then
  echo "usage: $0 [BOOT_DIR]" >&2
  exit 2
fi
if [ $# -eq 1 ]; then
  BOOT=$1
elif [ -f /boot/firmware/config.txt ]; then
  BOOT=/boot/firmware
else
  BOOT=/boot
fi
CONFIG="$BOOT/config.txt"
CMDLINE="$BOOT/cmdline.txt"
for f in "$CONFIG" "$CMDLINE"; do
  if [ ! -f "$f" ]; then
    echo "error: $f does not exist: give the boot partition (bootfs) as BOOT_DIR" >&2
    exit 1
  fi
done

replace() {  # replace file $1 with the text on stdin, atomically (temporary file + rename)
  local tmp
  tmp=$(mktemp "$1.XXXXXX")
  chmod 644 "$tmp"
  cat >"$tmp"
  sync "$tmp" 2>/dev/null || true
  mv -f "$tmp" "$1"
}

# config.txt: is a dwc2 overlay active in [all] (or before any [section])?
if awk 'BEGIN { s = "all" }
        /^[[:space:]]*\[/ { s = tolower($0); gsub(/[][[:space:]]/, "", s); next }
        s == "all" && /^[[:space:]]*dtoverlay=dwc2([,[:space:]]|$)/ { found = 1 }
        END { exit !found }' "$CONFIG"; then
  echo "config.txt: dwc2 overlay already enabled"
else
  {
    cat "$CONFIG"
    if [ -s "$CONFIG" ] && [ -n "$(tail -c 1 "$CONFIG")" ]; then echo; fi
    printf '\n[all]\n# USB device (gadget) mode on the USB-C port: edgellm-receive@ttyGS0\n'
    printf 'dtoverlay=dwc2,dr_mode=peripheral\n'
  } | replace "$CONFIG"
  echo "config.txt: added dtoverlay=dwc2,dr_mode=peripheral"
fi

# cmdline.txt: one line of words; merge dwc2 and g_serial into modules-load=.
line=$(head -n 1 "$CMDLINE" | tr -d '\r')
read -r -a words <<<"$line" || true
out=()
found=0
for w in "${words[@]}"; do
  case $w in
    modules-load=*)
      found=1
      mods=${w#modules-load=}
      for m in dwc2 g_serial; do
        case ",$mods," in
          *",$m,"*) ;;
          *) mods="${mods:+$mods,}$m" ;;
        esac
      done
      case ",$mods," in
        *,g_ether,* | *,g_cdc,* | *,g_multi,* | *,g_mass_storage,*)
          echo "warning: cmdline.txt loads another legacy gadget too ($mods); only one" \
            "binds: remove the other one" >&2 ;;
      esac
      out+=("modules-load=$mods")
      ;;
    *) out+=("$w") ;;
  esac
done
if [ "$found" = 0 ]; then  # conventionally right after rootwait
  placed=()
  for w in "${out[@]}"; do
    placed+=("$w")
    if [ "$w" = rootwait ] && [ "$found" = 0 ]; then placed+=("modules-load=dwc2,g_serial"); found=1; fi
  done
  if [ "$found" = 0 ]; then placed+=("modules-load=dwc2,g_serial"); fi
  out=("${placed[@]}")
fi
new="${out[*]}"
if [ "$new" = "$line" ] && [ "$(wc -l <"$CMDLINE")" -le 1 ]; then
  echo "cmdline.txt: modules-load=dwc2,g_serial already there"
else
  printf '%s\n' "$new" | replace "$CMDLINE"
  echo "cmdline.txt: now loads dwc2 and g_serial"
fi
echo "reboot, then: systemctl enable --now edgellm-receive@ttyGS0.service"
