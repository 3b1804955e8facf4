#!/bin/bash
# old, new, new, old: oc-bench archive, 6 pairs each. OLD and NEW: release directories
# holding oc-server, oc-pitr and oc-bench; OUT: where results go.
set -e
out=${OUT:-.}
for round in old1 new1 new2 old2; do
  case $round in old*) bin=$OLD;; new*) bin=$NEW;; esac
  rm -rf /var/tmp/ocb-arch; mkdir -p /var/tmp/ocb-arch
  $bin/oc-bench archive --dir /var/tmp/ocb-arch --seconds 5 --kills 3 --pairs 6 --json $out/$round.json > $out/$round.log 2>&1
done
rm -rf /var/tmp/ocb-arch
echo done
