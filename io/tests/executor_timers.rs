//! The executor's latency-ring timer rules that oc relies on: a sleep wakes at its own
//! deadline even when a later timer is pending, a busy task that yields when asked is
//! still preempted for a timer that falls due, and an executor whose preemption timer
//! fires before its runnable tasks ran does not sleep. oc's glommio keeps that timer
//! between wake-ups (vendor/glommio/OC-PATCH.md); each test here fails when the rule
//! it names is broken (each checked against a build that broke it).

use std::cell::Cell;
use std::rc::Rc;
use std::time::{Duration, Instant};

/// glommio's default preemption period: the timer the executor arms while it runs tasks.
const PREEMPT_PERIOD: Duration = Duration::from_millis(100);

#[test]
fn a_short_sleep_wakes_at_its_deadline_though_the_preemption_timer_is_later() {
    const SLEEP: Duration = Duration::from_millis(5);
    let overslept = oc_io::executor::run_local(async {
        let mut late = Vec::new();
        for _ in 0..40 {
            // A runnable second task makes the executor run its task queue with the
            // preemption timer armed (100 ms), then the sleep needs one 5 ms away.
            glommio::spawn_local(async { futures_lite::future::yield_now().await }).detach();
            futures_lite::future::yield_now().await;
            let began = Instant::now();
            glommio::timer::sleep(SLEEP).await;
            late.push(began.elapsed().saturating_sub(SLEEP));
        }
        late
    });
    let worst = overslept.iter().max().copied().unwrap_or_default();
    // Waking at the pending preemption timer instead would oversleep by ~95 ms each time;
    // a loaded machine may delay a few wake-ups, never most of them by half that.
    let far_late = overslept
        .iter()
        .filter(|late| **late >= PREEMPT_PERIOD / 2)
        .count();
    assert!(
        far_late <= 2,
        "{far_late} of 40 sleeps of 5 ms woke ≥ 50 ms late (worst {worst:?}): a pending \
         later timer held the executor"
    );
}

#[test]
fn a_busy_task_that_yields_when_asked_is_preempted_for_a_timer_that_falls_due() {
    const BUSY_FOR: Duration = Duration::from_millis(400);
    let (woke_after, busy_ran) = oc_io::executor::run_local(async {
        let started = Instant::now();
        let woke_after = Rc::new(Cell::new(None));
        let sleeper = {
            let woke_after = woke_after.clone();
            glommio::spawn_local(async move {
                glommio::timer::sleep(Duration::from_millis(10)).await;
                woke_after.set(Some(started.elapsed()));
            })
        };
        let busy = glommio::spawn_local(async move {
            let began = Instant::now();
            while began.elapsed() < BUSY_FOR {
                std::hint::spin_loop();
                glommio::yield_if_needed().await;
            }
            began.elapsed()
        });
        let busy_ran = busy.await;
        sleeper.await;
        (woke_after.get(), busy_ran)
    });
    let woke_after = woke_after.expect("the sleeper ran");
    // Preempted at the latest when the 100 ms period ends; never only after the busy task.
    assert!(
        woke_after < BUSY_FOR.saturating_sub(PREEMPT_PERIOD),
        "a 10 ms sleep woke after {woke_after:?}, the busy task ran {busy_ran:?}: it was \
         not preempted"
    );
}

#[test]
fn a_preemption_timer_firing_before_the_task_queues_run_does_not_put_runnable_tasks_to_sleep() {
    // A task that works a little and then reads a cached file (the read completes as
    // it is submitted), on an executor that spins before it parks, keeps the executor
    // polling without ever parking: it finds the read complete while it spins and
    // polls again, and a kept preemption timer fires at random points of that loop.
    // One that fires between the reactor's last look at the rings and the task queues
    // used to stop them before they ran (verified: this test then hung), and the
    // executor went to sleep with the task runnable and nothing left to wake it.
    const RUN_FOR: Duration = Duration::from_secs(2);
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let executor = oc_io::executor::executor_builder(glommio::Placement::Unbound)
            .preempt_timer(Duration::from_micros(300))
            .spin_before_park(Duration::from_millis(1))
            .make()
            .expect("an executor can be built");
        let turns = executor.run(async {
            let path =
                std::env::temp_dir().join(format!("oc-executor-timers-{}", std::process::id()));
            let file = glommio::io::BufferedFile::create(&path)
                .await
                .expect("a temporary file");
            file.write_at(vec![7; 64], 0).await.expect("written");
            file.close().await.expect("closed");
            let file = glommio::io::BufferedFile::open(&path)
                .await
                .expect("reopened");
            let started = Instant::now();
            let mut turns = 0u64;
            while started.elapsed() < RUN_FOR {
                let worked = Instant::now();
                while worked.elapsed() < Duration::from_micros(5) {
                    std::hint::spin_loop();
                }
                file.read_at(0, 64).await.expect("a cached read");
                turns += 1;
            }
            let _ = std::fs::remove_file(&path);
            turns
        });
        let _ = done.send(turns);
    });
    match finished.recv_timeout(RUN_FOR + Duration::from_secs(30)) {
        Ok(turns) => assert!(turns > 0, "the task never ran"),
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
            panic!("the executor's thread panicked (above)")
        }
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => panic!(
            "the executor stopped running a runnable task: it slept for 30 s past the \
             task's {RUN_FOR:?}"
        ),
    }
}
