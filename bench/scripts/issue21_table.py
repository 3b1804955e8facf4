#!/usr/bin/env python3
"""Issue 21's table from one run of bench/scripts/issue21.sh: each figure the median of
the rounds with the range, its goal and a verdict ("met" only when every round meets
it). Usage: issue21_table.py <OUT directory>."""
import glob
import json
import statistics
import sys

out = sys.argv[1]


def load(pattern):
    return [json.load(open(f)) for f in sorted(glob.glob(f"{out}/{pattern}"))]


def spread(values, fmt="{:.2f}"):
    values = [v for v in values if v is not None]
    if not values:
        return "—"
    med = statistics.median(values)
    if len(values) == 1:
        return fmt.format(med)
    return f"{fmt.format(med)} ({fmt.format(min(values))}–{fmt.format(max(values))})"


def verdict(values, ok):
    values = [v for v in values if v is not None]
    hits = sum(1 for v in values if ok(v))
    if hits == len(values):
        return "met"
    if hits == 0:
        return "**not met**"
    return f"met in {hits} of {len(values)}"


rows = []


def row(what, values, goal, ok, fmt="{:.2f}", unit=""):
    rows.append((what, spread(values, fmt) + unit, goal, verdict(values, ok)))


for setup in ("default", "pinned", "pinned-no-archive"):
    runs = load(f"http-{setup}-[0-9]*.json")
    if not runs:
        continue
    row(f"HTTP 90:10 at 10k req/s, {setup}: read p99 ÷ floor p99",
        [r["read_p99_over_floor"] for r in runs], "≤ 1.5", lambda v: v <= 1.5)
    row(f"same, {setup}: write p99 − (floor p99 + 2 × fsync-lag p99), ms",
        [(r["writes"]["p99_us"] - r["floor"]["p99_us"]) / 1e3 - 2 * r["fsync_lag_p99_ms"]
         for r in runs], "≤ 0", lambda v: v <= 0, "{:+.1f}")
    row(f"same, {setup}: read / write p99, ms",
        [r["reads"]["p99_us"] / 1e3 for r in runs], "(read)", lambda v: v <= 1, "{:.2f}")
    rows[-1] = (rows[-1][0], rows[-1][1] + " / " +
                spread([r["writes"]["p99_us"] / 1e3 for r in runs]), "read ≤ 1, write ≤ 2 (absolute)",
                verdict(list(zip([r["reads"]["p99_us"] for r in runs], [r["writes"]["p99_us"] for r in runs])),
                        lambda v: v[0] <= 1000 and v[1] <= 2000))
    row(f"same, {setup}: write p99 ÷ the log's fsync-lag p99",
        [r["writes"]["p99_us"] / 1e3 / r["fsync_lag_p99_ms"] for r in runs if r["fsync_lag_p99_ms"]],
        "≤ 2", lambda v: v <= 2)

with_archive = load("http-pinned-[0-9]*.json")
without = load("http-pinned-no-archive-[0-9]*.json")
if with_archive and without:
    for kind in ("reads", "writes"):
        row(f"shipping's cost on {kind[:-1]} p99 (pinned, with ÷ without, per round)",
            [a[kind]["p99_us"] / b[kind]["p99_us"] for a, b in zip(with_archive, without)],
            "≤ 1.2", lambda v: v <= 1.2)

for a in load("ask.json"):
    for kind, lat in sorted(a["kinds"].items()):
        row(f"/ask at {a['offered_rate']} req/s, {kind}: p99 ms", [lat["p99_us"] / 1e3],
            "≤ 2", lambda v: v <= 2)

engines = load("engine-*.json")


def writes(r, c, rows_per_batch):
    return next(w for w in r["writes"] if w["concurrency"] == c and w["rows_per_batch"] == rows_per_batch)


if engines:
    row("engine, 64 writers single-row, × WAL appends/s",
        [writes(r, 64, 1)["ratio_to_wal"] for r in engines], "≥ 0.7", lambda v: v >= 0.7)
    row("engine, 256 writers single-row, × WAL appends/s",
        [writes(r, 256, 1)["ratio_to_wal"] for r in engines], "≥ 0.5", lambda v: v >= 0.5)
    row("engine, 64 writers × 100-row batches: p99 ms",
        [writes(r, 64, 100)["commit_p99_us"] / 1e3 for r in engines], "≤ 10", lambda v: v <= 10, "{:.1f}")
    row("engine, p99 during back-to-back checkpoints ÷ without",
        [r["during_checkpoint_p99_us"] / r["no_checkpoint_p99_us"] for r in engines], "≤ 1.2",
        lambda v: v <= 1.2)

