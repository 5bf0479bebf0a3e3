//! Datapath proof with BPF_PROG_TEST_RUN: the fixture table, every
//! truncation of valid frames, and a seeded malformed-packet sweep.
//! Needs root (loads BPF, creates a network namespace).

mod sweep;
mod table;

use lb_common::Reason;
use table::{Case, Expect};
use xlb_tests::{packets, testrun::*};

/// Runs one case and returns what was wrong with it, if anything.
fn check(dp: &mut Datapath, verdict: u32, reason: Reason, case: Case) -> Result<(), String> {
    let before = dp.stats();
    let (got, output) = dp.run(&case.input, case.ifindex);
    let after = dp.stats();
    let mut problems = Vec::new();
    if got != verdict {
        problems.push(format!("verdict {got}, expected {verdict}"));
    }
    for (index, (b, a)) in before.iter().zip(&after).enumerate() {
        let expected = u64::from(index == reason as usize);
        if a - b != expected {
            let name = Reason::ALL[index].name();
            problems.push(format!(
                "counter {name} grew by {}, expected {expected}",
                a - b
            ));
        }
    }
    match case.expect {
        Expect::Unchanged if output != case.input => {
            problems.push("frame was modified on XDP_PASS".into());
        }
        Expect::Frame(build) if got == verdict => {
            let want = build(dp);
            if output != want {
                problems.push(format!(
                    "output differs\n      got:  {}\n      want: {}",
                    hex(&output),
                    hex(&want)
                ));
            }
            // A frame handed to tc carries its hand-off in front.
            let magic = lb_common::path::HANDOFF_MAGIC.to_ne_bytes();
            let frame = match output.get(..4) {
                Some(head) if got == XDP_PASS && head == magic => &output[8..],
                _ => &output[..],
            };
            if let Err(e) = packets::check_checksums(frame) {
                problems.push(e);
            }
        }
        _ => {}
    }
    if problems.is_empty() {
        if let Some(after) = case.after {
            after(dp);
        }
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

fn hex(frame: &[u8]) -> String {
    frame.iter().map(|b| format!("{b:02x}")).collect()
}

fn reset(dp: &mut Datapath) {
    dp.clear_flows();
    dp.write_base_state();
}

#[test]
fn fixture_table() {
    with_datapath(xlb::DATAPATH_OBJECT, |dp| {
        let mut failures = Vec::new();
        for row in table::rows() {
            reset(dp);
            let case = (row.case)(dp);
            match check(dp, row.verdict, row.reason, case) {
                Ok(()) => println!("ok   {}", row.name),
                Err(e) => {
                    println!("FAIL {}: {e}", row.name);
                    failures.push(row.name);
                }
            }
        }
        assert!(failures.is_empty(), "failing rows: {failures:#?}");
    });
}

#[test]
fn truncated_frames_pass_untouched() {
    with_datapath(xlb::DATAPATH_OBJECT, |dp| {
        let mut failures = Vec::new();
        for (name, frame) in table::truncations() {
            reset(dp);
            let case = Case {
                input: frame,
                ifindex: dp.client_ifindex,
                expect: Expect::Unchanged,
                after: None,
            };
            if let Err(e) = check(dp, XDP_PASS, Reason::PassMalformed, case) {
                failures.push(format!("{name}: {e}"));
            }
        }
        assert!(failures.is_empty(), "{failures:#?}");
    });
}

#[test]
fn malformed_packet_sweep() {
    let seed = std::env::var("XLB_SWEEP_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
    let count = std::env::var("XLB_SWEEP_FRAMES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100_000);
    with_datapath(xlb::DATAPATH_OBJECT, |dp| {
        if let Err(e) = sweep::sweep(dp, seed, count) {
            panic!("{e}\nreproduce with XLB_SWEEP_SEED={seed}");
        }
        println!("sweep: {count} frames, seed {seed}: all invariants held");
        let counted: Vec<String> = Reason::ALL
            .iter()
            .zip(dp.stats())
            .filter(|(_, n)| *n > 0)
            .map(|(reason, n)| format!("{}={n}", reason.name()))
            .collect();
        println!("sweep counters: {}", counted.join(" "));
    });
}
