#!/bin/bash
out=/tmp/bins/alt2; mkdir -p $out
for round in 1 2 3; do
  for which in new old; do
    rm -rf /work/benchtmp/d; mkdir -p /work/benchtmp/d
    /tmp/bins/oc-bench-$which engine --dir /work/benchtmp/d --seconds 3 --concurrency 1,64 --json $out/engine-$which-$round.json > $out/engine-$which-$round.log 2>&1
  done
done
echo finished > $out/done
