#!/usr/bin/env bash
# experiment.sh: the arms of diskio.txt, 3 rounds (SERVER, DEV and BENCH as diskio.sh).
A=file:///var/tmp/oc-diskio-archive
for r in 1 2 3; do
  arms="base chunk idle both none"; [ $r = 2 ] && arms="none both idle chunk base"
  for arm in $arms; do
    rm -rf /var/tmp/oc-diskio-archive
    case $arm in
      base) SERVER=${SERVER:?} bash "$(dirname "$0")/diskio.sh" base-$r $A;;
      chunk) OC_SHIP_READ_CHUNK=131072 SERVER=${SERVER:?} bash "$(dirname "$0")/diskio.sh" chunk-$r $A;;
      idle) OC_SHIP_IDLE_IO=1 SERVER=${SERVER:?} bash "$(dirname "$0")/diskio.sh" idle-$r $A;;
      both) OC_SHIP_IDLE_IO=1 OC_SHIP_READ_CHUNK=131072 SERVER=${SERVER:?} bash "$(dirname "$0")/diskio.sh" both-$r $A;;
      none) SERVER=${SERVER:?} bash "$(dirname "$0")/diskio.sh" none-$r none;;
    esac
  done
done