peers = load("peers-*.json")
if peers:
    def rate(r, engine):
        return next((p["writes_per_s"] for p in r["results"] if p["engine"] == engine and p["concurrency"] == 1), None)
    row("one writer: oc ÷ raw 4 KiB write + fdatasync", [rate(r, "oc") / rate(r, "raw disk") for r in peers],
        "≥ 0.9", lambda v: v >= 0.9)
    row("one writer: oc ÷ SQLite (WAL, FULL)", [rate(r, "oc") / rate(r, "sqlite") for r in peers],
        "> 1", lambda v: v > 1)
    # RocksDB is in a run only when oc-bench was built with `--features peers-rocksdb`.
    with_rocksdb = [r for r in peers if rate(r, "rocksdb")]
    if with_rocksdb:
        row("one writer: oc ÷ RocksDB (sync writes)",
            [rate(r, "oc") / rate(r, "rocksdb") for r in with_rocksdb], "> 1", lambda v: v > 1)
    # Since 2026-12-05 every lone writer runs on shard 0's CPU (`one_writer_cpu`);
    # earlier runs left the peers to the scheduler. Their ratios do not mix.
    if len({r.get("one_writer_cpu") is None for r in peers}) > 1:
        print("note: these peers runs mix pinned and unpinned lone writers", file=sys.stderr)

wals = load("wal-*.json")
if wals:
    def baseline(r, around):
        # The mean raw durable rate around the phase when the run has it (oc-bench since
        # 2026-12-05: right before and after it; since the night of 2026-12-06, also
        # between its slices), else the one measured first.
        return sum(around) / len(around) if around else r["raw_durable_seq_mb_s"]
    row("WAL 256 KiB records ÷ raw 1 MiB write + fdatasync, fresh log (spares zero-filled meanwhile)",
        [r["wal_seq_mb_s"] / baseline(r, r.get("raw_durable_around_fresh_mb_s")) for r in wals],
        "≥ 0.9", lambda v: v >= 0.9)
    row("same, steady state (released segments recycled as spares)",
        [r["steady_state"]["wal_seq_mb_s"] / baseline(r, r["steady_state"].get("raw_durable_around_mb_s"))
         for r in wals], "≥ 0.9", lambda v: v >= 0.9)
    def one_appender(c):
        # Against the raw rate measured around the phase when the run has it (oc-bench
        # since 2026-12-06; also between its slices since that night), else against the
        # one measured first.
        return c.get("ratio_to_raw_fsync_around") or c["ratio_to_raw_fsync"]
    row("WAL one appender ÷ raw 4 KiB write + fdatasync (fresh log)",
        [one_appender(r["small_appends"][0]) for r in wals], "≥ 0.9 (the one-writer goal, for the log alone)", lambda v: v >= 0.9)
    row("same, steady state",
        [one_appender(r["steady_state"]["small_appends"][0]) for r in wals], "≥ 0.9", lambda v: v >= 0.9)

for r in load("recovery.json"):
    row("log replay, MB/s (median of the reopenings)", [r["replay_mb_s"]["median"]], "≥ 300",
        lambda v: v >= 300, "{:.0f}")
    row("checkpoint load, MB/s (median of the reopenings)", [r["checkpoint_load_mb_s"]["median"]], "≥ 300",
        lambda v: v >= 300, "{:.0f}")

for r in load("archive.json"):
    row("restore from a local archive, MB/s", [r["restore_mb_per_s"]], "≥ 300", lambda v: v >= 300, "{:.0f}")
    row("shipping's cost on write throughput, % (median of the pairs)", [r["overhead_pct"]], "≤ 2",
        lambda v: v <= 2, "{:.1f}")

for r in load("memory.json"):
    row(f"resident memory per stored row byte ({r['rows']} rows × {r['stored_bytes'] // r['rows']} B)",
        [r["resident_per_stored_byte"]], "≤ 1.3", lambda v: v <= 1.3)

print("| row | measured: median (min–max) | goal | verdict |")
print("|---|---|---|---|")
for what, measured, goal, v in rows:
    print(f"| {what} | {measured} | {goal} | {v} |")
