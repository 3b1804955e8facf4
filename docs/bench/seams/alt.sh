#!/bin/bash
# Alternates old and new oc-bench wal/engine runs in the same minutes.
out=/tmp/bins/alt; mkdir -p $out
for round in 1 2 3; do
  for which in old new; do
    rm -rf /work/benchtmp/d; mkdir -p /work/benchtmp/d
    /tmp/bins/oc-bench-$which wal --dir /work/benchtmp/d --seconds 3 --concurrency 1,64 --json $out/wal-$which-$round.json > $out/wal-$which-$round.log 2>&1
    rm -rf /work/benchtmp/d; mkdir -p /work/benchtmp/d
    /tmp/bins/oc-bench-$which engine --dir /work/benchtmp/d --seconds 3 --concurrency 1,64 --json $out/engine-$which-$round.json > $out/engine-$which-$round.log 2>&1
  done
done
echo finished > $out/done
